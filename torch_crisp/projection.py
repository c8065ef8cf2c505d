"""Applying the projection to a model: gradients before a step, parameter changes after it.

:func:`project_gradients_` replaces every projected layer's ``[∂W | ∂b]`` by ``P([∂W | ∂b])`` in
place; :class:`ParameterChange` remembers the projected parameters before an optimizer step and
replaces each layer's change ``Δ`` by ``P(Δ)`` after it. Both gather FSDP2 shards
(:mod:`torch_crisp.dtensor`), treat LoRA adapters through their kept rectangles
(:mod:`torch_crisp.lora`) and report a :class:`ProjectionStats`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .dtensor import check_supported_parameter, copy_from_full_, full_tensor
from .lora import LoraLayer
from .state import LayerState

__all__ = ["ParameterChange", "ProjectionStats", "project_gradients_"]


@dataclass(frozen=True)
class ProjectionStats:
    """What one projection removed, summed over the layers that took part.

    ``total_sq = Σ ‖Q‖²`` and ``removed_sq = Σ ‖Q − P(Q)‖²`` stay 0-dim tensors (no device
    synchronisation on the step's path) until :attr:`removed_fraction` reads them.
    """

    total_sq: Tensor
    removed_sq: Tensor
    layers: int

    @property
    def removed_fraction(self) -> float:
        total = float(self.total_sq.item())
        return float(self.removed_sq.item()) / total if total > 0 else 0.0


def _layer_matrix(state: LayerState, tensors: list[Tensor]) -> Tensor:
    """``[W | b]`` from tensors shaped like the layer's (weight, bias), gathered if sharded."""
    full = [full_tensor(t) for t in tensors]
    return state.geometry.as_matrix(full[0], full[1] if state.geometry.has_bias else None)


@torch.no_grad()
def project_gradients_(layers: Mapping[str, LayerState], lora_layers: Mapping[str, LoraLayer]) -> ProjectionStats:
    """Project every layer's ``.grad`` (weight and bias together) in place.

    Layers whose weight and bias both have no gradient are skipped. A missing gradient of one of
    the two is treated as zero (its part of the projection is dropped, with a warning, since the
    remaining update is then only approximately in the kept subspace). FSDP2 gradients are
    gathered, projected identically on every rank and written back shard by shard.
    """
    total = removed = torch.zeros((), dtype=torch.float32)
    projected = 0
    for state in layers.values():
        state.require_basis()
        params = state.geometry.parameters()
        for param in params:
            check_supported_parameter(param, state.name)
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            continue
        projected += 1
        if any(g is None for g in grads):
            warnings.warn(
                f"layer {state.name!r} has a gradient for only one of weight/bias; the missing one "
                "is taken as zero and the update of that layer is only approximately projected",
                stacklevel=4,
            )
        filled = [g if g is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                  for p, g in zip(params, grads)]
        Q = _layer_matrix(state, filled)
        P = state.project(Q)
        q_sq, p_sq = Q.float().square().sum(), P.float().square().sum()
        total, removed = total.to(q_sq.device) + q_sq, removed.to(q_sq.device) + (q_sq - p_sq)
        for grad, new in zip(grads, state.geometry.split_matrix(P)):
            if grad is not None and new is not None:
                copy_from_full_(grad, new)
    for name, lora_layer in lora_layers.items():
        lora_total, lora_removed = lora_layer.project_grads_(layers[name].require_basis())
        if lora_total > 0.0:
            projected += 1
            total, removed = total.cpu() + lora_total, removed.cpu() + lora_removed
    return ProjectionStats(total, removed, projected)


class ParameterChange:
    """The projected parameters before an optimizer step; :meth:`project_` projects the change.

    Update-mode projection, shared by :class:`~torch_crisp.CrispOptimizer` and the Trainer
    callback: each target layer's change ``Δ = [W | b]_after − [W | b]_before`` is replaced by
    ``P(Δ)``, and LoRA adapters are re-projected into their kept rectangles. Costs one copy of the
    projected parameters while the step runs.
    """

    def __init__(self, layers: Mapping[str, LayerState], lora_layers: Mapping[str, LoraLayer]) -> None:
        self._all_layers, self._lora_layers = layers, lora_layers
        self._layers: list[tuple[LayerState, list[Tensor], Tensor]] = []
        for state in layers.values():
            state.require_basis()
            params = state.geometry.parameters()
            if any(p.requires_grad for p in params):
                self._layers.append((state, params, _layer_matrix(state, [p.detach() for p in params]).clone()))
        # LoRA parameters already lie in their subspaces (projected after every step)
        self._lora = [(p, p.detach().clone()) for layer in lora_layers.values() for p in layer.parameters()]

    @torch.no_grad()
    def project_(self) -> ProjectionStats:
        """Project this step's changes in place; return what was removed.

        A skipped step (GradScaler overflow) has ``Δ = 0`` and ``P(0) = 0`` leaves the weights as
        they were.
        """
        total = removed = torch.zeros((), dtype=torch.float32)
        for state, params, before in self._layers:
            delta = _layer_matrix(state, [p.detach() for p in params]).to(before.dtype) - before
            projected = state.project(delta)
            d_sq, p_sq = delta.float().square().sum(), projected.float().square().sum()
            total, removed = total.to(d_sq.device) + d_sq, removed.to(d_sq.device) + (d_sq - p_sq).clamp_min(0)
            for param, value in zip(params, state.geometry.split_matrix(before + projected)):
                if value is not None and param.requires_grad:
                    copy_from_full_(param, value)
        if self._lora:
            stepped = [param.detach().clone() for param, _ in self._lora]
            for name, lora_layer in self._lora_layers.items():
                lora_layer.project_parameters_(self._all_layers[name].require_basis())
            for (param, old), after_step in zip(self._lora, stepped):
                d_sq = (after_step - old).float().square().sum()
                r_sq = (param.detach() - after_step).float().square().sum()
                total, removed = total.to(d_sq.device) + d_sq, removed.to(d_sq.device) + r_sq
        layers = len(self._layers) + len(self._lora_layers)
        return ProjectionStats(total, removed, layers)
