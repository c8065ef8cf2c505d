"""What one training run does around each optimizer step to keep the projected layers constrained.

:class:`TrainingConstraint` is shared by :class:`~torch_crisp.CrispOptimizer` and the Trainer
callback. Around every optimizer step it

* checks the target layers are still the modules the curvature was collected on, and leaves
  layers with NaN/inf gradients to the optimizer's own handling (never spreading the NaN);
* ``mode="grad"``: projects each layer's gradient before the step (the paper);
* ``mode="update"``: after the step replaces the **cumulative** change ``D = [W|b] − [W₀|b₀]`` of each
  layer by ``P(D)``. ``W₀`` is anchored once, in float32, when training starts (and again when a
  layer's basis changes, e.g. in a new sequential-editing round): projecting the whole change each
  step keeps the rounding of low-precision (bf16) weights from accumulating in blocked
  directions, so the stored change is in the kept subspace up to one rounding of the final weights;
* with ``CrispConfig(capability_budget=ε)``: replaces the cumulative change by the nearest one whose
  predicted capability loss ``L̂ = ½ Σ c Ũ²`` is at most ``ε`` (:mod:`torch_crisp.budget`), in
  either mode, and leaves the run bit-identical to one without a budget while ``L̂ ≤ ε``;
* keeps LoRA adapters in their kept rectangles (:mod:`torch_crisp.lora`);
* in grad mode, keeps the per-token factors of the backward passes and projects from them where
  that is exact and cheaper (:mod:`torch_crisp.low_rank_step`, ``low_rank=``); with sharded bases
  (:mod:`torch_crisp.placement`), each layer's owner projects it and broadcasts the result.

Its :meth:`~TrainingConstraint.state_dict` (anchors and the budget's last multiplier) is
``weights_only``-safe, so checkpoints resume the same run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import functional
from .basis import Basis, same_basis
from .budget import BudgetTerm, predicted_increase, solve_multiplier
from .config import DEFAULT_MODE, LOW_RANKS, MODES, LowRank, Mode, check_choice
from .dtensor import check_supported_parameter, full_from_local, local_part, local_tensor
from .low_rank_step import LowRankStep
from .projection import (
    ProjectionStats,
    check_layers_intact,
    has_frozen_bias,
    layer_matrix,
    nonfinite_gradient_layers,
    project_layer,
    warn_nonfinite,
)
from .projector import CrispProjector
from .state import LayerState

__all__ = ["TrainingConstraint", "load_constraint", "save_constraint"]


class TrainingConstraint:
    """The constraint of one training run on a projector's layers (see the module docstring).

    Call :meth:`before_step` after the gradients are final (accumulated, clipped) and
    :meth:`after_step` right after the inner optimizer's step; :meth:`start` before the backward passes
    of training (the low-rank step's hooks, grad mode only), :meth:`stop` after.
    """

    def __init__(self, projector: CrispProjector, mode: Mode = DEFAULT_MODE, low_rank: LowRank = "auto") -> None:
        self.projector = projector
        self.mode: Mode = check_choice("mode", mode, MODES)  # type: ignore[assignment]
        check_choice("low_rank", low_rank, LOW_RANKS)
        # update mode projects W − W₀, which is not low-rank: no hooks (see docs/concepts.md)
        self.low_rank = LowRankStep(projector, low_rank) if self.mode == "grad" and low_rank != "off" else None
        self._anchor: dict[str, list[Tensor]] = {}  # float32 local copies of (weight[, bias]) at W₀
        self._anchored_basis: dict[str, Basis] = {}
        self._before: dict[str, Tensor] = {}  # update mode: [W|b] before the step, for the statistics
        self._lora_before: list[tuple[Tensor, Tensor]] = []
        self._skipped: list[str] = []
        self._grad_stats: ProjectionStats | None = None
        self.budget_mu: float | None = None
        self.predicted_increase: float | None = None

    # ----------------------------------------------------------------- properties
    @property
    def budget(self) -> float | None:
        return self.projector.config.capability_budget

    @property
    def anchored(self) -> bool:
        """Whether this run keeps ``W₀`` (update mode always; grad mode with a budget)."""
        return self.mode == "update" or self.budget is not None

    @property
    def gradient_stats(self) -> ProjectionStats | None:
        """Grad mode: what the gradient projection of the step in progress removed (``None`` outside a step)."""
        return self._grad_stats

    def _trainable(self) -> list[LayerState]:
        return [s for s in self.projector.layers.values() if any(p.requires_grad for p in s.geometry.parameters())]

    # ----------------------------------------------------------------- lifetime of the hooks
    def start(self) -> None:
        """Keep the per-token factors of the backward passes from now on (grad mode with ``low_rank``)."""
        if self.low_rank is not None:
            self.low_rank.start()

    def stop(self) -> None:
        if self.low_rank is not None:
            self.low_rank.stop()

    def gradients_zeroed(self) -> None:
        """The gradients were zeroed without a step: the factors kept for them are void."""
        if self.low_rank is not None:
            self.low_rank.clear()

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def before_step(self) -> None:
        """Checks, the anchor, and the gradient projection (grad mode) or a snapshot (update mode)."""
        projector = self.projector
        check_layers_intact(projector.model, projector.layers)
        for state in self._trainable():
            for param in state.geometry.parameters():
                check_supported_parameter(param, state.name)
        if self.budget is not None and projector.lora_layers:
            raise ValueError(
                "capability_budget constrains full-weight changes; LoRA adapters (whose B·A cannot take the budget's "
                f"shrunk change exactly) are not supported with it yet: {list(projector.lora_layers)[:3]}"
            )
        self._skipped = nonfinite_gradient_layers(projector.layers)
        warn_nonfinite(self._skipped)
        if self.anchored:
            self._ensure_anchor()
        if self.mode == "grad":
            factors = self.low_rank.prepare(self._skipped) if self.low_rank is not None else None
            projector.project_(skip=self._skipped, factors=factors)
            self._grad_stats = projector.last_projection
        else:
            self._before = {
                s.name: layer_matrix(s, [p.detach() for p in s.geometry.parameters()]).clone()
                for s in self._trainable() if s.name not in self._skipped
            }
        self._lora_before = [(p, p.detach().clone()) for lora in projector.lora_layers.values()
                             for p in lora.parameters()]

    @torch.no_grad()
    def after_step(self) -> ProjectionStats:
        """Project the cumulative change (update mode), enforce the budget, re-project LoRA; record stats."""
        if self.mode == "update":
            stats = self._project_cumulative_change()
        else:
            stats = self._grad_stats if self._grad_stats is not None else _empty_stats()
            if self.budget is not None:
                mu, predicted = self._enforce_budget_on_change()
                stats = ProjectionStats(stats.total_sq, stats.removed_sq, stats.layers, predicted, mu, stats.skipped)
        stats = self._project_lora(stats)
        self.budget_mu, self.predicted_increase = stats.budget_mu, stats.predicted_increase
        self.projector.record_projection(stats)
        self._before, self._lora_before, self._grad_stats = {}, [], None
        return stats

    @torch.no_grad()
    def current_predicted_increase(self) -> float | None:
        """``L̂ = ½ Σ c Ũ²`` of the kept part of the whole change ``W − W₀`` now, by the full rotation.

        A step on the complement path does not know ``L̂`` (the full rotation is what it saves), so
        ``predicted_increase`` is ``None`` then; this computes it on request, e.g. once per logged step.
        ``None`` before the anchor exists, with blocked-only basis storage (no full rotation is
        stored) or with bases sharded over ranks (no rank holds every one).
        """
        if not self._anchor or self.projector.bases_sharded:
            return None
        total = 0.0
        for state in self._trainable():
            if state.name not in self._anchor:
                continue
            if not isinstance(state.require_basis(), Basis):
                return None
            coefficients = self._kept_coefficients(state, self._change(state))
            curvature = state.curvature_grid(coefficients.device)
            total += BudgetTerm(coefficients, curvature, state.basis.mask, self._column_row(state)).predicted_increase()
        return total

    # ----------------------------------------------------------------- the anchor W₀
    def _ensure_anchor(self) -> None:
        """Anchor ``W₀`` for layers without one, or whose basis changed since they were anchored.

        A new basis (a new sequential-editing round, a new ``collect``) makes the current weights
        the new ``W₀``: earlier changes were constrained by the earlier basis and are part of the
        model the new curvature describes; projecting them again would undo them.
        """
        for state in self._trainable():
            basis = state.require_basis()
            previous = self._anchored_basis.get(state.name)
            if state.name in self._anchor and previous is not None and same_basis(previous, basis):
                self._anchored_basis[state.name] = basis  # fast identity check from now on
                continue
            # float32 at least (bf16/fp16 weights), float64 stays float64
            self._anchor[state.name] = [
                local_tensor(p.detach()).to(torch.promote_types(p.dtype, torch.float32), copy=True)
                for p in state.geometry.parameters()
            ]
            self._anchored_basis[state.name] = basis

    def _change(self, state: LayerState) -> Tensor:
        """``D = [W|b] − [W₀|b₀]`` in float32, gathered if sharded."""
        params = state.geometry.parameters()
        anchors = self._anchor[state.name]
        diffs = [full_from_local(local_tensor(p.detach()).to(a.dtype) - a, p) for p, a in zip(params, anchors)]
        return state.geometry.as_matrix(diffs[0], diffs[1] if state.geometry.has_bias else None)

    def _write_change(self, state: LayerState, change: Tensor) -> None:
        """``[W|b] ← [W₀|b₀] + change`` for the trainable parameters (each rank its own shard)."""
        params = state.geometry.parameters()
        for param, anchor, value in zip(params, self._anchor[state.name], state.geometry.split_matrix(change)):
            if value is not None and param.requires_grad:
                local = local_tensor(param)
                local.copy_(anchor + local_part(value, param).to(anchor.device))

    # ----------------------------------------------------------------- update mode
    def _project_cumulative_change(self) -> ProjectionStats:
        total = removed = torch.zeros((), dtype=torch.float32)
        predicted: float | None = 0.0
        states = [s for s in self._trainable() if s.name not in self._skipped]
        terms: list[BudgetTerm] = []
        owners, received = self.projector.sync.owner_broadcasts(), []
        for state in states:
            change = self._change(state)
            if owners is not None and not owners.owns(state.name):  # the owner's result arrives in place
                received.append((state, change, self._step_size(state)))
                owners.share(state.name, self._written(state))
                predicted = None  # L̂ needs every basis
                continue
            if self.budget is None and self._complement_is_cheaper(state):
                # P(D) on the cheaper path; L̂ would need the full rotation it saves, so it is not known
                projected = project_layer(state, change)
                total, removed = _accumulate(total, removed, self._finish_projected(state, change, projected))
                predicted = None
                if owners is not None:
                    owners.share(state.name, self._written(state))
                continue
            coefficients = self._kept_coefficients(state, change)
            curvature = state.curvature_grid(coefficients.device)
            term = BudgetTerm(coefficients, curvature, state.basis.mask, self._column_row(state))  # type: ignore[union-attr]
            predicted = None if predicted is None else predicted + term.predicted_increase()
            if self.budget is not None:
                terms.append(term)  # written after μ is known (one μ for all layers)
            else:
                total, removed = _accumulate(total, removed, self._finish(state, change, coefficients))
            if owners is not None:
                owners.share(state.name, self._written(state))
        if owners is not None:
            owners.wait()
            for state, change, step in received:
                total, removed = _accumulate(total, removed, (step, (change - self._change(state)).square().sum()))
        mu = None
        if self.budget is not None:
            assert predicted is not None  # every layer took the full path
            mu = solve_multiplier(terms, self.budget) if predicted > self.budget else 0.0
            for state, term in zip(states, terms):
                change = self._change(state)
                total, removed = _accumulate(total, removed, self._finish(state, change, term.shrunk(mu)))
            predicted = predicted_increase(terms, mu)
        return ProjectionStats(total, removed, len(states), predicted, mu, tuple(self._skipped),
                               broadcast_bytes=0 if owners is None else owners.bytes)

    def _written(self, state: LayerState) -> list[Tensor]:
        """The parameters :meth:`_write_change` writes (what an owner broadcasts)."""
        return [p.detach() for p in state.geometry.parameters() if p.requires_grad]

    def _step_size(self, state: LayerState) -> Tensor:
        """``‖W after the inner step − W before it‖²`` (the statistics' total of this step)."""
        before = self._before.get(state.name)
        if before is None:
            return torch.zeros((), dtype=torch.float32, device=state.geometry.weight.device)
        after = layer_matrix(state, [p.detach() for p in state.geometry.parameters()])
        return (after.float() - before.float()).square().sum()

    def _kept_coefficients(self, state: LayerState, change: Tensor) -> Tensor:
        """``Ũ ⊙ M`` of a change (with a frozen bias: also orthogonal to the bias coordinate)."""
        basis = state.require_basis()
        if basis.device != change.device:
            basis = state.basis = basis.to(change.device)
        rotated = functional.rotate(change, basis.U_out, basis.U_in)
        if has_frozen_bias(state):
            return functional.remove_column_component(rotated, basis.mask, basis.U_in[state.geometry.d_in])
        return rotated.mul_(basis.mask)

    def _column_row(self, state: LayerState) -> Tensor | None:
        return state.require_basis().U_in[state.geometry.d_in] if has_frozen_bias(state) else None

    @staticmethod
    def _complement_is_cheaper(state: LayerState) -> bool:
        """True when the layer's projection plan avoids the full rotation (or only that path is stored)."""
        basis = state.require_basis()
        return not isinstance(basis, Basis) or basis.plan(state.options.projection).path != "full"

    def _finish(self, state: LayerState, change: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``W₀ + unrotate(coefficients)``; return ``(‖step‖², ‖removed‖²)`` of this step."""
        basis = state.require_basis()
        return self._finish_projected(state, change, functional.unrotate(coefficients, basis.U_out, basis.U_in))

    def _finish_projected(self, state: LayerState, change: Tensor, projected: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``W₀ + projected``; return ``(‖step‖², ‖removed‖²)`` of this step."""
        if has_frozen_bias(state):
            projected[..., state.geometry.d_in] = 0  # zero up to rounding; the frozen bias is never written
        removed = (change - projected).square().sum()  # W_after − W_final: what this step lost
        step = self._step_size(state)
        self._write_change(state, projected)
        return step, removed

    # ----------------------------------------------------------------- grad mode with a budget
    def _enforce_budget_on_change(self) -> tuple[float, float]:
        """Shrink the whole cumulative change (no mask: grad mode may have leaked) into the budget."""
        assert self.budget is not None
        states = [s for s in self._trainable() if s.name not in self._skipped]
        terms = []
        for state in states:
            basis = state.require_basis()
            change = self._change(state)
            if basis.device != change.device:
                basis = state.basis = basis.to(change.device)
            rotated = functional.rotate(change, basis.U_out, basis.U_in)
            terms.append(BudgetTerm(rotated, state.curvature_grid(rotated.device), None, self._column_row(state)))
        predicted = predicted_increase(terms)
        if predicted <= self.budget:
            return 0.0, predicted  # nothing is written: bit-identical to a run without a budget
        mu = solve_multiplier(terms, self.budget)
        for state, term in zip(states, terms):
            basis = state.require_basis()
            projected = functional.unrotate(term.shrunk(mu), basis.U_out, basis.U_in)
            if has_frozen_bias(state):
                projected[..., state.geometry.d_in] = 0
            self._write_change(state, projected)
        return mu, predicted_increase(terms, mu)

    # ----------------------------------------------------------------- LoRA
    def _project_lora(self, stats: ProjectionStats) -> ProjectionStats:
        """LoRA's constraint is on the parameters themselves: re-project them after every step."""
        projector = self.projector
        if not projector.lora_layers:
            return stats
        stepped = [p.detach().clone() for p, _ in self._lora_before]
        projector.project_lora_parameters_()
        if self.mode == "grad":
            return stats
        total, removed = stats.total_sq, stats.removed_sq
        for (param, old), after_step in zip(self._lora_before, stepped):
            d_sq = (after_step - old).float().square().sum()
            r_sq = (param.detach() - after_step).float().square().sum()
            total, removed = total.to(d_sq.device) + d_sq, removed.to(d_sq.device) + r_sq
        layers = stats.layers + len(projector.lora_layers)
        return ProjectionStats(total, removed, layers, stats.predicted_increase, stats.budget_mu, stats.skipped)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``weights_only``-safe: the anchors (this rank's shards, float32) and the last multiplier."""
        return {
            "mode": self.mode,
            "anchor": {name: list(tensors) for name, tensors in self._anchor.items()},
            "budget_mu": self.budget_mu,
            "predicted_increase": self.predicted_increase,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore anchors saved by :meth:`state_dict` (they count as belonging to the current bases)."""
        anchors = state.get("anchor", {}) or {}
        unknown = [name for name in anchors if name not in self.projector.layers]
        if unknown:
            raise ValueError(f"the saved constraint anchors layers this projector does not project: {unknown[:4]}")
        restored: dict[str, list[Tensor]] = {}
        for name, tensors in anchors.items():
            params = self.projector.layers[name].geometry.parameters()
            if len(tensors) != len(params) or any(
                tuple(t.shape) != tuple(local_tensor(p).shape) or not torch.isfinite(t).all()
                for t, p in zip(tensors, params)
            ):
                raise ValueError(f"the saved anchor of layer {name!r} does not fit its parameters (shape or values)")
            restored[name] = [
                t.to(local_tensor(p).device, torch.promote_types(p.dtype, torch.float32), copy=True)
                for t, p in zip(tensors, params)
            ]
        self._anchor = restored
        self._anchored_basis = {name: self.projector.layers[name].require_basis() for name in restored}
        mu = state.get("budget_mu")
        self.budget_mu = float(mu) if isinstance(mu, (int, float)) and math.isfinite(mu) else None
        predicted = state.get("predicted_increase")
        self.predicted_increase = float(predicted) if isinstance(predicted, (int, float)) else None


def save_constraint(constraint: TrainingConstraint, path: str | os.PathLike[str]) -> None:
    """Write :meth:`TrainingConstraint.state_dict` as safetensors (no pickle: nothing runs on load)."""
    state = constraint.state_dict()
    tensors = {f"{name}::{i}": t.detach().to("cpu").contiguous()
               for name, anchor in state["anchor"].items() for i, t in enumerate(anchor)}
    metadata = {key: json.dumps(state[key]) for key in ("mode", "budget_mu", "predicted_increase")}
    save_file(tensors, str(path), metadata=metadata)


def load_constraint(constraint: TrainingConstraint, path: str | os.PathLike[str]) -> None:
    """Restore a file written by :func:`save_constraint` (validated like any untrusted file)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"{path} is not a readable torch_crisp constraint file ({err})") from None
    anchors: dict[str, list[Tensor]] = {}
    for key in sorted(tensors, key=lambda k: (k.rpartition("::")[0], int(k.rpartition("::")[2] or 0))):
        name, _, index = key.rpartition("::")
        if not name or not index.isdigit():
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        anchors.setdefault(name, []).append(tensors[key])
    state: dict[str, Any] = {"anchor": anchors}
    for key in ("budget_mu", "predicted_increase"):
        try:
            state[key] = json.loads(metadata.get(key, "null"))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: metadata {key!r} is not JSON") from None
    constraint.load_state_dict(state)


def _accumulate(total: Tensor, removed: Tensor, pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    step, gone = pair
    return total.to(step.device) + step, removed.to(gone.device) + gone


def _empty_stats() -> ProjectionStats:
    zero = torch.zeros((), dtype=torch.float32)
    return ProjectionStats(zero, zero, 0)

