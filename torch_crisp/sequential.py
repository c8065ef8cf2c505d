"""Sequential editing (CrispEdit-Seq): the capability constraint grows with every round's edits.

A round trains on that round's edit batches under the current projection, then adds the edits'
own curvature to the factor sums (``projector.collect`` accumulates; ``weight`` up-weights the
edits) and recomputes the eigenbases, so later rounds move only in directions that are flat for
the capability data *and* for every earlier edit.

When the basis changes while an optimizer is live, its state was built in the old kept subspace.
:func:`reproject_optimizer_state` handles that deliberately: first moments (Adam's ``exp_avg``,
SGD's ``momentum_buffer``) are linear combinations of past (projected) gradients, i.e. vectors in
the weight space, so they are projected onto the **new** kept subspace — otherwise momentum would
keep pushing along directions that the new constraint blocks, e.g. the directions of the edits
just made. Second moments (``exp_avg_sq``, ``max_exp_avg_sq``, Adamax's ``exp_inf``) are
per-coordinate scales, not directions: a projection is not defined for them and resetting them
would turn the next steps into unscaled full-size steps, so they are kept, as is ``step`` (bias
correction). See ``docs/sequential.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .collection import move_to_device
from .losses import LossFn, training_loss
from .projector import CrispProjector

__all__ = ["FIRST_MOMENT_KEYS", "RoundStats", "SequentialEditor", "reproject_optimizer_state"]

FIRST_MOMENT_KEYS: tuple[str, ...] = ("exp_avg", "momentum_buffer")
"""Optimizer-state entries that are directions in weight space (projected on a basis change)."""


@torch.no_grad()
def reproject_optimizer_state(
    optimizer: Optimizer, projector: CrispProjector, keys: Sequence[str] = FIRST_MOMENT_KEYS
) -> int:
    """Project the first-moment state of every projected layer onto the current kept subspace.

    For a layer with weight ``W`` and bias ``b``, the moments ``m_W`` and ``m_b`` are joined into
    ``[m_W | m_b]`` (the same logical matrix the gradients are projected as), replaced by
    ``P([m_W | m_b]) = U_out ((U_outᵀ [m_W|m_b] U_in) ⊙ M) U_inᵀ``, and split back. A parameter
    without that state entry contributes zeros and is not written. LoRA adapters of projected
    layers have their moments projected onto the new kept rectangle (``B``'s columns, ``A``'s
    rows). All other state (second moments, step counts) is left unchanged. Works for a
    :class:`~torch_crisp.CrispOptimizer` or its inner optimizer (they share ``state``).

    Returns the number of state tensors changed.
    """
    state = optimizer.state
    changed = 0
    for layer in projector.layers.values():
        params = layer.geometry.parameters()
        for key in keys:
            entries = [state[p].get(key) if p in state else None for p in params]  # no defaultdict inserts
            if all(not isinstance(e, Tensor) for e in entries):
                continue
            layer.require_basis()
            filled = [e if isinstance(e, Tensor) else torch.zeros_like(p) for p, e in zip(params, entries)]
            bias = filled[1] if layer.geometry.has_bias else None
            projected = layer.project(layer.geometry.as_matrix(filled[0], bias))
            for entry, new in zip(entries, layer.geometry.split_matrix(projected)):
                if isinstance(entry, Tensor) and new is not None:
                    entry.copy_(new)
                    changed += 1
    return changed + _reproject_lora_state(state, projector, keys)


def _reproject_lora_state(state: Any, projector: CrispProjector, keys: Sequence[str]) -> int:
    """LoRA adapters: ``m_B ← P_R m_B`` (columns), ``m_A ← m_A P_C`` (rows), as their gradients.

    Their constraint (``torch_crisp.lora``) is a linear subspace of the parameters given by the
    kept rectangle of the layer's basis, so the first moment is projected onto the new one.
    """
    changed = 0
    for name, lora_layer in projector.lora_layers.items():
        basis = projector.layers[name].basis
        if basis is None:
            continue
        for param, column_side in lora_layer.constrained_pairs():
            for key in keys:
                moment = state[param].get(key) if param in state else None
                if isinstance(moment, Tensor):
                    lora_layer.project_like_(basis, moment, column_side)
                    changed += 1
    return changed


@dataclass
class RoundStats:
    """What happened in one sequential editing round.

    Attributes:
        round: 1-based index of the round.
        steps: optimizer steps taken.
        mean_loss: mean training loss over the steps (as returned by the loss, usually a mean).
        last_loss: training loss of the last step.
        mean_removed_fraction: average of ``‖Q − P(Q)‖² / ‖Q‖²`` over the steps (gradient mode),
            ``None`` when the optimizer does not project gradients.
        tokens_added: weighted token count added to the constraint (per layer, equal for layers on
            the same positions; the first layer's value).
        total_tokens: token count behind the constraint after the round (first layer).
        kept_fraction: fraction of kept directions per layer after the basis update.
        optimizer_tensors_reprojected: optimizer-state tensors projected onto the new basis.
        seconds: wall time of the round.
    """

    round: int
    steps: int
    mean_loss: float
    last_loss: float
    mean_removed_fraction: float | None
    tokens_added: float
    total_tokens: float
    kept_fraction: dict[str, float] = field(default_factory=dict)
    optimizer_tensors_reprojected: int = 0
    seconds: float = 0.0

    @property
    def mean_kept_fraction(self) -> float:
        values = list(self.kept_fraction.values())
        return sum(values) / len(values) if values else math.nan


class SequentialEditor:
    """Run editing rounds whose capability constraints accumulate.

    Each :meth:`edit_round` (1) takes ``epochs`` passes of optimizer steps over the round's batches
    with the current projection, (2) collects the round's curvature into the projector's sums with
    ``weight`` and recomputes the bases (:meth:`CrispProjector.collect`), (3) re-projects the
    optimizer's first moments onto the new kept subspace (:func:`reproject_optimizer_state`).

    The projector must already hold a basis (collect the capability data first). The model is
    trained in whatever mode (train / eval) it is in; ``collect`` switches to eval temporarily.

    Example:
        >>> projector.collect(capability_batches)                          # doctest: +SKIP
        >>> optimizer = CrispOptimizer(torch.optim.AdamW(params, lr=1e-3), projector)
        >>> editor = SequentialEditor(projector, optimizer, epochs=5)      # doctest: +SKIP
        >>> for stats in editor.run([round1_batches, round2_batches]):    # doctest: +SKIP
        ...     print(stats.round, stats.last_loss, stats.mean_kept_fraction)
    """

    def __init__(
        self,
        projector: CrispProjector,
        optimizer: Optimizer,
        *,
        loss_fn: LossFn | None = None,
        epochs: int = 1,
        weight: float = 1.0,
        reproject_state: bool = True,
        progress: bool = False,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if not projector.has_basis:
            raise RuntimeError(
                "the projector has no basis yet: collect the capability data first "
                "(projector.collect(capability_batches)) or load a saved projector"
            )
        if projector.config.curvature == "ekfac":
            raise ValueError(
                "SequentialEditor does not support curvature='ekfac': each round's new basis needs EK-FAC's second "
                "pass over every data set collected so far (the capability data included), which the editor does "
                "not hold. Use curvature='kfac', or run the rounds yourself with "
                "projector.collect(round_batches, correction_batches=all_batches_so_far)"
            )
        self.projector = projector
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.epochs = epochs
        self.weight = weight
        self.reproject_state = reproject_state
        self.progress = progress
        self.history: list[RoundStats] = []

    def edit_round(
        self, batches: Iterable[Any], *, step_callback: Callable[[int, float], None] | None = None
    ) -> RoundStats:
        """Train on ``batches`` for ``epochs`` passes, then add their curvature; return statistics.

        ``batches`` is read ``epochs`` times for training and once more for the curvature; a one-shot
        iterator (a generator) is materialised into a list first. ``step_callback(step, loss)`` is
        called after every optimizer step. A :class:`~torch_crisp.CrispOptimizer` anchors ``W₀`` anew
        at the first step after the basis changed, i.e. each round constrains (and budgets) the change
        made in that round: earlier rounds' changes are part of the model the new curvature protects.
        """
        if isinstance(batches, Iterator):
            batches = list(batches)
        start = time.perf_counter()
        model = self.projector.model
        device = next(iter(model.parameters())).device
        first = next(iter(self.projector.layers.values()))
        tokens_before = float(first.token_count)
        losses: list[float] = []
        removed: list[float] = []
        projects_grads = getattr(self.optimizer, "mode", None) == "grad"
        for _ in range(self.epochs):
            seen = 0
            for batch in batches:
                seen += 1
                loss = training_loss(model, move_to_device(batch, device), self.loss_fn)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach().item()))
                # only gradient mode projects gradients (and so measures what it removed)
                fraction = self.projector.last_removed_fraction if projects_grads else None
                if fraction is not None:
                    removed.append(fraction)
                if step_callback is not None:
                    step_callback(len(losses), losses[-1])
            if seen == 0:
                raise ValueError("edit_round() received no batches; pass a non-empty list of edit batches")

        self.projector.collect(batches, loss_fn=self.loss_fn, weight=self.weight, progress=self.progress)
        reprojected = reproject_optimizer_state(self.optimizer, self.projector) if self.reproject_state else 0
        stats = RoundStats(
            round=len(self.history) + 1,
            steps=len(losses),
            mean_loss=sum(losses) / len(losses),
            last_loss=losses[-1],
            mean_removed_fraction=sum(removed) / len(removed) if removed else None,
            tokens_added=float(first.token_count) - tokens_before,
            total_tokens=float(first.token_count),
            kept_fraction=self.projector.kept_fraction(),
            optimizer_tensors_reprojected=reprojected,
            seconds=time.perf_counter() - start,
        )
        self.history.append(stats)
        return stats

    def run(self, rounds: Iterable[Sequence[Any]]) -> list[RoundStats]:
        """:meth:`edit_round` for every element of ``rounds``; returns this call's statistics."""
        return [self.edit_round(batches) for batches in rounds]
