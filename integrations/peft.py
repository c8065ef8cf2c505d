"""PEFT (LoRA) integration: build the projector on the peft model and check the guarantee.

Nothing extra is needed to *use* LoRA: ``CrispProjector(peft_model, CrispConfig(target_modules=
["mlp.down_proj"]))`` finds the LoRA-wrapped layers, captures curvature on their base layers and
constrains the adapters (:mod:`torch_crisp.lora` explains the kept-rectangle method), and both
:class:`~torch_crisp.CrispOptimizer` and :class:`~torch_crisp.integrations.hf_trainer.CrispCallback`
keep ``ΔW = scaling · B A`` of every projected LoRA layer in its kept subspace after every step.

This module adds what a user wants around it: a check that the model's peft configuration can be
constrained (:func:`check_lora_model`), the measured leak of each layer's ``ΔW`` into blocked
directions (:func:`lora_leakage`), and a per-layer report of what the rectangle keeps
(:func:`lora_report`). peft itself is not imported: models are inspected by duck typing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_crisp import CrispProjector
from torch_crisp.layers import is_lora_layer
from torch_crisp.lora import check_peft_model

__all__ = ["LoraLayerReport", "check_lora_model", "lora_delta", "lora_leakage", "lora_report"]


def check_lora_model(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model``'s peft setup cannot be constrained (non-LoRA method, DoRA,
    LoRA bias, ``bias != "none"``) or if it has no LoRA layer at all."""
    check_peft_model(model)
    if not any(is_lora_layer(m) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no LoRA layer; wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "or use the projector on the plain model for full fine-tuning"
        )


def lora_delta(projector: CrispProjector, name: str) -> Tensor:
    """``[ΔW | 0]`` of one LoRA layer in the projector's logical layout (float32).

    ``ΔW = Σ_adapters scaling · B A`` has shape ``(d_out, d_in)``; a zero bias column is appended
    when the base layer has a bias, since LoRA never changes it.
    """
    try:
        lora_layer = projector.lora_layers[name]
    except KeyError:
        known = list(projector.lora_layers)
        raise KeyError(f"{name!r} is not a LoRA layer of this projector; LoRA layers: {known}") from None
    delta = lora_layer.delta_weight()
    if projector.layers[name].geometry.has_bias:
        delta = torch.cat([delta, delta.new_zeros(delta.shape[0], 1)], dim=1)
    return delta


@torch.no_grad()
def lora_leakage(projector: CrispProjector) -> dict[str, float]:
    """Per LoRA layer, the relative leak ``‖ΔW − P(ΔW)‖ / ‖ΔW‖`` of ``ΔW = scaling · B A`` into
    blocked eigen-directions (0 when ``ΔW = 0``). The guarantee is that it stays at rounding level."""
    leaks: dict[str, float] = {}
    for name in projector.lora_layers:
        delta = lora_delta(projector, name).to(projector.layers[name].geometry.weight.device)
        norm = float(delta.norm())
        leaks[name] = float((delta - projector.project(name, delta)).norm()) / norm if norm > 0 else 0.0
    return leaks


@dataclass(frozen=True)
class LoraLayerReport:
    """What the kept rectangle of one LoRA layer keeps.

    Attributes:
        name: layer name.
        kept_directions: ``|M|``, eigen-directions kept by full-weight projection.
        rectangle: ``(|R|, k)``: output directions ``B`` may use, input directions ``A`` may use.
        kept_fraction: ``|R|·k / |M|``, the share of the full-weight kept subspace LoRA reaches.
        rank: the LoRA rank (largest over the layer's adapters); ``ΔW`` has rank ``≤ min(rank, |R|, k)``.
    """

    name: str
    kept_directions: int
    rectangle: tuple[int, int]
    kept_fraction: float
    rank: int


def lora_report(projector: CrispProjector) -> list[LoraLayerReport]:
    """One :class:`LoraLayerReport` per LoRA layer (the projector needs a basis)."""
    reports = []
    for name, lora_layer in projector.lora_layers.items():
        basis = projector.layers[name].basis
        if basis is None:
            raise RuntimeError(f"layer {name!r} has no eigenbasis yet: call projector.collect(...) first")
        rect = lora_layer.rectangle(basis)
        rank = max((A.weight.shape[0] for _, A, _ in lora_layer.adapters()), default=0)
        reports.append(
            LoraLayerReport(
                name=name,
                kept_directions=int(basis.mask.sum().item()),
                rectangle=(rect.out_basis.shape[1], rect.in_basis.shape[1]),
                kept_fraction=rect.kept_fraction,
                rank=rank,
            )
        )
    return reports
