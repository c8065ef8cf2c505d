"""Plain-text corpora to causal-LM batches for curvature collection (used by the command line).

Reads ``.txt`` (one document per line, or documents separated by blank lines) and ``.jsonl``
(one JSON object per line with a text field), tokenises each document with any Hugging Face-style
tokenizer (``tokenizer(texts)["input_ids"]``), cuts it into windows of at most ``seq_len`` tokens
(documents are never concatenated, so no window attends across a document boundary), and pads
windows into batches with ``attention_mask`` and ``labels`` (padding: mask 0, label -100).
The collected token count ``N`` is the number of non-padding positions, i.e. the summed window
lengths, which ``max_tokens`` bounds exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["lm_batches", "pad_token_id", "read_documents", "token_windows"]

_SPLITS = ("auto", "line", "blank")
_TOKENIZE_CHUNK = 256  # documents per tokenizer call: batched calls are much faster


def read_documents(path: str | os.PathLike[str], *, split: str = "auto", text_field: str = "text") -> list[str]:
    """Documents of a ``.txt`` or ``.jsonl`` file (empty documents dropped).

    Args:
        split: for ``.txt``: ``"line"`` (one document per line), ``"blank"`` (documents separated
            by blank lines; their lines are joined with newlines), or ``"auto"`` (``"blank"`` if
            the file has a blank line between two non-blank lines, else ``"line"``).
        text_field: the key holding the text in each ``.jsonl`` object.

    Raises ``FileNotFoundError`` / ``IsADirectoryError``, or ``ValueError`` with the offending line number.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"data file {file} is a folder; pass a .txt or .jsonl file")
    if not file.is_file():
        raise FileNotFoundError(f"data file {file} does not exist")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    suffix = file.suffix.lower()
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix == ".jsonl":
        documents = _jsonl_documents(file, text, text_field)
    elif suffix == ".txt":
        documents = _txt_documents(text, split)
    else:
        raise ValueError(f"{file}: unsupported data format {suffix or '(no extension)'!r}; use .txt or .jsonl")
    if not documents:
        raise ValueError(f"{file} contains no non-empty documents")
    return documents


def _txt_documents(text: str, split: str) -> list[str]:
    lines = text.splitlines()
    if split == "auto":
        stripped = [line.strip() for line in lines]
        first = next((i for i, s in enumerate(stripped) if s), None)
        last = max((i for i, s in enumerate(stripped) if s), default=None)
        inner_blank = first is not None and any(not s for s in stripped[first : last + 1])
        split = "blank" if inner_blank else "line"
    if split == "line":
        return [line.strip() for line in lines if line.strip()]
    documents, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            documents.append("\n".join(current))
            current = []
    return documents


def _jsonl_documents(file: Path, text: str, field: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{file}:{number}: expected an object with a {field!r} field")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{file}:{number}: field {field!r} is {type(value).__name__}, not a string")
        if value.strip():
            documents.append(value)
    return documents


def token_windows(
    tokenizer: Any, documents: Iterable[str], *, seq_len: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Token windows of at most ``seq_len`` ids, in document order, ``max_tokens`` ids in total.

    Windows shorter than 2 tokens are dropped (they have no next-token target). The last window
    is cut so that the total is exactly ``max_tokens`` when the corpus is long enough. With
    ``max_tokens``, tokenisation is bounded by the budget, not by the corpus: documents are
    tokenised a chunk at a time until the budget is reached, and a long document only up to a
    prefix of 16 characters per token still needed (plus a margin; longer if that prefix yields
    too few tokens), so a single 18 MB line costs no more than the tokens taken from it.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    remaining = max_tokens
    for chunk in _chunks(documents, _TOKENIZE_CHUNK):
        for ids in _tokenized(tokenizer, chunk, remaining):
            for start in range(0, len(ids), seq_len):
                window = list(ids[start : start + seq_len])
                if remaining is not None:
                    window = window[:remaining]
                if len(window) < 2:
                    continue
                yield window
                if remaining is not None:
                    remaining -= len(window)
                    if remaining < 2:
                        return


# A generous bound on the characters per token of real text (English averages about 4), and the
# tokens at the end of a cut-off prefix that may differ from the whole document's (a cut word).
_CHARS_PER_TOKEN = 16
_CUT_MARGIN = 64


def _tokenized(tokenizer: Any, texts: list[str], budget: int | None) -> Iterator[Sequence[int]]:
    """The ids of each text; with a ``budget``, at least its first ``budget`` ids, from bounded prefixes."""
    if budget is None:
        yield from tokenizer(texts)["input_ids"]
        return
    limit = _CHARS_PER_TOKEN * (budget + _CUT_MARGIN)
    for text, ids in zip(texts, tokenizer([text[:limit] for text in texts])["input_ids"]):
        yield ids if len(text) <= limit else _prefix_ids(tokenizer, text, budget, limit, ids)


def _prefix_ids(tokenizer: Any, text: str, budget: int, limit: int, ids: Sequence[int]) -> Sequence[int]:
    """The first ``budget`` ids of ``text`` from a prefix of it: ``ids`` (of ``text[:limit]``), or of a
    four times longer prefix while that yields fewer than ``budget + _CUT_MARGIN`` ids.

    The last ``_CUT_MARGIN`` ids of a prefix are never used, since cutting a word in two changes
    its tokens; exact for tokenizers whose tokens do not span more than that margin.
    """
    while len(ids) < budget + _CUT_MARGIN and limit < len(text):
        limit *= 4
        ids = tokenizer([text[:limit]])["input_ids"][0]
    return ids if limit >= len(text) else ids[:budget]


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def lm_batches(windows: Sequence[Sequence[int]], *, batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels"}`` of ``batch_size`` windows.

    ``labels`` equal ``input_ids`` with padding set to -100; the model shifts them internally.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    batches = []
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        width = max(len(w) for w in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, window in enumerate(group):
            input_ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
            attention_mask[row, : len(window)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0.

    Padding positions have ``attention_mask == 0`` and label -100 everywhere torch_crisp builds
    batches (collection, editing, evaluation), so they are never attended to, scored or
    collected, and any valid id will do.
    """
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0
