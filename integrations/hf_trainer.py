"""Hugging Face ``Trainer`` integration: capability-preserving fine-tuning in an unchanged script.

Three doors, same guarantee:

* :class:`CrispCallback` — add ``callbacks=[CrispCallback(projector, mode="update")]`` to a
  ``Trainer``. Whatever optimizer the Trainer builds (``optim=`` AdamW fused or not, SGD,
  Adafactor, ...), the callback constrains every target layer around each optimizer step
  (:mod:`torch_crisp.integrations.hf_callback` gives the order of events).
* :class:`CrispArguments` — a dataclass that parses alongside ``TrainingArguments`` with
  ``HfArgumentParser`` (every field has a default) and builds the projector and the callback in
  one call: ``callback = crisp_args.build_callback(model, tokenizer)``.
* ``Trainer(optimizers=(CrispOptimizer(inner, projector), None))`` or
  ``Trainer(optimizer_cls_and_kwargs=crisp_optimizer_cls_and_kwargs(projector, torch.optim.AdamW,
  lr=...))`` — the projection lives in the optimizer; a :class:`CrispCallback` added as well then
  only logs (and checkpoints the projector) instead of projecting twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torch_crisp import CrispOptimizer, CrispProjector
from torch_crisp.config import DEFAULT_MODE, LOW_RANKS, MODES, LowRank, Mode, check_choice

from .hf_arguments import CrispArguments
from .hf_callback import CONSTRAINT_FILE, PROJECTOR_DIR, CrispCallback, check_projector_matches, freeze_unprojected

__all__ = [
    "CONSTRAINT_FILE",
    "PROJECTOR_DIR",
    "CrispArguments",
    "CrispCallback",
    "check_projector_matches",
    "crisp_optimizer_cls_and_kwargs",
    "freeze_unprojected",
]


# ----------------------------------------------------------------------------- optimizer factory
def crisp_optimizer_cls_and_kwargs(
    projector: CrispProjector,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    mode: Mode = DEFAULT_MODE,
    low_rank: LowRank = "auto",
    **optimizer_kwargs: Any,
) -> tuple[Callable[[], Callable[..., CrispOptimizer]], dict[str, Any]]:
    """A value for ``Trainer(optimizer_cls_and_kwargs=...)`` that builds a ``CrispOptimizer``.

    The Trainer calls a non-``Optimizer`` first element as a factory: ``factory()(model, **kwargs)``.
    The factory checks that ``model`` is the projector's model, builds
    ``optimizer_cls(params, **kwargs)`` over the trainable parameters — with ``weight_decay``
    (if given) applied to matrices only, not to biases and norm scales (tensors of dimension < 2),
    the Trainer's usual convention — and wraps it in ``CrispOptimizer(..., projector, mode, low_rank)``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,                       # doctest: +SKIP
        ...     optimizer_cls_and_kwargs=crisp_optimizer_cls_and_kwargs(projector, torch.optim.SGD, lr=0.1))
    """
    check_choice("mode", mode, MODES)
    check_choice("low_rank", low_rank, LOW_RANKS)

    def build(model: nn.Module, **kwargs: Any) -> CrispOptimizer:
        check_projector_matches(projector, model)
        kwargs = dict(kwargs)
        decay = kwargs.pop("weight_decay", None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if decay is None:
            groups: list[dict[str, Any]] = [{"params": trainable}]
        else:
            groups = [
                {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": decay},
                {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
        return CrispOptimizer(optimizer_cls(groups, **kwargs), projector, mode=mode, low_rank=low_rank)

    def factory() -> Callable[..., CrispOptimizer]:
        return build

    return factory, dict(optimizer_kwargs)
