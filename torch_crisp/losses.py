"""Loss adapters: what one batch contributes to the curvature, and to a training step.

The factors need the gradient of the **sum-reduced** loss (``docs/concepts.md``), whatever the
batch looks like: Hugging Face dict batches (the model returns a mean over label tokens, which is
rescaled by their count), a user's ``loss_fn``, or, for ``fisher="mc"``, cross-entropy against
labels sampled from the model's own predictive distribution. :func:`sum_reduced_loss` is the one
place that decides; :func:`training_loss` is the plain (mean) loss an editing loop steps on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from .config import FisherType
from .curvature import mc_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "LogitsFn",
    "LossFn",
    "mc_dict_loss",
    "num_loss_terms",
    "sum_reduced_loss",
    "tempered_dict_loss",
    "training_loss",
]

IGNORE_INDEX = -100
"""Label of positions that are no loss term (Hugging Face / PyTorch cross-entropy convention)."""

LossFn = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, Union[int, Tensor]]]]
"""``loss_fn(model, batch)`` returns the sum-reduced loss, or ``(mean-reduced loss, number of terms)``."""
LogitsFn = Callable[[nn.Module, Any], Tensor]
"""``logits_fn(model, batch)`` returns ``(..., C)`` logits, one cross-entropy term per leading position
(``fisher="mc"`` samples the labels from them)."""


def _output_field(output: Any, key: str) -> Any:
    return output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)


def num_loss_terms(model: nn.Module, labels: Tensor) -> int:
    """Number of terms a Hugging Face model averages its loss over.

    Token-level labels of a decoder-only model are shifted by one inside the model, so the first
    label never counts; encoder-decoder models and sequence-level labels are not shifted.
    """
    config = getattr(model, "config", None)
    if labels.dim() >= 2 and not getattr(config, "is_encoder_decoder", False):
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum().item())


def _logits_and_labels(model: nn.Module, batch: Mapping[str, Any], why: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(logits, labels, valid)`` of a Hugging Face-style batch, aligned as the model's loss aligns them.

    The loss terms are those the model's own loss would count: token-level labels of a decoder-only
    model are shifted (position ``t`` predicts token ``t+1``, counted where ``labels[t+1] != -100``);
    sequence-level labels and encoder-decoder models are not shifted. Without labels, every
    non-padding next-token prediction of a ``(batch, seq, vocab)`` output counts.
    """
    labels = batch.get("labels")
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    # The labels play no part in the model call; drop them so the model skips its own loss, except
    # for encoder-decoder models, which build their decoder inputs from them.
    inputs = batch if encoder_decoder else {k: v for k, v in batch.items() if k != "labels"}
    logits = _output_field(model(**inputs), "logits")
    if not isinstance(logits, Tensor):
        raise ValueError(
            f"{why} needs the model's logits, but {type(model).__name__}(**batch) returned none; pass "
            "logits_fn=lambda model, batch: <(..., C) logits>"
        )
    if labels is not None and labels.is_floating_point():
        raise ValueError(f"{why} supports softmax cross-entropy heads only; these labels are floats (regression)")
    token_level = logits.dim() >= 3 if labels is None else labels.dim() >= 2
    if labels is not None:
        valid = labels != IGNORE_INDEX
    elif batch.get("attention_mask") is not None and token_level:
        valid = batch["attention_mask"].bool()
    else:
        valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if token_level and not encoder_decoder:
        logits, valid = logits[..., :-1, :], valid[..., 1:]
        labels = labels[..., 1:] if labels is not None else None
    return logits, labels, valid


def mc_dict_loss(model: nn.Module, batch: Mapping[str, Any], temperature: float = 1.0) -> Tensor | None:
    """Sum-reduced cross-entropy of a Hugging Face-style batch against labels sampled from
    ``softmax(logits / temperature)`` (``None`` for a batch without loss terms)."""
    logits, _, valid = _logits_and_labels(model, batch, "fisher='mc'")
    if not valid.any():
        warnings.warn("skipping a batch with no loss terms (all labels -100)", stacklevel=4)
        return None
    return mc_cross_entropy(logits / temperature, valid)


def tempered_dict_loss(model: nn.Module, batch: Mapping[str, Any], temperature: float) -> Tensor | None:
    """Sum-reduced cross-entropy of ``logits / temperature`` against the batch's labels.

    A token the model predicts with probability ≈ 1 has an output gradient ≈ 0, so its share of
    the empirical Fisher all but vanishes, although a finite edit step can flip it. Softening the
    predictive distribution while collecting lets those directions count (``temperature=1`` is the
    plain empirical Fisher).
    """
    if "labels" not in batch:
        raise ValueError("temperature with fisher='empirical' needs dict batches with 'labels'")
    logits, labels, valid = _logits_and_labels(model, batch, "temperature")
    if not valid.any():
        warnings.warn("skipping a batch whose labels are all -100 (no loss terms)", stacklevel=4)
        return None
    assert labels is not None
    flat = (logits.float() / temperature).reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _hf_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` of a dict batch, with errors that say what to pass instead."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"batches of type {type(batch).__name__} need loss_fn=lambda model, batch: <loss>; without it, "
            "batches must be dicts of model inputs with 'labels'"
        )
    if "labels" not in batch:
        raise ValueError(
            "dict batches need 'labels' so model(**batch).loss exists (for causal LMs, "
            "labels = input_ids with padding set to -100), or pass loss_fn"
        )
    loss = _output_field(model(**batch), "loss")
    if loss is None:
        raise ValueError(f"{type(model).__name__}(**batch) returned no loss; pass loss_fn")
    return loss


def sum_reduced_loss(
    model: nn.Module,
    batch: Any,
    *,
    fisher: FisherType = "empirical",
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    temperature: float = 1.0,
) -> Tensor | None:
    """The sum-reduced loss of one batch for curvature collection (``None``: no loss terms, skip it).

    ``fisher="mc"`` samples labels (from ``logits_fn(model, batch)`` or ``model(**batch).logits``);
    otherwise ``loss_fn`` (a sum, or ``(mean, n_terms)``) or ``model(**batch).loss`` times the number
    of label tokens the model averaged over. ``temperature != 1`` divides the logits first (dict
    batches, or ``logits_fn`` with ``fisher="mc"``).
    """
    if fisher == "mc":
        if logits_fn is not None:
            return mc_cross_entropy(logits_fn(model, batch) / temperature)
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"fisher='mc' with batches of type {type(batch).__name__} needs "
                "logits_fn=lambda model, batch: <(..., C) logits>"
            )
        return mc_dict_loss(model, batch, temperature)
    if temperature != 1.0:
        if loss_fn is not None or not isinstance(batch, Mapping):
            raise ValueError(
                "temperature != 1 tempers the model's logits, so it needs Hugging Face dict batches with labels "
                "(not a loss_fn): build the batches as dicts, or collect with temperature=1"
            )
        return tempered_dict_loss(model, batch, temperature)
    if loss_fn is not None:
        result = loss_fn(model, batch)
        if isinstance(result, tuple):
            mean_loss, num_terms = result
            return mean_loss * num_terms
        return result
    loss = _hf_loss(model, batch)
    num_terms = num_loss_terms(model, batch["labels"])
    if num_terms == 0:
        warnings.warn("skipping a batch whose labels are all -100 (no loss terms)", stacklevel=4)
        return None
    # Hugging Face returns the mean over num_terms; the factors need the sum-reduced loss.
    return loss * num_terms


def training_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> Tensor:
    """The loss a training step backpropagates: ``loss_fn``'s (the mean of a tuple) or the model's."""
    if loss_fn is not None:
        result = loss_fn(model, batch)
        return result[0] if isinstance(result, tuple) else result
    return _hf_loss(model, batch)
