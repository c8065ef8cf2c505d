"""Projector folders on disk: a JSON manifest plus safetensors, written atomically, read defensively.

Collecting K-FAC factors is the expensive, one-off part of CrispEdit; this module makes the
collected state reusable. It writes and reads the state dicts of :mod:`torch_crisp.serialization`
(which defines what is saved) and knows nothing of models or projectors. A projector **folder**
holds

* ``crisp_config.json``: the manifest — format version, the :class:`~torch_crisp.CrispConfig`,
  one fingerprint per target layer (name, logical shape ``(d_out, d_in)``, bias, module type,
  weight dtype and optionally a SHA-256 of the weight at save time), token counts, user metadata,
  the name of the tensor file it belongs to and that file's SHA-256;
* ``crisp_tensors-<save id>.safetensors``: the sums (``<layer>.A_sum``, ``<layer>.S_sum``) and,
  if requested, the bases (``<layer>.eig_in`` … ``<layer>.mask``, ``<layer>.tau``).

**Reading** treats the folder as untrusted input. Every manifest field is checked (type, range,
which fields must and may be present), the tensor file must hash to the recorded SHA-256 (flipped
or truncated bytes are refused), and every tensor must be present with the shape, dtype and
finiteness the manifest implies. Problems raise ``ValueError`` naming the file and the field
(``FileNotFoundError`` for missing files). Format version 2 is written now; version 1 folders
(written before the checksum existed) still load, with every check except the checksum.

**Writes** are atomic: the tensor file and the manifest are first written into a staging folder
``.crisp-save-<save id>`` inside the projector folder and then moved in; replacing
``crisp_config.json`` with one ``os.replace`` is the commit point. A save interrupted at any moment
leaves either the previous manifest (whose tensor file is untouched) or the new one (whose tensor
file is complete). After a successful save, the tensor file the previous manifest named is
deleted, as is what earlier interrupted saves left (their staging folders and a tensor file they
moved in before dying); no other file is touched. A state that would not load is refused before
the folder is touched. Files get the mode of a newly created file (the umask), like the manifest.
Save from one process only (rank 0 under data parallelism).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import serialization
from ._version import __version__
from .config import CURVATURES
from .serialization import BASIS_TENSORS, FORMAT_NAME, check_count

__all__ = ["CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "ProjectorFolder", "open_folder", "read_folder",
           "save_pretrained"]

CONFIG_NAME = "crisp_config.json"
FORMAT_VERSION = 2  # of the folder; 2 added "tensors_sha256"
READABLE_VERSIONS = (1, 2)
_SAVE_ID = "[0-9a-f]{12}"
_TENSORS_FILE = re.compile(rf"crisp_tensors-({_SAVE_ID})\.safetensors")
_STAGING_FOLDER = re.compile(rf"\.crisp-save-({_SAVE_ID})")
_VERSION_1_TEMPORARY = re.compile(  # what version 1 saves left when interrupted
    rf"crisp_tensors-{_SAVE_ID}\.safetensors\.partial|crisp_config\.json\.{_SAVE_ID}\.tmp"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = {"format", "format_version", "torch_crisp_version", "save_id", "tensors_file", "config", "layers",
                  "metadata"}
_LAYER_FLAGS = ("has_factors", "has_basis", "has_correction")


def _tensors_name(save_id: str) -> str:
    return f"crisp_tensors-{save_id}.safetensors"


# --------------------------------------------------------------------------- writing
def save_pretrained(
    sd: Mapping[str, Any], path: str | os.PathLike[str], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a projector state dict (:func:`torch_crisp.serialization.state_dict`) to the folder
    ``path`` (created if needed), atomically.

    ``CrispProjector.save_pretrained(path, include_basis=..., hash_weights=...)`` builds the state
    dict: with eigenbases (larger; skips the eigendecompositions on load) or without (recomputed
    from the sums), with a SHA-256 of every target weight (loading into different weights warns)
    or without. ``metadata`` is JSON-serialisable information for humans (data set, model path, …).

    A state that would not load (non-finite sums, invalid token counts, tensors that do not match
    the fingerprints) raises ``ValueError`` before the folder is touched. Returns the folder path.
    Other files in the folder are left alone.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; choose a folder path for the projector")
    serialization.validate_state_dict(sd, f"the projector state to save in {folder}")
    save_id = secrets.token_hex(6)
    tensors, layers = _split_state(sd)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "torch_crisp_version": __version__,
        "save_id": save_id,
        "tensors_file": _tensors_name(save_id),
        "tensors_sha256": "",  # set once the file is written
        "config": dict(sd["config"]),
        "layers": layers,
        "metadata": dict(metadata) if metadata else {},
    }
    try:
        json.dumps(manifest, allow_nan=False)  # fails before touching the disk
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serialisable without NaN or infinity ({err})") from None
    folder.mkdir(parents=True, exist_ok=True)
    previous = _named_tensors_file(folder)
    _write_and_commit(folder, tensors, manifest)
    if previous is not None and previous != manifest["tensors_file"]:
        _unlink_quietly(folder / previous)
    _remove_interrupted_saves(folder, keep=manifest["tensors_file"])
    return folder


def _split_state(sd: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors to write and the manifest's ``layers`` of a validated state dict."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for name, entry in sd["layers"].items():
        basis, correction = entry["basis"], entry["correction_sum"]
        info: dict[str, Any] = {
            "fingerprint": dict(entry["fingerprint"]),
            "num_tokens": check_count(entry["num_tokens"], "num_tokens", name),
            "has_factors": entry["A_sum"] is not None,
            "has_basis": basis is not None,
            "has_correction": correction is not None,
        }
        if entry["A_sum"] is not None:
            tensors[f"{name}.A_sum"] = entry["A_sum"].detach().to("cpu").contiguous()
            tensors[f"{name}.S_sum"] = entry["S_sum"].detach().to("cpu").contiguous()
        if basis is not None:
            info["basis_curvature"] = basis["curvature"]
            for key in BASIS_TENSORS:
                tensors[f"{name}.{key}"] = basis[key].detach().to("cpu").contiguous()
            # a tensor rather than JSON: tau may be +inf, which JSON cannot carry
            tensors[f"{name}.tau"] = torch.tensor([float(basis["tau"])], dtype=torch.float64)
        if correction is not None:
            tensors[f"{name}.correction_sum"] = correction.detach().to("cpu").contiguous()
            info["num_examples"] = check_count(entry["num_examples"], "num_examples", name)
        layers[name] = info
    return tensors, layers


def _write_and_commit(folder: Path, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> None:
    """Write both files into a staging folder, move the tensors in, then commit the manifest."""
    name, save_id = manifest["tensors_file"], manifest["save_id"]
    staging = folder / f".crisp-save-{save_id}"
    staging.mkdir()
    staged_tensors, staged_manifest = staging / name, staging / CONFIG_NAME
    committed = False
    try:
        # safetensors writes through its own hidden temporary file: inside the staging folder, an
        # interrupted write leaves nothing that a later save cannot recognise and remove
        save_file(tensors, str(staged_tensors), metadata={"format": FORMAT_NAME, "save_id": save_id})
        manifest["tensors_sha256"] = _sha256(staged_tensors)
        staged_manifest.write_text(json.dumps(manifest, indent=2, allow_nan=False), encoding="utf-8")
        # that temporary is created 0600; give the tensors the mode the manifest got from the umask
        os.chmod(staged_tensors, stat.S_IMODE(staged_manifest.stat().st_mode))
        _fsync_file(staged_tensors)
        _fsync_file(staged_manifest)
        os.replace(staged_tensors, folder / name)
        os.replace(staged_manifest, folder / CONFIG_NAME)  # the commit point
        committed = True
        _fsync_dir(folder)
    finally:
        if not committed:
            _unlink_quietly(folder / name)
        shutil.rmtree(staging, ignore_errors=True)


def _named_tensors_file(folder: Path) -> str | None:
    """The tensor file the folder's current manifest names, if it has this library's name pattern."""
    try:
        manifest = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    name = manifest.get("tensors_file") if isinstance(manifest, dict) else None
    return name if isinstance(name, str) and _TENSORS_FILE.fullmatch(name) else None


def _remove_interrupted_saves(folder: Path, keep: str) -> None:
    """Delete what earlier interrupted saves left: staging folders, the tensor file a save may have
    moved in before dying (it has the staging folder's save id), and version 1's temporaries."""
    for item in folder.iterdir():
        staged = _STAGING_FOLDER.fullmatch(item.name)
        if staged and item.is_dir() and not item.is_symlink():
            orphan = folder / _tensors_name(staged.group(1))
            if orphan.name != keep and orphan.is_file():
                _unlink_quietly(orphan)
            shutil.rmtree(item, ignore_errors=True)
        elif _VERSION_1_TEMPORARY.fullmatch(item.name) and item.is_file():
            _unlink_quietly(item)


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ProjectorFolder:
    """A projector folder whose manifest and checksum are verified; its layers are read one by one.

    Attributes:
        path: the folder.
        manifest: the parsed, validated ``crisp_config.json`` (``metadata`` included).
        tensors_path: the tensor file it names.
    """

    path: Path
    manifest: dict[str, Any]
    tensors_path: Path

    def layers(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, entry)`` per layer, an entry in the layout of :func:`serialization.state_dict`.

        Tensors are read from the file one layer at a time (nothing else is held) and validated
        against the manifest: ``ValueError`` naming the tensor file and the tensor.
        """
        with _open_tensors(self.tensors_path, self.manifest) as handle:
            for name, info in self.manifest["layers"].items():
                entry = _layer_entry(handle, name, info)
                serialization.validate_layer_entry(name, entry, str(self.tensors_path))
                yield name, entry


def open_folder(path: str | os.PathLike[str]) -> ProjectorFolder:
    """Validate a projector folder's manifest and verify its tensor file's checksum.

    Raises ``FileNotFoundError`` for a missing folder, manifest or tensor file, ``NotADirectoryError``
    for a file, and ``ValueError`` naming the file and field for anything corrupt or foreign.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"projector folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a projector folder (the folder save_pretrained wrote)")
    manifest_path = folder / CONFIG_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{folder} contains no {CONFIG_NAME}: not a saved torch_crisp projector (or its first save "
            "was interrupted); create one with projector.save_pretrained(path) or `torch-crisp collect`"
        )
    manifest = _parse_json(manifest_path)
    _check_manifest(manifest, str(manifest_path))
    tensors_path = folder / manifest["tensors_file"]
    if not tensors_path.is_file():
        raise FileNotFoundError(f"projector folder {folder}: {tensors_path.name} named by {CONFIG_NAME} is missing")
    if manifest["format_version"] >= 2 and _sha256(tensors_path) != manifest["tensors_sha256"]:
        raise ValueError(
            f"{tensors_path} does not match the SHA-256 recorded in {CONFIG_NAME}: the file is corrupt or was "
            "modified; restore the folder from a copy or save the projector again"
        )
    return ProjectorFolder(folder, manifest, tensors_path)


def read_folder(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a projector folder without a model: ``(state_dict, manifest)``.

    The state dict has the layout of :func:`serialization.state_dict` (tensors on the CPU;
    fingerprints include the weight hashes); the manifest is the parsed ``crisp_config.json``
    (``metadata`` included). Everything is validated (:func:`open_folder`,
    :meth:`ProjectorFolder.layers`).
    """
    folder = open_folder(path)
    sd = {
        "format": FORMAT_NAME,
        "format_version": serialization.FORMAT_VERSION,  # the layout of the dict, whatever the folder's version
        "config": folder.manifest["config"],
        "layers": dict(folder.layers()),
    }
    return sd, folder.manifest


def _parse_json(path: Path) -> Any:
    def refuse(constant: str) -> None:  # NaN and Infinity are not JSON, whatever Python's json accepts
        raise ValueError(f"non-standard constant {constant}")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested too deeply)") from None


def _check_manifest(manifest: Any, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the field unless the manifest is well formed."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{source} is not a torch_crisp projector manifest (it lacks format={FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # type(): True is an int, but not a version
        newer = type(version) is int and version > FORMAT_VERSION
        raise ValueError(
            f"{source} has format_version {version!r:.40}; this torch_crisp reads {READABLE_VERSIONS} "
            f"({'upgrade torch_crisp' if newer else 'the manifest is corrupt: save the projector again'})"
        )
    expected = _MANIFEST_KEYS | ({"tensors_sha256"} if version >= 2 else set())
    if set(manifest) != expected:
        missing, unknown = sorted(expected - set(manifest)), sorted(set(manifest) - expected)
        raise ValueError(f"{source}: missing fields {missing}, unknown fields {unknown}; the manifest is corrupt")
    checks = {
        "torch_crisp_version": isinstance(manifest["torch_crisp_version"], str),
        "save_id": isinstance(manifest["save_id"], str) and bool(re.fullmatch(_SAVE_ID, manifest["save_id"])),
        "tensors_file": manifest["tensors_file"] == _tensors_name(str(manifest["save_id"])),
        "tensors_sha256": version < 2 or bool(_SHA256.fullmatch(str(manifest["tensors_sha256"]))),
        "metadata": isinstance(manifest["metadata"], dict),
        "layers": isinstance(manifest["layers"], dict) and bool(manifest["layers"]),
    }
    bad = [f"{key}={manifest[key]!r:.60}" for key, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{source} has invalid fields: {', '.join(bad)}; the manifest is corrupt")
    serialization.config_from_dict(manifest["config"], source)
    for name, info in manifest["layers"].items():
        _check_manifest_layer(name, info, source)


def _check_manifest_layer(name: str, info: Any, source: str) -> None:
    where = f"{source}: layers[{name!r:.200}]"
    if not name or len(name) > 1000:
        raise ValueError(f"{where}: layer names must be non-empty strings of at most 1000 characters")
    if not isinstance(info, dict) or any(type(info.get(flag)) is not bool for flag in _LAYER_FLAGS):
        raise ValueError(f"{where} must be an object whose {', '.join(_LAYER_FLAGS)} are true or false")
    expected = {"fingerprint", "num_tokens", *_LAYER_FLAGS}
    expected |= {"basis_curvature"} if info["has_basis"] else set()
    expected |= {"num_examples"} if info["has_correction"] else set()
    if set(info) != expected:
        raise ValueError(f"{where} must have exactly the fields {sorted(expected)}, got {sorted(info)}")
    if info["has_basis"] and info["basis_curvature"] not in CURVATURES:
        raise ValueError(f"{where}.basis_curvature must be one of {CURVATURES}, got {info['basis_curvature']!r:.40}")
    serialization.check_fingerprint(info["fingerprint"], name, source)
    check_count(info["num_tokens"], f"layers[{name!r}].num_tokens", source, positive=info["has_factors"])
    if info["has_correction"]:
        check_count(info["num_examples"], f"layers[{name!r}].num_examples", source, positive=True)


def _tensor_keys(manifest: Mapping[str, Any]) -> set[str]:
    """The tensors the manifest says the file holds."""
    keys: set[str] = set()
    for name, info in manifest["layers"].items():
        keys |= {f"{name}.A_sum", f"{name}.S_sum"} if info["has_factors"] else set()
        keys |= {f"{name}.{key}" for key in (*BASIS_TENSORS, "tau")} if info["has_basis"] else set()
        keys |= {f"{name}.correction_sum"} if info["has_correction"] else set()
    return keys


@contextmanager
def _open_tensors(path: Path, manifest: Mapping[str, Any]) -> Iterator[Any]:
    """The open safetensors file after checking its header against the manifest."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != FORMAT_NAME or header.get("save_id") != manifest["save_id"]:
                raise ValueError(f"{path} was not written by the save that wrote {CONFIG_NAME} (save ids differ)")
            present, expected = set(handle.keys()), _tensor_keys(manifest)
            if present != expected:
                missing, unknown = sorted(expected - present)[:5], sorted(present - expected)[:5]
                raise ValueError(f"{path} does not hold the tensors {CONFIG_NAME} names (missing {missing}, "
                                 f"unexpected {unknown}); the folder is corrupt: save the projector again")
            yield handle
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); it is truncated or "
            "corrupt: restore the folder from a copy or save the projector again"
        ) from None


def _layer_entry(handle: Any, name: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """One layer's state-dict entry from the open tensor file and its manifest record."""
    def get(key: str) -> Tensor:
        return handle.get_tensor(f"{name}.{key}")

    basis = None
    if info["has_basis"]:
        # tau stays a one-element tensor here; validation reads it as a number
        basis = {**{key: get(key) for key in (*BASIS_TENSORS, "tau")}, "curvature": info["basis_curvature"]}
    return {
        "fingerprint": info["fingerprint"],
        "num_tokens": info["num_tokens"],
        "A_sum": get("A_sum") if info["has_factors"] else None,
        "S_sum": get("S_sum") if info["has_factors"] else None,
        "correction_sum": get("correction_sum") if info["has_correction"] else None,
        "num_examples": info.get("num_examples", 0),
        "basis": basis,
    }


# --------------------------------------------------------------------------- file helpers
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
