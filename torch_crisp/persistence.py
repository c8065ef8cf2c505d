"""Durable projector state: ``weights_only``-safe state dicts and atomically written folders.

Collecting K-FAC factors is the expensive, one-off part of CrispEdit; this module makes the
collected state reusable. What is saved are the factor **sums** ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ``
and the (possibly weighted) token count ``N`` of every layer, so a loaded projector can keep
accumulating exactly as if it had never been saved. Eigenbases are optional: by default they are
recomputed on load from the saved sums with the saved ``gamma`` (deterministic for the same
device and library versions, so projections are reproduced bit for bit).

A projector **folder** holds

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

import hashlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CrispConfig
from .state import Basis, LayerState

if TYPE_CHECKING:  # the projector imports this module; avoid the cycle at run time
    from .projector import CrispProjector

__all__ = [
    "CONFIG_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerFingerprint",
    "align_layer_names",
    "from_pretrained",
    "load_state_dict",
    "read_folder",
    "save_pretrained",
    "state_dict",
]

FORMAT_NAME = "torch_crisp.projector"
FORMAT_VERSION = 1
CONFIG_NAME = "crisp_config.json"
_TENSORS_PREFIX = "crisp_tensors-"
_TENSORS_SUFFIX = ".safetensors"
_PARTIAL_SUFFIX = ".partial"
_BASIS_TENSORS = ("eig_in", "U_in", "eig_out", "U_out", "mask")

P = TypeVar("P", bound="CrispProjector")


# --------------------------------------------------------------------------- fingerprints
@dataclass(frozen=True)
class LayerFingerprint:
    """What identifies a target layer: the factors only fit a layer with the same geometry.

    ``d_in`` excludes the bias; the factor ``A`` has ``d_in + has_bias`` rows. ``module_type``
    and ``weight_dtype`` are informative (factors are orientation-free float sums), as is
    ``weight_sha256``, the hash of the stored weight bytes when the state was saved.
    """

    name: str
    d_out: int
    d_in: int
    has_bias: bool
    module_type: str
    weight_dtype: str
    weight_sha256: str | None = None

    @classmethod
    def of(cls, state: LayerState, hash_weight: bool = False) -> LayerFingerprint:
        geometry = state.geometry
        return cls(
            name=state.name,
            d_out=geometry.d_out,
            d_in=geometry.d_in,
            has_bias=geometry.has_bias,
            module_type=type(geometry.module).__name__,
            weight_dtype=str(geometry.weight.dtype).removeprefix("torch."),
            weight_sha256=weight_sha256(geometry.weight) if hash_weight else None,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerFingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(d_out, d_in[+1])`` of the projected ``[W | b]`` matrix."""
        return (self.d_out, self.d_in + int(self.has_bias))


def weight_sha256(weight: Tensor) -> str | None:
    """SHA-256 of a weight's dtype, shape and bytes; ``None`` for sharded (``DTensor``) weights.

    A sharded weight would need a collective to gather, which a save on one rank cannot do.
    """
    if hasattr(weight, "placements") or weight.device.type == "meta":
        return None
    t = weight.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    digest.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def align_layer_names(saved: Sequence[str], current: Sequence[str]) -> dict[str, str]:
    """``{current name: saved name}`` when the two sets differ only by a wrapper prefix.

    A model wrapped after collection (peft's ``PeftModel`` adds ``base_model.model.``) or unwrapped
    since names the same layers with or without one leading prefix ending in ``"."``. If one prefix
    maps every name of one set onto the other, the names are aligned through it; otherwise names
    are compared as they are (and mismatches reported).
    """
    if set(saved) == set(current) or not saved or len(saved) != len(current):
        return {name: name for name in current}
    for longer, shorter, current_is_longer in ((current, saved, True), (saved, current, False)):
        first = longer[0]
        for candidate in shorter:
            if not first.endswith("." + candidate):
                continue
            prefix = first[: len(first) - len(candidate)]
            stripped = {name[len(prefix):] for name in longer if name.startswith(prefix)}
            if len(stripped) == len(longer) and stripped == set(shorter):
                if current_is_longer:
                    return {name: name[len(prefix):] for name in current}
                return {name: prefix + name for name in current}
    return {name: name for name in current}


def _check_fingerprints(
    saved: Mapping[str, LayerFingerprint], current: Mapping[str, LayerFingerprint], *, source: str
) -> None:
    """Raise ``ValueError`` listing every structural mismatch; warn on dtype / weight changes."""
    problems: list[str] = []
    missing = [name for name in saved if name not in current]
    extra = [name for name in current if name not in saved]
    if missing:
        problems.append(f"saved layers not among the model's target layers: {missing}")
    if extra:
        problems.append(f"target layers of the model without saved state: {extra}")
    dtype_changes, weight_changes = [], []
    for name, fp in saved.items():
        now = current.get(name)
        if now is None:
            continue
        if fp.shape != now.shape:
            problems.append(
                f"{name}: saved [W|b] shape {fp.shape} (bias={fp.has_bias}) but the model's layer has "
                f"{now.shape} (bias={now.has_bias})"
            )
            continue
        if fp.weight_dtype != now.weight_dtype:
            dtype_changes.append(f"{name} ({fp.weight_dtype} -> {now.weight_dtype})")
        if fp.weight_sha256 and now.weight_sha256 and fp.weight_sha256 != now.weight_sha256:
            weight_changes.append(name)
    if problems:
        raise ValueError(
            f"{source} does not fit this model ({len(problems)} mismatch"
            f"{'es' if len(problems) > 1 else ''}): " + "; ".join(problems)
            + ". Load it into the model it was collected on, with the same target_modules"
        )
    if dtype_changes:
        warnings.warn(
            f"{source}: weight dtype differs from collection time for {', '.join(dtype_changes)}; "
            "the factors are still used as saved",
            stacklevel=4,
        )
    if weight_changes:
        warnings.warn(
            f"{source}: the weights of {len(weight_changes)} layer(s) differ from those the factors were "
            f"saved with ({', '.join(weight_changes)}); the curvature describes a different checkpoint "
            "and the protection of the capability may be weaker",
            stacklevel=4,
        )


# --------------------------------------------------------------------------- state dicts
def state_dict(projector: CrispProjector, include_basis: bool = False) -> dict[str, Any]:
    """A ``torch.load(weights_only=True)``-safe snapshot of a projector.

    Layout::

        {"format": "torch_crisp.projector", "format_version": 1,
         "config": CrispConfig.to_dict(),
         "layers": {name: {"fingerprint": {...}, "num_tokens": N,
                           "A_sum": Tensor | None, "S_sum": Tensor | None,
                           "correction_sum": Tensor | None, "num_examples": n,
                           "basis": {"eig_in", "U_in", "eig_out", "U_out", "mask", "tau",
                                     "curvature"} | None}}}

    ``A_sum = Σ_t a_t a_tᵀ`` (bias-augmented inputs) and ``S_sum = Σ_t g_t g_tᵀ`` are *sums*, so
    ``A = A_sum / N``. ``correction_sum = Σ_n (U_outᵀ G_n U_in)²`` over ``n`` examples is EK-FAC's
    second pass; it is expressed in the current eigenbasis, so a layer that has one always saves
    its basis too, whatever ``include_basis`` says. As with ``nn.Module.state_dict``, tensors are
    shared with the projector, not copied: serialise the dict (or clone it) before collecting more.
    """
    layers: dict[str, Any] = {}
    for name, layer in projector.layers.items():
        entry: dict[str, Any] = {
            "fingerprint": LayerFingerprint.of(layer).to_dict(),
            "num_tokens": layer.num_tokens,
            "A_sum": layer.A_sum,
            "S_sum": layer.S_sum,
            "correction_sum": layer.correction_sum,
            "num_examples": layer.num_examples,
            "basis": None,
        }
        if (include_basis or layer.correction_sum is not None) and layer.basis is not None:
            b = layer.basis
            entry["basis"] = {
                "eig_in": b.eig_in, "U_in": b.U_in, "eig_out": b.eig_out, "U_out": b.U_out,
                "mask": b.mask, "tau": float(b.tau), "curvature": b.curvature,
            }
        layers[name] = entry
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": projector.config.to_dict(),
        "layers": layers,
    }


def _parse_config(data: Mapping[str, Any], source: str) -> CrispConfig:
    known = {f.name for f in fields(CrispConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{source} has config fields this torch_crisp does not know: {unknown} (saved by a newer "
            "version? upgrade torch_crisp)"
        )
    return CrispConfig(**data)


def _check_format(sd: Mapping[str, Any], source: str) -> None:
    if not isinstance(sd, Mapping) or sd.get("format") != FORMAT_NAME or "layers" not in sd:
        raise ValueError(f"{source} is not a torch_crisp projector state (missing format={FORMAT_NAME!r})")
    version = sd.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version!r}; this torch_crisp reads up to {FORMAT_VERSION} "
            "(upgrade torch_crisp)"
        )


def _as_factor(t: Any, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, what: str) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} should be a tensor of shape {shape}, got {got}")
    # copy=True: a loaded projector must not alias the tensors of the dict (or of another projector)
    return t.to(device=device, dtype=dtype, copy=True)


def load_state_dict(projector: CrispProjector, sd: Mapping[str, Any], *, source: str = "the state dict") -> None:
    """Restore a projector from :func:`state_dict` output (or a folder read by :func:`read_folder`).

    The layer set and shapes must match (``ValueError`` listing the mismatches). The saved
    ``gamma``, ``fisher``, ``curvature`` and ``factor_dtype`` replace the projector's (as
    ``Optimizer.load_state_dict`` restores hyper-parameters); ``target_modules`` stays as is since
    the layers already matched. Bases that were not saved are recomputed from the sums. Nothing
    is modified if validation fails.
    """
    _check_format(sd, source)
    config = _parse_config(sd.get("config", {}), source)
    sd = _with_current_names(sd, list(projector.layers))
    saved_fps = {name: LayerFingerprint.from_dict(entry["fingerprint"]) for name, entry in sd["layers"].items()}
    current_fps = {name: LayerFingerprint.of(layer) for name, layer in projector.layers.items()}
    _check_fingerprints(saved_fps, current_fps, source=source)

    _load_checked(projector, sd, config, source)


def _with_current_names(sd: Mapping[str, Any], current: list[str]) -> Mapping[str, Any]:
    """``sd`` with its layers renamed to the projector's names if they differ by a wrapper prefix."""
    mapping = align_layer_names(list(sd["layers"]), current)
    if all(a == b for a, b in mapping.items()):
        return sd
    layers = {now: {**sd["layers"][was], "fingerprint": {**sd["layers"][was]["fingerprint"], "name": now}}
              for now, was in mapping.items()}
    return {**sd, "layers": layers}


def _load_checked(projector: CrispProjector, sd: Mapping[str, Any], config: CrispConfig, source: str) -> None:
    """Install a validated state into the projector's layers."""
    saved_layers: Mapping[str, Any] = sd["layers"]
    # Build everything first so a bad entry leaves the projector untouched.
    dtype = config.torch_factor_dtype
    staged: list[tuple[LayerState, Tensor | None, Tensor | None, float, Basis | None, Tensor | None, float]] = []
    for name, layer in projector.layers.items():
        entry = saved_layers[name]
        device = layer.geometry.weight.device
        d_out, d_in = layer.geometry.d_out, layer.geometry.d_in_augmented
        num_tokens = entry.get("num_tokens", 0)
        if isinstance(num_tokens, Tensor):
            num_tokens = num_tokens.item()
        A_sum = S_sum = None
        if entry.get("A_sum") is not None or entry.get("S_sum") is not None:
            A_sum = _as_factor(entry.get("A_sum"), (d_in, d_in), dtype, device, f"{name}.A_sum")
            S_sum = _as_factor(entry.get("S_sum"), (d_out, d_out), dtype, device, f"{name}.S_sum")
        basis = _parse_basis(entry.get("basis"), name, (d_out, d_in), device)
        correction, num_examples = None, entry.get("num_examples", 0)
        if entry.get("correction_sum") is not None:
            if basis is None:
                raise ValueError(f"{source}: {name} has an EK-FAC correction but not the basis it belongs to")
            t = entry["correction_sum"]
            correction = _as_factor(t, (d_out, d_in), t.dtype if isinstance(t, Tensor) else dtype, device,
                                    f"{name}.correction_sum")
        staged.append((layer, A_sum, S_sum, num_tokens, basis, correction, num_examples))

    for key in ("gamma", "fisher", "curvature", "factor_dtype"):
        setattr(projector.config, key, getattr(config, key))
    recomputed_ekfac = []
    for layer, A_sum, S_sum, num_tokens, basis, correction, num_examples in staged:
        layer.reset()
        layer.factor_dtype = dtype
        layer.A_sum, layer.S_sum, layer.num_tokens = A_sum, S_sum, num_tokens
        if basis is not None:
            layer.basis = basis
            layer.correction_sum, layer.num_examples = correction, (num_examples if correction is not None else 0)
        elif num_tokens:
            # Locally, even in a process group: the loaded sums are already global, and the
            # projector's distributed update_basis() would all-reduce them once more.
            layer.update_basis(config.gamma, device=layer.geometry.weight.device, curvature=config.curvature)
            if config.curvature == "ekfac":
                recomputed_ekfac.append(layer.name)
    if hasattr(projector, "_holds_unreduced_data"):
        # loaded sums are global sums (torch_crisp.distributed): the next capture on ranks > 0
        # must start from zero again rather than all-reduce them a second time
        projector._holds_unreduced_data = False
    if recomputed_ekfac:
        warnings.warn(
            f"{source}: curvature='ekfac' but no EK-FAC correction was saved for {recomputed_ekfac}; their "
            "masks are K-FAC's until projector.correct_curvature(batches) runs the second pass",
            stacklevel=4,
        )
    _after_basis_change(projector)


def _after_basis_change(projector: CrispProjector) -> None:
    # What CrispProjector.update_basis() does after new bases: LoRA adapters move into the kept
    # rectangle of the basis (idempotent when they are there already).
    projector.project_lora_parameters_()


def _parse_basis(data: Any, name: str, shape: tuple[int, int], device: torch.device) -> Basis | None:
    if data is None:
        return None
    d_out, d_in = shape
    expected = {"eig_in": (d_in,), "U_in": (d_in, d_in), "eig_out": (d_out,), "U_out": (d_out, d_out), "mask": shape}
    tensors = {}
    for key, want in expected.items():
        t = data.get(key)
        if not isinstance(t, Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{name}.basis.{key} should be a tensor of shape {want}")
        tensors[key] = t.to(device=device, copy=True)
    tau = data.get("tau")
    if isinstance(tau, Tensor):
        tau = tau.item()
    if not isinstance(tau, (int, float)):
        raise ValueError(f"{name}.basis.tau should be a number, got {type(tau).__name__}")
    return Basis(tau=float(tau), curvature=str(data.get("curvature", "kfac")), **tensors)


# --------------------------------------------------------------------------- folders
def save_pretrained(
    projector: CrispProjector,
    path: str | os.PathLike[str],
    *,
    include_basis: bool = False,
    hash_weights: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the projector to the folder ``path`` (created if needed) atomically.

    Args:
        include_basis: also store eigenbases and masks (larger; skips the eigendecompositions
            on load). Without them the bases are recomputed from the sums.
        hash_weights: record a SHA-256 of every target weight so that loading into different
            weights warns. Hashing reads every target weight once.
        metadata: JSON-serialisable information for humans (data set, model path, …).

    Returns the folder path. Other files in the folder are left alone.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; choose a folder path for the projector")
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict(projector, include_basis=include_basis)
    save_id = secrets.token_hex(6)
    tensors_name = f"{_TENSORS_PREFIX}{save_id}{_TENSORS_SUFFIX}"

    tensors: dict[str, Tensor] = {}
    manifest_layers: dict[str, Any] = {}
    for name, entry in sd["layers"].items():
        fingerprint = LayerFingerprint.of(projector.layers[name], hash_weight=hash_weights).to_dict()
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
            for key in _BASIS_TENSORS:
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
        "torch_crisp_version": _library_version(),
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
    _check_format(manifest, source)
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
            basis = {key: get(name, key) for key in _BASIS_TENSORS}
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


def from_pretrained(
    cls: type[P], path: str | os.PathLike[str], model: nn.Module, *, gamma: float | None = None
) -> P:
    """Build a projector of class ``cls`` on ``model`` from a folder written by :func:`save_pretrained`.

    Target layers are resolved with the saved ``target_modules``; names and ``[W|b]`` shapes must
    equal the saved fingerprints (``ValueError`` listing every mismatch). Differing weight hashes
    or dtypes only warn. ``gamma`` overrides the saved energy threshold (the masks are then
    recomputed from the saved factors).
    """
    sd, _ = read_folder(path)
    source = f"projector folder {Path(path)}"
    config = _parse_config(sd["config"], source)
    try:
        projector = cls(model, config)
    except ValueError as err:
        raise ValueError(f"{source} does not fit this model: {err}") from None
    sd = _with_current_names(sd, list(projector.layers))
    saved = {name: LayerFingerprint.from_dict(entry["fingerprint"]) for name, entry in sd["layers"].items()}
    current = {
        # hash only where a saved hash exists to compare against (hashing reads the weights)
        name: LayerFingerprint.of(layer, hash_weight=name in saved and bool(saved[name].weight_sha256))
        for name, layer in projector.layers.items()
    }
    _check_fingerprints(saved, current, source=source)
    _load_checked(projector, sd, config, source)
    if gamma is not None and gamma != projector.config.gamma:
        _rethreshold(projector, gamma)
    return projector


def _rethreshold(projector: CrispProjector, gamma: float) -> None:
    """Masks for a new ``gamma`` from the loaded state, as a fresh collection would compute them.

    Layer by layer and locally (see :func:`_load_checked`). EK-FAC layers with a correction keep
    their basis (the correction lives in it) and re-threshold the corrected curvature.
    """
    projector.config.gamma = gamma
    projector.config.validate()
    for layer in projector.layers.values():
        if layer.basis is not None and layer.correction_sum is not None and layer.basis.curvature == "ekfac":
            layer.apply_correction(gamma)
        elif layer.num_tokens:
            layer.update_basis(gamma, device=layer.geometry.weight.device, curvature=projector.config.curvature)
    _after_basis_change(projector)


# --------------------------------------------------------------------------- file helpers
def _library_version() -> str:
    from . import __version__

    return __version__


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
