"""Which modules are projected, and how a module's parameters map to the logical ``W``.

Target discovery (:func:`find_target_modules`, peft-style ``target_modules``) is the one place
that decides which layers a spec selects: the Python API and both command lines use it. peft
tuner wrappers (LoRA) are seen through here, by duck typing (peft is never imported).

A projected layer computes ``z = W a + b`` with a logical weight ``W`` of shape
``(d_out, d_in)``. ``nn.Linear`` stores ``W`` as is; Hugging Face's ``Conv1D`` (GPT-2 family)
stores its transpose. The orientation is decided by the module type and weight shape only.
With a bias, the gradient matrix is ``[∂W | ∂b]`` of shape ``(d_out, d_in + 1)`` so the bias
column is projected together with ``W`` (matching the bias-augmented input factor).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import TargetModules

__all__ = [
    "LinearGeometry",
    "find_target_modules",
    "innermost_base_layer",
    "is_lora_layer",
    "is_projectable",
    "is_tuner_layer",
    "named_projectable_modules",
    "tied_target_weights",
]


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D without importing transformers (the core must not).
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf


def _is_quantized(module: nn.Module) -> bool:
    """bitsandbytes 4/8-bit layers (and any integer-stored weight): packed, not the logical W."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and (
        not weight.is_floating_point() or hasattr(weight, "quant_state") or hasattr(weight, "SCB")
    )


def is_projectable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


# ----------------------------------------------------------------------------- peft wrappers
def is_tuner_layer(module: nn.Module) -> bool:
    """A peft tuner wrapper (any method): a module that wraps a ``base_layer`` module."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def is_lora_layer(module: nn.Module) -> bool:
    """A LoRA wrapper: ``base_layer`` plus ``lora_A`` / ``lora_B`` module dicts and ``scaling``."""
    return (
        is_tuner_layer(module)
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(module, "scaling", None), Mapping)
    )


def innermost_base_layer(module: nn.Module) -> nn.Module:
    """Follow ``base_layer`` links (wrappers can nest) down to the wrapped module."""
    while is_tuner_layer(module):
        module = module.base_layer  # type: ignore[assignment]
    return module


def named_projectable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every projectable layer, seeing through peft tuner wrappers.

    A wrapper is reported under its own name (the name the user's ``target_modules`` refers to)
    with its innermost base layer as the module; nothing inside a wrapper (``base_layer``,
    ``lora_A.default``, ``lora_B.default``, ...) is reported, so ``"all-linear"`` never selects
    the adapters' own small linear layers.
    """
    wrapper_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in wrapper_prefixes):
            continue
        if is_tuner_layer(module):
            wrapper_prefixes.append(name + ".")
            base = innermost_base_layer(module)
            if is_projectable(base):
                yield name, base
        elif is_projectable(module):
            yield name, module


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class LinearGeometry:
    """How to read and write the gradient matrix ``[∂W | ∂b]`` of one module."""

    module: nn.Module
    transposed: bool  # True for Conv1D: module.weight is Wᵀ

    @classmethod
    def of(cls, module: nn.Module, name: str = "") -> LinearGeometry:
        if not is_projectable(module):
            raise TypeError(f"{type(module).__name__} is not an nn.Linear or Hugging Face Conv1D")
        if _is_quantized(module):
            raise ValueError(
                f"layer {name or type(module).__name__!r} holds quantized weights ({type(module).__name__}, "
                f"{module.weight.dtype}): their stored shape is not the layer's W, and a 4/8-bit base model "
                "(QLoRA) cannot be projected. Collect and edit on the model in float32/bf16/fp16"
            )
        return cls(module=module, transposed=_is_hf_conv1d(module))

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def d_out(self) -> int:
        return self.weight.shape[0 if not self.transposed else 1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1 if not self.transposed else 0]

    @property
    def d_in_augmented(self) -> int:
        return self.d_in + int(self.has_bias)

    def parameters(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def as_matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``[W | b]`` of shape ``(d_out, d_in[+1])`` from tensors shaped like the parameters."""
        w = weight.mT if self.transposed else weight
        if bias is None:
            return w
        return torch.cat([w, bias.unsqueeze(-1)], dim=-1)

    def split_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`as_matrix`: tensors shaped like ``(weight, bias)``."""
        w = matrix[..., : self.d_in]
        w = w.mT if self.transposed else w
        bias = matrix[..., self.d_in] if self.has_bias else None
        return w, bias


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def find_target_modules(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Module]:
    """Resolve a peft-style ``target_modules`` spec to ``{name: module}`` in model order.

    Only projectable modules (``nn.Linear`` / ``Conv1D``) are returned. Raises ``ValueError``
    naming the pattern when a suffix, a regex or ``"all-linear"`` matches no projectable module.
    Warns (once, naming both) when a selected layer's weight is tied to another module's
    (:func:`tied_target_weights`).
    """
    targets = _select_targets(model, target_modules)
    tied = tied_target_weights(model, targets)
    if tied:
        pairs = ", ".join(f"{target!r} with {other!r}" for target, other in tied)
        warnings.warn(
            f"target layers share their weight with other modules (tied embeddings): {pairs}. Projecting their "
            "updates also constrains, and changes, the other module; leave such layers out of target_modules "
            "to keep the other module unchanged",
            stacklevel=3,
        )
    return targets


def tied_target_weights(model: nn.Module, targets: Mapping[str, nn.Module]) -> list[tuple[str, str]]:
    """``(target, other module)`` for every target whose weight is also another module's parameter.

    With tied embeddings one ``Parameter`` is two modules' weight (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``), so a projected update of the target is an update of the other.
    """
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    pairs = []
    for name, module in targets.items():
        weight = getattr(module, "weight", None)
        for other in owners.get(id(weight), []) if weight is not None else []:
            if not other.startswith(name + "."):  # the target's own name, peft's base_layer included
                pairs.append((name, other.rpartition(".")[0] or other))
    return pairs


def _select_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Module]:
    # peft tuner wrappers (LoRA) count as the layer they wrap, under the wrapper's name
    linear: list[tuple[str, nn.Module]] = list(named_projectable_modules(model))
    if not linear:
        raise ValueError(
            f"{type(model).__name__} contains no nn.Linear or Conv1D module; nothing can be projected"
        )

    def examples() -> str:
        # distinct name endings ("mlp.down_proj") say more than the first few full names
        endings = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n, _ in linear))
        shown = ", ".join(endings[:12]) + (", …" if len(endings) > 12 else "")
        return f"linear modules of this model end in: {shown}"

    if target_modules == "all-linear":
        output = _output_embedding(model)
        selected = [(n, m) for n, m in linear if m is not output]
        if not selected:
            raise ValueError("target_modules='all-linear' matched nothing besides the output embedding")
        return dict(selected)

    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [(n, m) for n, m in linear if pattern.fullmatch(n)]
        if not selected:
            raise ValueError(
                f"target_modules regex {target_modules!r} matches no linear module (it must match "
                f"the full module name); {examples()}"
            )
        return dict(selected)

    def matches(name: str, suffix: str) -> bool:
        return name == suffix or name.endswith("." + suffix)

    for suffix in target_modules:
        if not any(matches(n, suffix) for n, _ in linear):
            raise ValueError(f"target_modules entry {suffix!r} matches no linear module; {examples()}")
    return {n: m for n, m in linear if any(matches(n, s) for s in target_modules)}
