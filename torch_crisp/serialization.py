"""The projector's state as a ``weights_only``-safe dict, and its validated restoration.

The factor **sums** and (weighted) token counts are saved, so a restored projector keeps
accumulating as if never saved; eigenbases are optional (recomputed from the sums). A fingerprint
per layer (name, shape, bias, module type, weight dtype, optionally a SHA-256 of the weight) says
which layers the factors fit. Layout of :func:`state_dict`::

    {"format": "torch_crisp.projector", "format_version": 1,
     "config": CrispConfig.to_dict(),
     "layers": {name: {"fingerprint": {...}, "num_tokens": N,
                       "A_sum": Tensor | None, "S_sum": Tensor | None,
                       "correction_sum": Tensor | None, "num_examples": n,
                       "basis": {"eig_in", "U_in", "eig_out", "U_out", "mask", "tau",
                                 "curvature"} | None}}}

A state dict is untrusted input: :func:`validate_state_dict` checks every field's type and range,
tensor shapes, dtypes and finiteness before anything is restored. Folders on disk are
:mod:`torch_crisp.persistence`'s business; this module works on ``{name: LayerState}`` and a config.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from .basis import Basis
from .config import CURVATURES, CrispConfig
from .state import LayerState

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "LayerFingerprint", "align_layer_names", "check_count", "check_fingerprint",
    "check_format", "config_from_dict", "load_state_dict", "loading_config", "parse_config", "state_dict",
    "validate_layer_entry", "validate_state_dict", "weight_sha256",
]

FORMAT_NAME = "torch_crisp.projector"
FORMAT_VERSION = 1  # of the state-dict layout (folders have their own, see persistence)
_FLOAT_DTYPES = {name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64")}
BASIS_TENSORS = ("eig_in", "U_in", "eig_out", "U_out", "mask")
LAYER_KEYS = ("fingerprint", "num_tokens", "A_sum", "S_sum", "correction_sum", "num_examples", "basis")
# Counts beyond 2^53 are not exact float64 integers: no corpus reaches them, corruption does (and
# 1e300 tokens would scale the factors to zero, i.e. keep every direction). Bounds on a config read
# from a file keep validating it cheap.
MAX_COUNT = float(2**53)
_FORMAT_1_CONFIG = ("target_modules", "gamma", "fisher", "curvature", "factor_dtype")
_MAX_TARGET_ENTRIES = _MAX_PATTERN_CHARS = 10_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    def of(cls, state: LayerState, hash_weight: bool = False, hash_as: str | None = None) -> LayerFingerprint:
        """``hash_as``: hash the weight cast to this (saved) float dtype: a change of dtype alone is no change."""
        geometry, cast = state.geometry, _FLOAT_DTYPES.get(hash_as or "")
        weight = geometry.weight if cast is None else geometry.weight.to(cast)
        return cls(
            name=state.name,
            d_out=geometry.d_out,
            d_in=geometry.d_in,
            has_bias=geometry.has_bias,
            module_type=type(geometry.module).__name__,
            weight_dtype=str(geometry.weight.dtype).removeprefix("torch."),
            weight_sha256=weight_sha256(weight) if hash_weight else None,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerFingerprint:
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

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


# --------------------------------------------------------------------------- validation
def check_format(sd: Any, source: str) -> None:
    """Raise ``ValueError`` unless ``sd`` looks like a projector state this version can read."""
    if not isinstance(sd, Mapping) or sd.get("format") != FORMAT_NAME or not isinstance(sd.get("layers"), Mapping):
        raise ValueError(f"{source} is not a torch_crisp projector state (missing format={FORMAT_NAME!r})")
    version = sd.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # type(): True is an int, but not a version
        hint = "upgrade torch_crisp" if type(version) is int and version > 1 else "the state is corrupt: save it again"
        raise ValueError(f"{source} has format_version {version!r:.40}; this torch_crisp reads 1 ({hint})")


def config_from_dict(data: Any, source: str) -> CrispConfig:
    """The :class:`CrispConfig` of a saved ``config``: no unknown field, all valid, and every field of
    format 1 present (a default ``gamma`` could block less than the saved one; fields added since
    default to the behaviour before them); else ``ValueError`` naming the field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: config must be an object of CrispConfig fields, got {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in {f.name for f in fields(CrispConfig)})
    if unknown:
        raise ValueError(f"{source} has config fields this torch_crisp does not know: {unknown}; upgrade torch_crisp")
    missing = [key for key in _FORMAT_1_CONFIG if key not in data]
    if missing:
        raise ValueError(f"{source}: config lacks the fields {missing}; the state is incomplete, save it again")
    targets = data["target_modules"]
    entries = [targets] if isinstance(targets, str) else targets if isinstance(targets, (list, tuple)) else []
    if len(entries) > _MAX_TARGET_ENTRIES or any(isinstance(t, str) and len(t) > _MAX_PATTERN_CHARS for t in entries):
        raise ValueError(f"{source}: config.target_modules is implausibly large; the state is corrupt")
    try:
        return CrispConfig(**data)
    except (ValueError, TypeError, re.error, RecursionError, OverflowError) as err:  # a pattern can fail to compile
        raise ValueError(f"{source}: invalid config: {err}") from None


def parse_config(sd: Mapping[str, Any], source: str) -> CrispConfig:
    """The :class:`CrispConfig` saved in a state dict (``ValueError`` for unknown, missing or invalid fields)."""
    check_format(sd, source)
    return config_from_dict(sd.get("config"), source)


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (a one-element tensor counts), else ``None``."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if not isinstance(value, int) or abs(value) <= MAX_COUNT else math.copysign(math.inf, value)


def check_count(value: Any, what: str, source: str, *, positive: bool = False) -> int | float:
    """A token or example count: a number in ``[0, 2^53]`` (``> 0`` with ``positive``); else ``ValueError``."""
    number = _number(value)
    if number is None or not 0.0 <= number <= MAX_COUNT or (positive and number == 0.0):  # NaN fails both
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{source}: {what} must be a finite number {bound} and at most 2^53, got {value!r:.40}")
    return int(number) if number.is_integer() else number


def check_fingerprint(data: Any, name: str, source: str) -> LayerFingerprint:
    """The :class:`LayerFingerprint` of layer ``name`` after checking every field's type and range."""
    where = f"{source}: layers[{name!r}].fingerprint"
    expected = {f.name for f in fields(LayerFingerprint)}
    if not isinstance(data, Mapping) or set(data) - expected or expected - {"weight_sha256"} - set(data):
        got = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where} must be an object with the fields {sorted(expected)}, got {got}")
    digest = data.get("weight_sha256")
    checks = {
        "name": data["name"] == name,
        "d_out": type(data["d_out"]) is int and data["d_out"] >= 1,
        "d_in": type(data["d_in"]) is int and data["d_in"] >= 1,
        "has_bias": type(data["has_bias"]) is bool,
        "module_type": isinstance(data["module_type"], str) and len(data["module_type"]) <= 200,
        "weight_dtype": isinstance(data["weight_dtype"], str) and len(data["weight_dtype"]) <= 200,
        "weight_sha256": digest is None or (isinstance(digest, str) and bool(_SHA256.fullmatch(digest))),
    }
    bad = [f"{key}={data.get(key)!r:.40}" for key, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{where} has invalid fields: {', '.join(bad)} (the state is corrupt: save it again)")
    return LayerFingerprint.from_dict(data)


def _check_tensor(t: Any, shape: tuple[int, ...], what: str, *, non_negative: bool = False) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype not in (torch.float32, torch.float64):
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what} should be a float32 or float64 tensor of shape {shape}, got {got}")
    if not bool(torch.isfinite(t).all()) or (non_negative and bool((t < 0).any())):
        sign = " or negative" if non_negative else ""
        raise ValueError(f"{what} contains NaN, infinite{sign} values; the state is corrupt")


def _check_basis(data: Any, shape: tuple[int, int], where: str) -> None:
    keys = {*BASIS_TENSORS, "tau", "curvature"}
    if not isinstance(data, Mapping) or set(data) != keys:
        got = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{where} must be null or an object with the keys {sorted(keys)}, got {got}")
    d_out, d_in = shape
    for key, want in {"eig_in": (d_in,), "U_in": (d_in, d_in), "eig_out": (d_out,), "U_out": (d_out, d_out)}.items():
        _check_tensor(data[key], want, f"{where}.{key}", non_negative=key.startswith("eig"))
    if not isinstance(data["mask"], Tensor) or tuple(data["mask"].shape) != shape or data["mask"].dtype != torch.bool:
        raise ValueError(f"{where}.mask should be a bool tensor of shape {shape}")
    tau = _number(data["tau"])
    if tau is None or not tau >= 0.0:  # +inf (keep everything) is valid, NaN is not
        raise ValueError(f"{where}.tau should be a number >= 0 (or +inf), got {data['tau']!r:.40}")
    if data["curvature"] not in CURVATURES:
        raise ValueError(f"{where}.curvature must be one of {CURVATURES}, got {data['curvature']!r:.40}")


def validate_layer_entry(name: Any, entry: Any, source: str) -> None:
    """Raise ``ValueError`` naming the field unless ``entry`` is a consistent layer of :func:`state_dict`:
    fingerprint, counts, every tensor's shape (from the fingerprint), dtype and finiteness; factor sums
    with a positive token count (and no count without them), a correction with its basis and examples."""
    where = f"{source}: layers[{name!r:.200}]"
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise ValueError(f"{where}: layer names must be non-empty strings")
    if not isinstance(entry, Mapping) or set(entry) != set(LAYER_KEYS):
        got = sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__
        raise ValueError(f"{where} must be an object with the keys {list(LAYER_KEYS)}, got {got}")
    d_out, d_in = check_fingerprint(entry["fingerprint"], name, source).shape
    has_factors = entry["A_sum"] is not None or entry["S_sum"] is not None
    num_tokens = check_count(entry["num_tokens"], f"layers[{name!r}].num_tokens", source, positive=has_factors)
    if not has_factors and num_tokens:
        raise ValueError(f"{where}.num_tokens is {num_tokens} but the layer has no factor sums")
    if has_factors:
        _check_tensor(entry["A_sum"], (d_in, d_in), f"{where}.A_sum")
        _check_tensor(entry["S_sum"], (d_out, d_out), f"{where}.S_sum")
    if entry["basis"] is not None:
        _check_basis(entry["basis"], (d_out, d_in), f"{where}.basis")
    correction = entry["correction_sum"]
    check_count(entry["num_examples"], f"layers[{name!r}].num_examples", source, positive=correction is not None)
    if correction is not None:
        if entry["basis"] is None:
            raise ValueError(f"{where} has an EK-FAC correction but not the basis it belongs to")
        _check_tensor(correction, (d_out, d_in), f"{where}.correction_sum", non_negative=True)


def validate_state_dict(sd: Any, source: str) -> CrispConfig:
    """Validate a whole state dict (format, config, every layer); return its config."""
    config = parse_config(sd, source)
    if not sd["layers"]:
        raise ValueError(f"{source} holds no layers; the state is corrupt")
    for name, entry in sd["layers"].items():
        validate_layer_entry(name, entry, source)
    return config


# --------------------------------------------------------------------------- from a dict
def loading_config(sd: Mapping[str, Any], source: str) -> CrispConfig:
    """The config to build a projector for a saved state with: the saved one, but a regular expression
    replaced by the saved layer names (as suffixes: peft's ``base_model.model.`` prefix still aligns).

    A saved state is untrusted, and matching its pattern can take forever (``"(.*)*x"``). Suffix
    lists and ``"all-linear"`` compile no pattern and are kept (extra target layers are reported).
    Restore the saved ``target_modules`` on the projector afterwards."""
    config = parse_config(sd, source)
    if not isinstance(config.target_modules, str) or config.target_modules == "all-linear":
        return config
    if not sd["layers"]:
        raise ValueError(f"{source} holds no layers; the state is corrupt")
    return replace(config, target_modules=list(sd["layers"]))


def _with_current_names(sd: Mapping[str, Any], current: list[str]) -> Mapping[str, Any]:
    """``sd`` with its layers renamed to the current names if they differ by a wrapper prefix."""
    mapping = align_layer_names(list(sd["layers"]), current)
    if all(a == b for a, b in mapping.items()):
        return sd
    layers = {now: {**sd["layers"][was], "fingerprint": {**sd["layers"][was]["fingerprint"], "name": now}}
              for now, was in mapping.items()}
    return {**sd, "layers": layers}


def _copy_to(t: Tensor | None, device: torch.device, dtype: torch.dtype | None = None) -> Tensor | None:
    return None if t is None else t.to(device=device, dtype=dtype, copy=True)


def _restore_basis(data: Mapping[str, Any] | None, device: torch.device) -> Basis | None:
    tensors = {key: _copy_to(data[key], device) for key in BASIS_TENSORS} if data is not None else None
    return None if tensors is None else Basis(tau=float(_number(data["tau"])), curvature=data["curvature"], **tensors)


def load_state_dict(
    layers: Mapping[str, LayerState], sd: Mapping[str, Any], *, source: str, compare_weights: bool = False,
    compute_missing: bool = True,
) -> CrispConfig:
    """Restore ``layers`` from :func:`state_dict` output; return the saved config.

    The state is validated first (:func:`validate_state_dict`). The layer set and shapes must match
    (``ValueError`` listing the mismatches); names may differ by one wrapper prefix. With
    ``compare_weights``, the current weights are hashed where the saved fingerprint has a hash and
    a difference warns. Bases that were not saved are recomputed from the sums with the saved
    ``gamma``, locally (the sums are global already), unless not ``compute_missing`` (the caller does
    it, e.g. sharded over ranks). Nothing is modified if validation fails.
    """
    config = validate_state_dict(sd, source)
    sd = _with_current_names(sd, list(layers))
    saved = {name: LayerFingerprint.from_dict(entry["fingerprint"]) for name, entry in sd["layers"].items()}
    # hash only where a saved hash exists to compare against (hashing reads the weights)
    hashed = {name for name, fp in saved.items() if compare_weights and fp.weight_sha256}
    current = {name: LayerFingerprint.of(layer, name in hashed, saved[name].weight_dtype if name in hashed else None)
               for name, layer in layers.items()}
    _check_fingerprints(saved, current, source=source)

    # Copy everything first (restored layers must not alias the dict's tensors, or another
    # projector's), so that a failure leaves the layers untouched.
    dtype, staged = config.torch_factor_dtype, []
    for name, layer in layers.items():
        entry, device = sd["layers"][name], layer.geometry.weight.device
        correction = _copy_to(entry["correction_sum"], device)
        num_examples = check_count(entry["num_examples"], "num_examples", source) if correction is not None else 0
        staged.append((layer, _copy_to(entry["A_sum"], device, dtype), _copy_to(entry["S_sum"], device, dtype),
                       check_count(entry["num_tokens"], "num_tokens", source), _restore_basis(entry["basis"], device),
                       correction, num_examples))
    recomputed_ekfac = []
    for layer, A_sum, S_sum, num_tokens, basis, correction, num_examples in staged:
        layer.reset()
        layer.factor_dtype = dtype
        layer.A_sum, layer.S_sum, layer.token_count = A_sum, S_sum, num_tokens
        if basis is not None:
            layer.basis = basis
            layer.correction_sum, layer.example_count = correction, num_examples
        elif num_tokens and compute_missing:
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
