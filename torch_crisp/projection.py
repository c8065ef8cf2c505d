"""Applying the projection to one layer's tensors: gradients, changes, checks, statistics.

:func:`project_gradients_` replaces every projected layer's ``[∂W | ∂b]`` by ``P([∂W | ∂b])`` in
place (the training-time orchestration is :mod:`torch_crisp.constraint`). The helpers here gather
FSDP2 shards (:mod:`torch_crisp.dtensor`), handle a bias that is frozen while its weight trains
(:func:`torch_crisp.functional.project_fixed_column`), leave layers with non-finite gradients to
the optimizer's own handling rather than spreading a NaN over the whole layer, and refuse layers
that were replaced or resized after their curvature was collected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed, functional
from .dtensor import check_supported_parameter, copy_from_full_, full_tensor, is_dtensor, local_tensor
from .layers import innermost_base_layer
from .lora import LoraLayer
from .placement import OwnerBroadcasts
from .state import LayerState

__all__ = [
    "ProjectionStats",
    "check_layers_intact",
    "has_frozen_bias",
    "layer_matrix",
    "nonfinite_gradient_layers",
    "project_gradients_",
    "project_layer",
]


@dataclass(frozen=True)
class ProjectionStats:
    """What one projection removed, summed over the layers that took part.

    ``total_sq = Σ ‖Q‖²`` and ``removed_sq = Σ ‖Q − P(Q)‖²`` stay 0-dim tensors (no device
    synchronisation on the step's path) until :attr:`removed_fraction` reads them.
    ``predicted_increase`` is ``L̂ = ½ Σ c Ũ²`` of the cumulative change when it was computed
    (update mode, or with a capability budget), ``budget_mu`` the budget's multiplier (0 when the
    budget did not bind), ``skipped`` names layers left unprojected (non-finite gradients),
    ``low_rank`` those projected from their tokens' factors (:mod:`torch_crisp.low_rank_step`), and
    ``broadcast_bytes`` what the owners of sharded bases broadcast (:mod:`torch_crisp.placement`).
    """

    total_sq: Tensor
    removed_sq: Tensor
    layers: int
    predicted_increase: float | None = None
    budget_mu: float | None = None
    skipped: tuple[str, ...] = ()
    low_rank: tuple[str, ...] = ()
    broadcast_bytes: int = 0

    @property
    def removed_fraction(self) -> float:
        total = float(self.total_sq.item())
        return float(self.removed_sq.item()) / total if total > 0 else 0.0


def layer_matrix(state: LayerState, tensors: list[Tensor]) -> Tensor:
    """``[W | b]`` from tensors shaped like the layer's (weight, bias), gathered if sharded."""
    full = [full_tensor(t) for t in tensors]
    return state.geometry.as_matrix(full[0], full[1] if state.geometry.has_bias else None)


def has_frozen_bias(state: LayerState) -> bool:
    """True when the layer's weight trains but its bias does not (the bias column must stay zero).

    A trainable bias with a frozen weight cannot be constrained in ``[W | b]`` coordinates and is
    refused with a ``ValueError``.
    """
    geometry = state.geometry
    if not geometry.has_bias:
        return False
    weight_trains, bias_trains = geometry.weight.requires_grad, geometry.bias.requires_grad  # type: ignore[union-attr]
    if bias_trains and not weight_trains:
        raise ValueError(
            f"layer {state.name!r} trains its bias with a frozen weight; torch_crisp projects [W | b] together and "
            "cannot keep such an update in the kept subspace: freeze the bias too, or unfreeze the weight"
        )
    return weight_trains and not bias_trains


def project_layer(state: LayerState, matrix: Tensor) -> Tensor:
    """``P([W | b])`` of one layer; with a frozen bias, onto the kept subspace with a zero bias column."""
    if has_frozen_bias(state):
        basis = state.require_basis()
        if basis.device != matrix.device:
            basis = state.basis = basis.to(matrix.device)
        return functional.project_fixed_column(matrix, basis.U_out, basis.U_in, basis.mask, state.geometry.d_in)
    return state.project(matrix)


def check_layers_intact(model: nn.Module, layers: Mapping[str, LayerState]) -> None:
    """Raise ``RuntimeError`` if a target module was replaced or resized since the projector was built.

    A replaced module's updates would reach the optimizer without ever passing the projection, and
    a resized one no longer matches its eigenbases.
    """
    for name, state in layers.items():
        try:
            current = innermost_base_layer(model.get_submodule(name))
        except AttributeError:
            current = None
        if current is not state.geometry.module:
            raise RuntimeError(
                f"target layer {name!r} was replaced after the projector was built, so its updates would not be "
                "projected; build the CrispProjector (and collect) after changing the model"
            )
        basis = state.basis
        expected = (state.geometry.d_out, state.geometry.d_in_augmented)
        if basis is not None and basis.shape != expected:
            raise RuntimeError(
                f"target layer {name!r} now has [W|b] shape {expected} but its curvature was collected for "
                f"{basis.shape}; collect again for the resized layer"
            )


def nonfinite_gradient_layers(layers: Mapping[str, LayerState]) -> list[str]:
    """Names of layers with a NaN or infinite gradient entry (one device synchronisation for all).

    Sharded (FSDP2) gradients are checked shard by shard and the verdicts combined over the ranks,
    so every rank skips the same layers (the projection of the others is a collective).
    """
    names, flags, sharded = [], [], False
    for state in layers.values():
        grads = [p.grad for p in state.geometry.parameters() if p.grad is not None]
        if grads:
            names.append(state.name)
            sharded = sharded or any(is_dtensor(g) for g in grads)
            flags.append(torch.stack([torch.isfinite(local_tensor(g)).all() for g in grads]).all().cpu())
    if not flags:
        return []
    finite = torch.stack(flags).to(torch.int64)
    if sharded and distributed.is_active():
        finite = finite.to(distributed.comm_device(finite, None))
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def warn_nonfinite(skipped: Collection[str]) -> None:
    """One warning (constant text, so Python shows it once per call site) for unprojected layers."""
    if skipped:
        warnings.warn(
            f"layers with NaN/inf gradient entries were left unprojected at this step ({sorted(skipped)}): projecting "
            "them would spread the NaN over every weight of the layer, so the optimizer's own handling applies "
            "(a GradScaler skips the step; a plain optimizer writes NaN/inf into those entries)",
            stacklevel=4,
        )


@torch.no_grad()
def project_gradients_(
    layers: Mapping[str, LayerState], lora_layers: Mapping[str, LoraLayer], skip: Collection[str] = (),
    factors: Mapping[str, Callable[[Tensor], Tensor]] | None = None, owners: OwnerBroadcasts | None = None,
) -> ProjectionStats:
    """Project every layer's ``.grad`` (weight and bias together) in place; skip the names in ``skip``.

    Layers whose weight and bias both have no gradient are skipped. A missing gradient of one of
    the two is treated as zero (its part of the projection is dropped, with a warning), unless the
    bias is frozen, whose column is then kept at zero (:func:`project_layer`). FSDP2 gradients are
    gathered, projected identically on every rank and written back shard by shard. ``factors`` maps
    layers to their projection from the step's per-token factors (:mod:`torch_crisp.low_rank_step`:
    ``[∂W | ∂b] ↦ P([∂W | ∂b])`` computed more cheaply); with ``owners`` (sharded bases) a layer is projected
    by its owner only and broadcast into the other ranks' gradients.
    """
    factors = factors or {}
    total = removed = torch.zeros((), dtype=torch.float32)
    projected, received = 0, []
    for state in layers.values():
        state.require_basis()
        params = state.geometry.parameters()
        for param in params:
            check_supported_parameter(param, state.name)
        grads = [p.grad for p in params]
        if state.name in skip or all(g is None for g in grads):
            continue
        projected += 1
        if any(g is None for g in grads) and not has_frozen_bias(state):
            warnings.warn(
                f"layer {state.name!r} has a gradient for only one of weight/bias; the missing one "
                "is taken as zero and the update of that layer is only approximately projected",
                stacklevel=4,
            )
        filled = [g if g is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                  for p, g in zip(params, grads)]
        Q = layer_matrix(state, filled)
        q_sq = Q.float().square().sum()
        total = total.to(q_sq.device) + q_sq
        if owners is not None and not owners.owns(state.name):
            owners.share(state.name, grads)  # the owner's projection arrives in place
            received.append((state, grads, q_sq))
            continue
        P = factors[state.name](Q) if state.name in factors else project_layer(state, Q)
        removed = removed.to(q_sq.device) + (q_sq - P.float().square().sum())
        for grad, new in zip(grads, state.geometry.split_matrix(P)):
            if grad is not None and new is not None:
                copy_from_full_(grad, new)
        if owners is not None:
            owners.share(state.name, grads)
    if owners is not None:
        owners.wait()
        for state, grads, q_sq in received:
            filled = [g if g is not None else torch.zeros_like(p) for p, g in zip(state.geometry.parameters(), grads)]
            removed = removed.to(q_sq.device) + (q_sq - layer_matrix(state, filled).float().square().sum())
    for name, lora_layer in lora_layers.items():
        lora_total, lora_removed = lora_layer.project_grads_(layers[name].require_basis())
        if lora_total > 0.0:
            projected += 1
            total, removed = total.cpu() + lora_total, removed.cpu() + lora_removed
    return ProjectionStats(total, removed, projected, skipped=tuple(skip), low_rank=tuple(factors),
                           broadcast_bytes=0 if owners is None else owners.bytes)
