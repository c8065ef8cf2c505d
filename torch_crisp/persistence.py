"""Projector folders on disk: a JSON manifest plus safetensors, written atomically.

Collecting K-FAC factors is the expensive, one-off part of CrispEdit; this module makes the
collected state reusable. It writes and reads the state dicts of :mod:`torch_crisp.serialization`
(which defines what is saved) and knows nothing of models or projectors. A projector **folder**
holds

* ``crisp_config.json``: the manifest — format version, the :class:`~torch_crisp.CrispConfig`,
  one fingerprint per target layer (name, logical shape ``(d_out, d_in)``, bias, module type,
  weight dtype and optionally a SHA-256 of the weight at save time), token counts, user metadata,
  and the name of the tensor file it belongs to;
* ``crisp_tensors-<save id>.safetensors``: the sums (``<layer>.A_sum``, ``<layer>.S_sum``) and,
  if requested, the bases (``<layer>.eig_in`` … ``<layer>.mask``, ``<layer>.tau``).

Writes are atomic: the tensor file is written under a fresh name first, and the manifest —
replaced with one ``os.replace`` — is the commit point. A save interrupted at any moment leaves
either the previous manifest (whose tensor file is untouched) or the new one (whose tensor file
is complete). Stale tensor files are removed after a successful save. Save from one process
only (rank 0 under data parallelism).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._version import __version__
from .serialization import BASIS_TENSORS, FORMAT_NAME, FORMAT_VERSION, check_format

__all__ = ["CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "read_folder", "save_pretrained"]

CONFIG_NAME = "crisp_config.json"
_TENSORS_PREFIX = "crisp_tensors-"
_TENSORS_SUFFIX = ".safetensors"
_PARTIAL_SUFFIX = ".partial"


# --------------------------------------------------------------------------- folders
def save_pretrained(
    sd: Mapping[str, Any], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a projector state dict (:func:`torch_crisp.serialization.state_dict`) to the folder
    ``path`` (created if needed), atomically.

    ``CrispProjector.save_pretrained(path, include_basis=..., hash_weights=...)`` builds the state
    dict: with eigenbases (larger; skips the eigendecompositions on load) or without (recomputed
    from the sums), with a SHA-256 of every target weight (loading into different weights warns)
    or without. ``metadata`` is JSON-serialisable information for humans (data set, model path, …).

    Returns the folder path. Other files in the folder are left alone.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; choose a folder path for the projector")
    folder.mkdir(parents=True, exist_ok=True)
    save_id = secrets.token_hex(6)
    tensors_name = f"{_TENSORS_PREFIX}{save_id}{_TENSORS_SUFFIX}"

    tensors: dict[str, Tensor] = {}
    manifest_layers: dict[str, Any] = {}
    for name, entry in sd["layers"].items():
        fingerprint = dict(entry["fingerprint"])
        num_tokens = entry["num_tokens"]
        if isinstance(num_tokens, float) and not math.isfinite(num_tokens):
            raise ValueError(f"layer {name!r} has a non-finite token count {num_tokens}; the state is corrupt")
        manifest_layers[name] = {"fingerprint": fingerprint, "num_tokens": num_tokens, "has_factors": False}
        if entry["A_sum"] is not None:
            tensors[f"{name}.A_sum"] = entry["A_sum"].detach().to("cpu").contiguous()
            tensors[f"{name}.S_sum"] = entry["S_sum"].detach().to("cpu").contiguous()
            manifest_layers[name]["has_factors"] = True
        basis = entry["basis"]
        manifest_layers[name]["has_basis"] = basis is not None
        if basis is not None:
            manifest_layers[name]["basis_curvature"] = basis["curvature"]
            for key in BASIS_TENSORS:
                tensors[f"{name}.{key}"] = basis[key].detach().to("cpu").contiguous()
            # a tensor rather than JSON: tau may be +inf, which JSON cannot carry
            tensors[f"{name}.tau"] = torch.tensor([basis["tau"]], dtype=torch.float64)
        manifest_layers[name]["has_correction"] = entry["correction_sum"] is not None
        if entry["correction_sum"] is not None:
            tensors[f"{name}.correction_sum"] = entry["correction_sum"].detach().to("cpu").contiguous()
            manifest_layers[name]["num_examples"] = entry["num_examples"]

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "torch_crisp_version": __version__,
        "save_id": save_id,
        "tensors_file": tensors_name,
        "config": sd["config"],
        "layers": manifest_layers,
        "metadata": dict(metadata) if metadata else {},
    }
    manifest_text = json.dumps(manifest, indent=2, allow_nan=False)  # fails before touching the disk

    partial = folder / (tensors_name + _PARTIAL_SUFFIX)
    final = folder / tensors_name
    config_tmp = folder / f"{CONFIG_NAME}.{save_id}.tmp"
    committed = False
    try:
        save_file(tensors, str(partial), metadata={"format": FORMAT_NAME, "save_id": save_id})
        _fsync_file(partial)
        os.replace(partial, final)
        config_tmp.write_text(manifest_text, encoding="utf-8")
        _fsync_file(config_tmp)
        os.replace(config_tmp, folder / CONFIG_NAME)  # the commit point
        committed = True
        _fsync_dir(folder)
    finally:
        if not committed:
            for leftover in (partial, final, config_tmp):
                _unlink_quietly(leftover)
    _remove_stale_files(folder, keep=tensors_name)
    return folder


def read_folder(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a projector folder without a model: ``(state_dict, manifest)``.

    The state dict has the layout of :func:`state_dict` (tensors on the CPU; fingerprints include
    the weight hashes); the manifest is the parsed ``crisp_config.json`` (``metadata`` included).
    Raises ``FileNotFoundError`` for a missing folder or manifest and ``ValueError`` for a corrupt
    or foreign one.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"projector folder {folder} does not exist")
    manifest_path = folder / CONFIG_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} contains no {CONFIG_NAME}: not a saved torch_crisp projector (or its first save "
            "was interrupted); create one with projector.save_pretrained(path) or `torch-crisp collect`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err})") from None
    source = f"projector folder {folder}"
    check_format(manifest, source)
    tensors_name = manifest.get("tensors_file")
    if not isinstance(tensors_name, str) or Path(tensors_name).name != tensors_name:
        raise ValueError(f"{manifest_path} names no valid tensors_file")
    tensors_path = folder / tensors_name
    if not tensors_path.is_file():
        raise FileNotFoundError(f"{source}: {tensors_name} named by {CONFIG_NAME} is missing")
    tensors = load_file(str(tensors_path))

    layers: dict[str, Any] = {}
    def get(name: str, key: str) -> Tensor:
        try:
            return tensors[f"{name}.{key}"]
        except KeyError:
            raise ValueError(f"{source}: tensor {name}.{key} is missing from {tensors_name}") from None

    for name, info in manifest["layers"].items():
        basis = None
        if info.get("has_basis"):
            basis = {key: get(name, key) for key in BASIS_TENSORS}
            basis["tau"] = float(get(name, "tau").item())
            basis["curvature"] = info.get("basis_curvature", "kfac")
        has_factors = bool(info.get("has_factors"))
        layers[name] = {
            "fingerprint": info["fingerprint"],
            "num_tokens": info.get("num_tokens", 0),
            "A_sum": get(name, "A_sum") if has_factors else None,
            "S_sum": get(name, "S_sum") if has_factors else None,
            "correction_sum": get(name, "correction_sum") if info.get("has_correction") else None,
            "num_examples": info.get("num_examples", 0),
            "basis": basis,
        }
    sd = {
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "config": manifest["config"],
        "layers": layers,
    }
    return sd, manifest


# --------------------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_stale_files(folder: Path, keep: str) -> None:
    """Delete tensor files of earlier (or interrupted) saves and temporary manifests."""
    for item in folder.iterdir():
        name = item.name
        stale_tensors = name.startswith(_TENSORS_PREFIX) and name != keep
        stale_manifest = name.startswith(CONFIG_NAME + ".") and name.endswith(".tmp")
        if (stale_tensors or stale_manifest) and item.is_file():
            _unlink_quietly(item)
