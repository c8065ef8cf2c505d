"""Evaluation of edits that does not flatter: greedy generation scored by exact match.

* **Generation** is greedy, from the prompt alone, and stops naturally: at the end-of-sequence
  token, a newline, a period that ends a sentence (``". "`` or a final ``"."``), or the token
  budget. The continuation up to the stop is compared with the target after
  :func:`normalize_answer`; extra words make it wrong (``"paris and rome"`` is not ``"paris"``).
* **Teacher-forced token accuracy** (the argmax at each target position given the true prefix)
  is reported beside it: it is what most editing papers report, and the gap between the two
  shows how much a metric can flatter.
* **Locality** compares the edited model's answer to a neighbour prompt with the *pre-edit*
  model's own answer (not with a data set's label), so it measures change, not knowledge.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..corpus import pad_token_id
from ..losses import IGNORE_INDEX
from .batching import collate, encode_example, encode_prompt
from .requests import EditRequest

__all__ = [
    "TokenScore",
    "cut_at_stop",
    "evaluate_requests",
    "exact_match",
    "generate_answers",
    "locality_reference",
    "normalize_answer",
    "perplexity",
    "teacher_forced",
]

_STOP = re.compile(r"\n|\.(?=\s)|\.$")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def cut_at_stop(text: str) -> str:
    """The continuation up to its natural stop (newline, sentence-ending period)."""
    match = _STOP.search(text)
    return text[: match.start()] if match else text


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, target: str) -> bool:
    """Exact match of two answers after :func:`normalize_answer` (an empty target never matches)."""
    target_norm = normalize_answer(target)
    return bool(target_norm) and normalize_answer(prediction) == target_norm


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _stop_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for stop in (".", "\n"):
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
            ids.append(int(encoded[0]))
    return ids


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    chat_template: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its natural stop (see module docstring).

    Rows are left-padded; the model receives the attention mask, so a row's answer does not
    depend on the other rows of its batch.
    """
    was_training = model.training
    model.eval()
    stops = _stop_token_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts[start : start + batch_size]]
            batch = {k: v.to(_device(model)) for k, v in collate(encoded, pad, padding_side="left").items()}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=pad,
            )
            for row in output[:, batch["input_ids"].shape[1] :]:
                answers.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True)).strip())
    finally:
        model.train(was_training)
    return answers


@dataclass
class TokenScore:
    """Teacher-forced score of one target: fraction of its tokens that are the argmax."""

    accuracy: float
    all_correct: bool


@torch.no_grad()
def teacher_forced(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    chat_template: bool = False,
) -> list[TokenScore]:
    """Per-example teacher-forced token accuracy of ``targets`` after ``prompts``."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer)
    scores: list[TokenScore] = []
    try:
        for start in range(0, len(prompts), batch_size):
            examples = [
                encode_example(tokenizer, p, t, chat_template)
                for p, t in zip(prompts[start : start + batch_size], targets[start : start + batch_size])
            ]
            batch = collate([e.input_ids for e in examples], pad, labels=[e.labels for e in examples])
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted = logits[:, :-1].argmax(-1)
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE_INDEX
            correct = (predicted == labels) & scored
            for row in range(labels.shape[0]):
                n = int(scored[row].sum())
                k = int(correct[row].sum())
                scores.append(TokenScore(k / n if n else 0.0, n > 0 and k == n))
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> float:
    """Token-level perplexity of ``texts`` (every token after the first; padding excluded)."""
    from .batching import collate_texts

    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = {
                k: v.to(_device(model)) for k, v in collate_texts(tokenizer, texts[start : start + batch_size]).items()
            }
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))


def locality_reference(
    model: Any, tokenizer: Any, requests: Sequence[EditRequest], **generation: Any
) -> list[list[str]]:
    """The *pre-edit* model's own answers to every request's locality prompts."""
    flat = [p for r in requests for p in r.locality_prompts]
    answers = iter(generate_answers(model, tokenizer, flat, **generation))
    return [[next(answers) for _ in r.locality_prompts] for r in requests]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    reference: Sequence[Sequence[str]] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    chat_template: bool = False,
) -> dict[str, Any]:
    """Reliability, generalisation and locality of ``requests`` in ``model``.

    Args:
        reference: pre-edit answers to the locality prompts (:func:`locality_reference`);
            without it, locality is not measured.

    Returns:
        ``reliability`` / ``generalization`` (exact match of greedy answers to the prompts /
        paraphrases), ``locality`` (fraction of locality prompts whose greedy answer equals the
        pre-edit answer), the teacher-forced ``*_token_accuracy`` of the first two, and counts.
        Rates are pooled over prompts; a metric without prompts is ``None``.
    """
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template": chat_template}
    prompts = [r.prompt for r in requests]
    para_prompts = [p for r in requests for p in r.paraphrases]
    para_targets = [r.target_new for r in requests for _ in r.paraphrases]
    answers = generate_answers(model, tokenizer, prompts + para_prompts, **gen)
    edit_answers, para_answers = answers[: len(prompts)], answers[len(prompts) :]
    tf = teacher_forced(
        model,
        tokenizer,
        prompts + para_prompts,
        [r.target_new for r in requests] + para_targets,
        batch_size=batch_size,
        chat_template=chat_template,
    )
    result: dict[str, Any] = {
        "reliability": _mean([exact_match(a, r.target_new) for a, r in zip(edit_answers, requests)]),
        "generalization": _mean([exact_match(a, t) for a, t in zip(para_answers, para_targets)]),
        "reliability_token_accuracy": _mean([s.accuracy for s in tf[: len(prompts)]]),
        "generalization_token_accuracy": _mean([s.accuracy for s in tf[len(prompts) :]]),
        "num_requests": len(requests),
        "num_paraphrases": len(para_prompts),
    }
    if reference is not None:
        if len(reference) != len(requests):
            raise ValueError(f"{len(reference)} locality references for {len(requests)} requests")
        flat_ref = [a for ref in reference for a in ref]
        loc_answers = generate_answers(model, tokenizer, [p for r in requests for p in r.locality_prompts], **gen)
        if len(flat_ref) != len(loc_answers):
            raise ValueError("locality references do not match the requests' locality prompts")
        result["locality"] = _mean([normalize_answer(a) == normalize_answer(b) for a, b in zip(loc_answers, flat_ref)])
        result["num_locality_prompts"] = len(loc_answers)
    result["examples"] = [
        {"prompt": r.prompt, "target_new": r.target_new, "generated": a} for r, a in zip(requests[:5], edit_answers)
    ]
    return result
