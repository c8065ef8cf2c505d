"""What every ``torch-crisp`` subcommand shares: user errors, devices, loading a local model.

User mistakes raise :class:`CLIError` (or ``ValueError`` / ``OSError``); the entry point
(:mod:`torch_crisp.cli`) prints them as one line with exit code 2. transformers is imported only
inside :func:`load_hf_model`, when a command needs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["DTYPES", "CLIError", "first_line", "load_hf_model", "resolve_device"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A mistake the user can fix; printed as ``torch-crisp <command>: error: <message>``."""


def first_line(err: BaseException) -> str:
    """One line of an error's text (errors of other libraries may span lines)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_hf_model(path: Path, dtype: str, device: torch.device, quiet: bool) -> tuple[torch.nn.Module, Any]:
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("collect needs Hugging Face transformers: pip install 'torch-crisp[hf]'") from None
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such folder (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path} is not a Hugging Face model folder (it has no config.json)")
    # transformers >= 4.56 calls the argument dtype; older versions torch_dtype
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()  # its "Loading weights" bar; restored below
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CLIError(f"--model {path}: cannot load its tokenizer ({first_line(err)})") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **{dtype_kw: DTYPES.get(dtype, "auto")}
            )
        except (OSError, ValueError) as err:
            raise CLIError(f"--model {path}: cannot load it as a causal LM ({first_line(err)})") from None
    finally:
        if quiet and bars_were_enabled:
            hf_logging.enable_progress_bar()
    return model.to(device), tokenizer
