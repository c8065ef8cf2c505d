"""The projector's state as a ``weights_only``-safe dict, and its validated restoration.

What is saved are the factor **sums** ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ`` and the (possibly weighted)
token count ``N`` of every layer, so a restored projector keeps accumulating exactly as if it had
never been saved; eigenbases are optional (recomputed from the sums with the saved ``gamma``,
deterministic for the same device and library versions). A fingerprint per layer (name, logical
shape, bias, module type, weight dtype, optionally a SHA-256 of the weight) says which layers the
factors fit. Layout of :func:`state_dict`::

    {"format": "torch_crisp.projector", "format_version": 1,
     "config": CrispConfig.to_dict(),
     "layers": {name: {"fingerprint": {...}, "num_tokens": N,
                       "A_sum": Tensor | None, "S_sum": Tensor | None,
                       "correction_sum": Tensor | None, "num_examples": n,
                       "basis": {"eig_in", "U_in", "eig_out", "U_out", "mask", "tau",
                                 "curvature"} | None}}}

Folders on disk (manifest + safetensors) are :mod:`torch_crisp.persistence`'s business; this
module works on ``{name: LayerState}`` and a config only.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .basis import Basis
from .config import CrispConfig
from .state import LayerState

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerFingerprint",
    "align_layer_names",
    "check_format",
    "load_state_dict",
    "parse_config",
    "state_dict",
    "weight_sha256",
]

FORMAT_NAME = "torch_crisp.projector"
FORMAT_VERSION = 1
BASIS_TENSORS = ("eig_in", "U_in", "eig_out", "U_out", "mask")


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
            stacklevel=5,
        )
    if weight_changes:
        warnings.warn(
            f"{source}: the weights of {len(weight_changes)} layer(s) differ from those the factors were "
            f"saved with ({', '.join(weight_changes)}); the curvature describes a different checkpoint "
            "and the protection of the capability may be weaker",
            stacklevel=5,
        )


# --------------------------------------------------------------------------- to a dict
def state_dict(
    layers: Mapping[str, LayerState], config: CrispConfig, *, include_basis: bool = False, hash_weights: bool = False
) -> dict[str, Any]:
    """A ``torch.load(weights_only=True)``-safe snapshot (layout in the module docstring).

    ``correction_sum = Σ_n (U_outᵀ G_n U_in)²`` over ``n`` examples is EK-FAC's second pass; it is
    expressed in the current eigenbasis, so a layer that has one always saves its basis too,
    whatever ``include_basis`` says. As with ``nn.Module.state_dict``, tensors are shared with the
    layers, not copied: serialise the dict (or clone it) before collecting more.
    """
    entries: dict[str, Any] = {}
    for name, layer in layers.items():
        entry: dict[str, Any] = {
            "fingerprint": LayerFingerprint.of(layer, hash_weight=hash_weights).to_dict(),
            "num_tokens": layer.token_count,
            "A_sum": layer.A_sum,
            "S_sum": layer.S_sum,
            "correction_sum": layer.correction_sum,
            "num_examples": layer.example_count,
            "basis": None,
        }
        if (include_basis or layer.correction_sum is not None) and layer.basis is not None:
            b = layer.basis
            entry["basis"] = {
                "eig_in": b.eig_in, "U_in": b.U_in, "eig_out": b.eig_out, "U_out": b.U_out,
                "mask": b.mask, "tau": float(b.tau), "curvature": b.curvature,
            }
        entries[name] = entry
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_dict(), "layers": entries}


# --------------------------------------------------------------------------- from a dict
def check_format(sd: Any, source: str) -> None:
    """Raise ``ValueError`` unless ``sd`` looks like a projector state this version can read."""
    if not isinstance(sd, Mapping) or sd.get("format") != FORMAT_NAME or "layers" not in sd:
        raise ValueError(f"{source} is not a torch_crisp projector state (missing format={FORMAT_NAME!r})")
    version = sd.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version!r}; this torch_crisp reads up to {FORMAT_VERSION} "
            "(upgrade torch_crisp)"
        )


def parse_config(sd: Mapping[str, Any], source: str) -> CrispConfig:
    """The :class:`CrispConfig` saved in a state dict (``ValueError`` for unknown or invalid fields)."""
    check_format(sd, source)
    data = sd.get("config", {})
    known = {f.name for f in fields(CrispConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{source} has config fields this torch_crisp does not know: {unknown} (saved by a newer "
            "version? upgrade torch_crisp)"
        )
    return CrispConfig(**data)


def _with_current_names(sd: Mapping[str, Any], current: list[str]) -> Mapping[str, Any]:
    """``sd`` with its layers renamed to the current names if they differ by a wrapper prefix."""
    mapping = align_layer_names(list(sd["layers"]), current)
    if all(a == b for a, b in mapping.items()):
        return sd
    layers = {now: {**sd["layers"][was], "fingerprint": {**sd["layers"][was]["fingerprint"], "name": now}}
              for now, was in mapping.items()}
    return {**sd, "layers": layers}


def _as_factor(t: Any, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, what: str) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} should be a tensor of shape {shape}, got {got}")
    # copy=True: restored layers must not alias the tensors of the dict (or of another projector)
    return t.to(device=device, dtype=dtype, copy=True)


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


def load_state_dict(
    layers: Mapping[str, LayerState], sd: Mapping[str, Any], *, source: str, compare_weights: bool = False
) -> CrispConfig:
    """Restore ``layers`` from :func:`state_dict` output; return the saved config.

    The layer set and shapes must match (``ValueError`` listing the mismatches); names may differ
    by one wrapper prefix. With ``compare_weights``, the current weights are hashed where the
    saved fingerprint has a hash and a difference warns. Bases that were not saved are recomputed
    from the sums with the saved ``gamma``, locally (the sums are global already). Nothing is
    modified if validation fails.
    """
    config = parse_config(sd, source)
    sd = _with_current_names(sd, list(layers))
    saved = {name: LayerFingerprint.from_dict(entry["fingerprint"]) for name, entry in sd["layers"].items()}
    # hash only where a saved hash exists to compare against (hashing reads the weights)
    hashed = {name for name, fp in saved.items() if compare_weights and fp.weight_sha256}
    current = {name: LayerFingerprint.of(layer, hash_weight=name in hashed) for name, layer in layers.items()}
    _check_fingerprints(saved, current, source=source)

    # Build everything first so a bad entry leaves the layers untouched.
    dtype = config.torch_factor_dtype
    staged = []
    for name, layer in layers.items():
        entry = sd["layers"][name]
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

    recomputed_ekfac = []
    for layer, A_sum, S_sum, num_tokens, basis, correction, num_examples in staged:
        layer.reset()
        layer.factor_dtype = dtype
        layer.A_sum, layer.S_sum, layer.token_count = A_sum, S_sum, num_tokens
        if basis is not None:
            layer.basis = basis
            layer.correction_sum, layer.example_count = correction, (num_examples if correction is not None else 0)
        elif num_tokens:
            layer.compute_basis(config.gamma, config.curvature)
            if config.curvature == "ekfac":
                recomputed_ekfac.append(layer.name)
    if recomputed_ekfac:
        warnings.warn(
            f"{source}: curvature='ekfac' but no EK-FAC correction was saved for {recomputed_ekfac}; their "
            "masks are K-FAC's until projector.correct_curvature(batches) runs the second pass",
            stacklevel=4,
        )
    return config
