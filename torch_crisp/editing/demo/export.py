"""The demo's world and base model as ordinary files, for the other ``torch-crisp`` commands.

``<out>/base-model/`` is a Hugging Face model folder (config, safetensors weights, tokenizer),
``capability.txt`` and ``heldout.txt`` hold one document per line, and ``edits.json`` the edit
requests in the EasyEdit format :func:`~torch_crisp.editing.requests.load_requests` reads. So::

    torch-crisp collect --model <out>/base-model --data <out>/capability.txt --out factors
    torch-crisp edit --model <out>/base-model --edits <out>/edits.json --factors factors --out edited

run on real files what the demo ran in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..requests import save_requests
from .world import World

__all__ = ["EXPORTED", "export_world"]

EXPORTED = ("base-model", "capability.txt", "heldout.txt", "edits.json")


def _write_lines(lines: list[str], path: Path) -> None:
    # One document per line is what read_documents splits a .txt file into; no document of the
    # world holds a newline, so none is split or merged.
    if any("\n" in line for line in lines):
        raise ValueError(f"{path.name}: a document holds a newline")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def export_world(world: World, model: Any, tokenizer: Any, out_dir: str | Path) -> dict[str, str]:
    """Write the base model, the capability and held-out texts and the edits under ``out_dir``.

    ``model`` must hold the base (unedited) weights. Returns ``{name: path}`` of what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "base-model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    _write_lines(world.capability_texts(), out / "capability.txt")
    _write_lines(world.heldout_texts(), out / "heldout.txt")
    save_requests(world.edit_requests(), out / "edits.json")
    return {name: str(out / name) for name in EXPORTED}
