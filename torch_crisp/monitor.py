"""The real capability loss on held-out batches, to set next to the prediction ``L̂``.

:func:`mean_token_loss` is the quantity K-FAC's prediction ``L̂ = ½ Σ c Ũ²`` refers to: the mean
per-token (per loss term) loss over the batches. :class:`CapabilityMonitor` measures it once at
the start and every ``every`` steps after, for a plain training loop (the Trainer callback has the
same option, ``capability_eval_data``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .collection import move_to_device
from .losses import LossFn, num_loss_terms, sum_reduced_loss

__all__ = ["CapabilityMonitor", "mean_token_loss"]


@torch.no_grad()
def mean_token_loss(model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None) -> float:
    """``Σ loss / Σ terms`` over ``batches``, in eval mode (restored afterwards), without gradients.

    Dict batches use ``model(**batch).loss`` weighted by their number of label tokens (so the
    result does not depend on how the data was batched); ``loss_fn`` must return
    ``(mean_loss, num_terms)`` for other batches.
    """
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    total, terms = 0.0, 0.0
    try:
        for batch in batches:
            batch = move_to_device(batch, device)
            if loss_fn is not None:
                result = loss_fn(model, batch)
                if not isinstance(result, tuple):
                    raise ValueError("mean_token_loss needs loss_fn to return (mean_loss, num_terms)")
                mean, count = result
                total += float(mean) * float(count)
                terms += float(count)
                continue
            summed = sum_reduced_loss(model, batch)
            if summed is None:
                continue
            count = num_loss_terms(model, batch["labels"])
            total += float(summed)
            terms += count
    finally:
        model.train(was_training)
    if terms == 0:
        raise ValueError("the held-out capability batches contain no loss terms (all labels -100?)")
    return total / terms


class CapabilityMonitor:
    """Held-out capability loss of a plain training loop, every ``every`` optimizer steps.

    Example:
        >>> monitor = CapabilityMonitor(model, heldout_batches, every=50)     # doctest: +SKIP
        >>> for step, batch in enumerate(loader, 1):
        ...     ...; optimizer.step()
        ...     if (report := monitor(step)) is not None:
        ...         print(report, projector.predicted_capability_increase)
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any], every: int, *, loss_fn: LossFn | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.model, self.batches, self.every, self.loss_fn = model, list(batches), every, loss_fn
        if not self.batches:
            raise ValueError("CapabilityMonitor needs at least one held-out batch")
        self.baseline = mean_token_loss(model, self.batches, loss_fn=loss_fn)
        self.history: list[tuple[int, float]] = [(0, self.baseline)]

    def __call__(self, step: int) -> dict[str, float] | None:
        """At multiples of ``every``: ``{"crisp/capability_loss", "crisp/capability_loss_increase"}``."""
        if step % self.every:
            return None
        loss = mean_token_loss(self.model, self.batches, loss_fn=self.loss_fn)
        self.history.append((step, loss))
        return {"crisp/capability_loss": loss, "crisp/capability_loss_increase": loss - self.baseline}
