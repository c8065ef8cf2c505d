"""Tokenising edit requests into batches for a decoder-only language model.

The edit loss is teacher-forced cross-entropy on the **target tokens only**: the prompt's labels
are ``-100`` (Hugging Face's ignore index), so the model learns the answer, not the question.
Training batches are right-padded (positions then start at 0 for every row, as in
pretraining); generation batches are left-padded so that every row's next token is at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..corpus import pad_token_id
from ..losses import IGNORE_INDEX
from .requests import EditRequest

__all__ = [
    "EncodedExample",
    "collate",
    "collate_texts",
    "edit_batches",
    "encode_example",
    "encode_prompt",
    "encode_target",
]


@dataclass
class EncodedExample:
    """Token ids of prompt + target, and labels that only score the target."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens (BOS) or its chat template."""
    if chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_target(tokenizer: Any, target: str, chat_template: bool = False) -> list[int]:
    """Token ids of an answer as it continues a prompt: a leading space unless in a chat turn."""
    text = target if chat_template else " " + target.lstrip()
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def encode_example(tokenizer: Any, prompt: str, target: str, chat_template: bool = False) -> EncodedExample:
    """Prompt and target tokenised separately and concatenated (so the split point is exact)."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
    target_ids = encode_target(tokenizer, target, chat_template)
    return EncodedExample(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, len(prompt_ids))


def collate(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Pad to a batch: ``input_ids``, ``attention_mask`` and (if given) ``labels`` (pad = -100)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
        if lab is not None and labels is not None:
            lab[row, span] = torch.tensor(labels[row], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        batch["labels"] = lab
    return batch


def collate_texts(tokenizer: Any, texts: Sequence[str]) -> dict[str, Tensor]:
    """Language-modelling batch of whole texts: every non-padding token is scored."""
    encoded = [list(tokenizer(text)["input_ids"]) for text in texts]
    return collate(encoded, pad_token_id(tokenizer), labels=encoded, padding_side="right")


def edit_batches(
    tokenizer: Any,
    requests: Sequence[EditRequest],
    batch_size: int = 16,
    chat_template: bool = False,
    include_paraphrases: bool = False,
) -> list[dict[str, Tensor]]:
    """Right-padded training batches of ``prompt -> target_new`` (in request order).

    ``include_paraphrases`` also trains on each request's paraphrases (then they no longer
    measure generalisation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pairs = [(r.prompt, r.target_new) for r in requests]
    if include_paraphrases:
        pairs += [(p, r.target_new) for r in requests for p in r.paraphrases]
    examples = [encode_example(tokenizer, prompt, target, chat_template) for prompt, target in pairs]
    pad = pad_token_id(tokenizer)
    return [
        collate([e.input_ids for e in chunk], pad, labels=[e.labels for e in chunk], padding_side="right")
        for chunk in (examples[i : i + batch_size] for i in range(0, len(examples), batch_size))
    ]
