"""Data passes: run batches through the model with a capture active, and backpropagate.

What happens around the hooks of :mod:`torch_crisp.capture` during ``collect``: the model runs in
eval mode with every parameter frozen (no weight gradients are computed and the user's ``.grad``
stay as they were), each batch moves to the model's device, its ``attention_mask`` becomes the
position mask the hooks read, and the sum-reduced loss (:mod:`torch_crisp.losses`) is
backpropagated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .capture import CaptureSession
from .config import FisherType
from .losses import LogitsFn, LossFn, sum_reduced_loss

__all__ = [
    "check_batches",
    "check_pass_arguments", "frozen_eval", "move_to_device", "run_backward_passes", "unwrap_data_parallel"]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested dict / list / tuple) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers (``.module``), or ``model`` itself.

    The projector works on the inner model, so layer names are the same with and without the
    wrapper (saved projectors stay portable), and collection runs without DDP's gradient reducer
    (parameters are frozen meanwhile, which a DDP forward would treat as unused parameters).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def check_pass_arguments(max_batches: int | None, weight: float) -> None:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer, got {max_batches}")
    if weight <= 0:
        raise ValueError(f"weight must be positive, got {weight}")


def check_batches(
    batches: Iterable[Any], fisher: FisherType, loss_fn: LossFn | None, logits_fn: LogitsFn | None, two_passes: bool
) -> None:
    """Refuse inputs a data pass cannot use: a loss for ``fisher="mc"``, a one-shot iterator for two passes."""
    if fisher == "mc" and loss_fn is not None and logits_fn is None:
        raise ValueError(
            "fisher='mc' draws labels from the model's predictive distribution, so it needs logits, "
            "not a loss: pass logits_fn=lambda model, batch: <(..., C) logits> instead of loss_fn "
            "(or use fisher='empirical')"
        )
    if two_passes and isinstance(batches, Iterator):  # a DataLoader is re-iterable, a generator is not
        raise ValueError(
            "curvature='ekfac' makes two passes over the batches (factors, then per-example "
            "corrections), but a one-shot iterator was given; pass a list or a DataLoader"
        )


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen, restored afterwards (also on errors).

    Frozen parameters mean the backward passes compute no weight gradients (cheaper) and leave
    every ``.grad`` as the user had it; the capture hooks make the target outputs require grad.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def run_backward_passes(
    model: nn.Module,
    batches: Iterable[Any],
    session: CaptureSession,
    *,
    fisher: FisherType = "empirical",
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    what: str = "collect",
) -> int:
    """Forward and backward over ``batches`` while a capture is active; returns the batch count."""
    device = next(iter(model.parameters())).device
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    seen = 0
    for batch in tqdm(batches, total=total, disable=not progress, desc=f"torch_crisp {what}"):
        if max_batches is not None and seen >= max_batches:
            break
        seen += 1
        batch = move_to_device(batch, device)
        # the hooks read the mask during the forward pass, so set it first; as bool once per
        # batch rather than once per hooked layer
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        session.position_mask = mask.bool() if isinstance(mask, Tensor) else None
        loss = sum_reduced_loss(model, batch, fisher=fisher, loss_fn=loss_fn, logits_fn=logits_fn)
        if loss is None:
            continue
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not depend on any target module; check target_modules and that "
                "loss_fn runs the model"
            )
        loss.backward()
    return seen
