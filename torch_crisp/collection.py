"""Data passes: run batches through the model with a capture active, and backpropagate.

What happens around the hooks of :mod:`torch_crisp.capture` during ``collect``: the model runs in
eval mode with every parameter frozen (no weight gradients are computed and the user's ``.grad``
stay as they were), each batch moves to the model's device, its ``attention_mask`` becomes the
position mask the hooks read, and the sum-reduced loss (:mod:`torch_crisp.losses`) is
backpropagated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .capture import CaptureSession, OutputGradientHooks
from .config import FisherType
from .dtensor import is_dtensor
from .losses import IGNORE_INDEX, LogitsFn, LossFn, sum_reduced_loss
from .state import LayerState
from .sync import RankSync
from .user_warnings import warn_user

__all__ = [
    "as_batches",
    "PassReport",
    "causal_lm_collate",
    "check_batches",
    "decoder_layer_names",
    "restored_on_error",
    "run_pass",
    "sharded_padding",
    "is_example_data",
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


def is_example_data(data: Any) -> bool:
    """True for data sets of single examples (to be batched by a collator), False for batches.

    A torch ``Dataset`` or a Hugging Face ``datasets.Dataset`` holds examples; so does a sequence
    of dicts whose ``input_ids`` is a list of ids or a 1-D tensor (a batch holds a 2-D tensor).
    """
    if isinstance(data, torch.utils.data.DataLoader):
        return False
    if isinstance(data, torch.utils.data.Dataset) or hasattr(data, "column_names"):
        return True
    if isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], Mapping):
        ids = data[0].get("input_ids")
        return ids is not None and not (isinstance(ids, Tensor) and ids.dim() >= 2)
    return False


def causal_lm_collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Right-pad tokenised examples into a causal-LM batch: ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` default to the input ids; padding gets ``attention_mask`` 0 and label -100, so the
    pad id (0) is never attended to, scored or collected (what ``DataCollatorForLanguageModeling(
    tokenizer, mlm=False)`` produces, without needing the tokenizer).
    """
    if not examples or not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
        raise ValueError(
            "examples to collect on must be dicts with tokenised 'input_ids' (a list of ids or a 1-D tensor); "
            "tokenise the text first (dataset.map(lambda e: tokenizer(e['text']), batched=True))"
        )
    rows = [torch.as_tensor(e["input_ids"], dtype=torch.long).reshape(-1) for e in examples]
    width = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (example, ids) in enumerate(zip(examples, rows)):
        n = len(ids)
        mask = example.get("attention_mask")
        mask = torch.ones(n, dtype=torch.long) if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(-1)
        labels = example.get("labels")
        labels = ids if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        batch["input_ids"][i, :n] = ids
        batch["attention_mask"][i, :n] = mask
        batch["labels"][i, :n] = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return batch


def as_batches(
    data: Iterable[Any], collate_fn: Callable[[list[Any]], Any] | None = None, batch_size: int | None = None
) -> Iterable[Any]:
    """``data`` itself if it holds batches; examples batched into a ``DataLoader`` otherwise.

    Examples are batched with ``collate_fn`` (default :func:`causal_lm_collate`) and ``batch_size``
    (default 8), in order.
    """
    if not is_example_data(data):
        if collate_fn is not None or batch_size is not None:
            raise ValueError("collate_fn / batch_size apply to data sets of single examples; these are batches")
        return data
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return torch.utils.data.DataLoader(
        data,  # type: ignore[arg-type]
        batch_size=batch_size or 8,
        shuffle=False,
        collate_fn=collate_fn or causal_lm_collate,
    )


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


@dataclass
class PassReport:
    """What one data pass did: batches read, skipped for a NaN/inf loss, padding passes, rejected positions."""

    batches: int = 0
    nonfinite_batches: int = 0
    padding_passes: int = 0
    rejected_positions: dict[str, float] = field(default_factory=dict)  # per layer: NaN/inf positions left out


def decoder_layer_names(model: nn.Module, modules: Mapping[str, nn.Module]) -> frozenset[str]:
    """For an encoder-decoder model, the names in ``modules`` that are not inside its encoder.

    Their positions are the decoder's (the labels'), not the encoder input's ``attention_mask``.
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return frozenset()
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model without get_encoder(); torch_crisp cannot tell "
            "which layers see decoder positions. Collect with a loss_fn and batches without attention_mask"
        )
    inside = {id(m) for m in encoder.modules()}
    return frozenset(name for name, module in modules.items() if id(module) not in inside)


def _decoder_mask(batch: Any) -> Tensor | None:
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, Tensor):
        return mask.bool()
    labels = batch.get("labels")
    return labels != IGNORE_INDEX if isinstance(labels, Tensor) and labels.dim() >= 2 else None


@contextmanager
def restored_on_error(layers: Mapping[str, LayerState], sync: RankSync) -> Iterator[None]:
    """Undo every change to ``layers`` (and ``sync``'s bookkeeping) if the block raises, Ctrl-C included.

    A collection that fails part-way (a bad batch, out of memory, an interrupt) then leaves the
    factor sums, counts and bases exactly as they were, so a retry does not count data twice. The
    existing sums are copied while the block runs (twice their memory, only when there are sums).
    """
    saved = {name: state.checkpoint() for name, state in layers.items()}
    flags = sync.flags()
    try:
        yield
    except BaseException:
        for name, state in layers.items():
            state.restore(saved[name])
        sync.set_flags(flags)
        raise


def sharded_padding(model: nn.Module, batches: Iterable[Any], max_batches: int | None, sync: RankSync) -> tuple[
    Iterable[Any], int
]:
    """``(batches, padding passes)`` so every rank of an FSDP2 model runs the same number of passes.

    Every forward of a sharded model gathers parameters from all ranks, so a rank with fewer
    batches would leave the others waiting forever. Ranks with fewer batches run zero-weight
    passes (they add nothing) on their first batch; a rank without any batch cannot, and all
    ranks raise the same ``ValueError`` instead of hanging.
    """
    if not sync.active or not any(is_dtensor(p) for p in model.parameters()):
        return batches, 0
    if not isinstance(batches, Sized):
        batches = list(batches)
    local = len(batches) if max_batches is None else min(len(batches), max_batches)  # type: ignore[arg-type]
    most, fewest = distributed.extreme_counts(local, sync.process_group)
    if fewest == 0:
        raise ValueError(
            f"under FSDP2 every rank must collect at least one batch (the ranks got between {fewest} and {most}); "
            "give every rank a share of the capability data (crisp_accelerate.collect / shard_batches with at "
            "least as many batches as ranks)"
        )
    return batches, most - local


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
    temperature: float = 1.0,
    report: PassReport | None = None,
) -> PassReport:
    """Forward and backward over ``batches`` while a capture is active; returns what happened.

    A batch whose loss is NaN or infinite is skipped before its backward pass (counted in the
    report), so it never reaches the factor sums.
    """
    report = report if report is not None else PassReport()
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
        # the hooks read the masks during the forward pass, so set them first; as bool once per
        # batch rather than once per hooked layer
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        session.position_mask = mask.bool() if isinstance(mask, Tensor) else None
        if session.decoder_layers:
            session.decoder_position_mask = _decoder_mask(batch)
        loss = sum_reduced_loss(
            model, batch, fisher=fisher, loss_fn=loss_fn, logits_fn=logits_fn, temperature=temperature
        )
        if loss is None:
            continue
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not depend on any target module; check target_modules and that "
                "loss_fn runs the model"
            )
        if not bool(torch.isfinite(loss.detach()).all()):
            report.nonfinite_batches += 1
            continue
        loss.backward()
    report.batches += seen
    return report


def run_pass(
    model: nn.Module,
    layers: Mapping[str, LayerState],
    capture: OutputGradientHooks,
    batches: Iterable[Any],
    *,
    sync: RankSync,
    weight: float,
    fisher: FisherType,
    temperature: float,
    loss_fn: LossFn | None,
    logits_fn: LogitsFn | None,
    max_batches: int | None,
    progress: bool,
    what: str,
) -> PassReport:
    """One data pass of ``collect`` (or EK-FAC's second pass) with ``capture`` active.

    Frozen eval mode, the encoder-decoder position masks, zero-weight padding passes for sharded
    models (:func:`sharded_padding`), and a warning naming what was left out for being non-finite.
    """
    batches, padding = sharded_padding(model, batches, max_batches, sync)
    decoder = decoder_layer_names(model, {name: state.geometry.module for name, state in layers.items()})
    settings: dict[str, Any] = dict(fisher=fisher, loss_fn=loss_fn, logits_fn=logits_fn, temperature=temperature)
    with frozen_eval(model), capture.capturing(CaptureSession(weight=weight, decoder_layers=decoder)) as session:
        report = run_backward_passes(
            model, batches, session, max_batches=max_batches, progress=progress, what=what, **settings
        )
        if padding:  # zero-weight passes keep every rank of a sharded model in step; they add nothing
            session.weight = 0.0
            run_backward_passes(model, [next(iter(batches))] * padding, session, progress=False, **settings)
            report.padding_passes = padding
    rejected = {name: state.settle_rejections() for name, state in layers.items()}
    report.rejected_positions = {name: count for name, count in rejected.items() if count}
    if report.nonfinite_batches or report.rejected_positions:
        rejected_text = report.rejected_positions
        left_out = f" and left out NaN/inf contributions to {rejected_text}" if rejected_text else ""
        warn_user(
            f"{what}: skipped {report.nonfinite_batches} batch(es) with a NaN/inf loss{left_out}; the curvature was "
            "collected on the rest"
        )
    return report
