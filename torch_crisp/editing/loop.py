"""The edit loop: teacher-forced fine-tuning on the edit requests until they are learnt.

The loop is method-agnostic: it receives any ``torch.optim.Optimizer`` (plain Adam for
fine-tuning, a :class:`~torch_crisp.CrispOptimizer` for CrispEdit) and stops once a given
fraction of the requests is learnt (every target token is the teacher-forced argmax), or after
``max_epochs``. Stopping on the same criterion is what makes methods comparable: each is driven
to the same reliability, and then the damage it did elsewhere is measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batching import edit_batches
from .evaluation import teacher_forced
from .requests import EditRequest

__all__ = ["EditRun", "EditSettings", "apply_edits", "train_only"]


@dataclass
class EditSettings:
    """How long and how hard to train on the edits.

    Attributes:
        max_epochs: passes over the requests at most.
        batch_size: requests per optimizer step.
        stop_at: stop once this fraction of requests is learnt (teacher-forced, all tokens).
        chat_template: wrap prompts in the tokenizer's chat template.
        include_paraphrases: also train on paraphrases (they then stop measuring generalisation).
        progress: show a progress bar.
    """

    max_epochs: int = 40
    batch_size: int = 16
    stop_at: float = 1.0
    chat_template: bool = False
    include_paraphrases: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("max_epochs and batch_size must be positive")
        if not 0.0 < self.stop_at <= 1.0:
            raise ValueError(f"stop_at must lie in (0, 1], got {self.stop_at}")


@dataclass
class EditRun:
    """What the loop did: steps, epochs, wall time, final loss and learnt fraction per epoch."""

    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    learnt: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "seconds": self.seconds,
            "final_loss": self.final_loss,
            "learnt_per_epoch": self.learnt,
        }


def train_only(model: nn.Module, module_names: Iterable[str]) -> list[nn.Parameter]:
    """Freeze every parameter except those of the named modules; return the trainable ones.

    Raises:
        KeyError: a name is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    names = list(module_names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"modules {missing} not found in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        for p in modules[name].parameters():
            if not p.requires_grad:
                p.requires_grad_(True)
                params.append(p)
    return params


def _learnt_fraction(model: Any, tokenizer: Any, requests: Sequence[EditRequest], settings: EditSettings) -> float:
    scores = teacher_forced(
        model,
        tokenizer,
        [r.prompt for r in requests],
        [r.target_new for r in requests],
        chat_template=settings.chat_template,
    )
    return sum(s.all_correct for s in scores) / len(scores)


def apply_edits(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    optimizer: torch.optim.Optimizer,
    settings: EditSettings | None = None,
) -> EditRun:
    """Train ``model`` on ``requests`` with ``optimizer`` (see module docstring).

    Only the parameters the optimizer holds are meant to change; freeze the rest beforehand
    (:func:`train_only`). The model is left in eval mode.
    """
    from tqdm.auto import tqdm

    settings = settings or EditSettings()
    if not requests:
        raise ValueError("no edit requests to apply")
    batches = edit_batches(
        tokenizer, requests, settings.batch_size, settings.chat_template, settings.include_paraphrases
    )
    device = next(model.parameters()).device
    run = EditRun()
    start = time.perf_counter()
    bar = tqdm(range(settings.max_epochs), disable=not settings.progress, desc="editing", leave=False)
    for epoch in bar:
        model.train()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.steps += 1
            run.final_loss = float(loss.detach())
        run.epochs = epoch + 1
        learnt = _learnt_fraction(model, tokenizer, requests, settings)
        run.learnt.append(learnt)
        bar.set_postfix(loss=f"{run.final_loss:.3f}", learnt=f"{learnt:.2f}")
        if learnt >= settings.stop_at:
            break
    bar.close()
    model.eval()
    run.seconds = time.perf_counter() - start
    return run
