"""Knowledge editing with CrispEdit: edit requests, batching, evaluation, the edit loop, the demo.

This subpackage works with Hugging Face causal language models and tokenizers, but imports
``transformers`` / ``tokenizers`` / ``peft`` only inside the functions that need them, and
:mod:`torch_crisp` never imports it: ``import torch_crisp`` stays free of Hugging Face.

* :mod:`~torch_crisp.editing.requests`: :class:`EditRequest` and readers for EasyEdit,
  CounterFact and ZsRE records (:func:`load_requests`).
* :mod:`~torch_crisp.editing.batching`: target-only teacher-forced batches.
* :mod:`~torch_crisp.editing.evaluation`: greedy generation with natural stopping, exact match,
  teacher-forced accuracy, locality against the pre-edit model, perplexity.
* :mod:`~torch_crisp.editing.loop`: :func:`apply_edits` with any optimizer (e.g. a
  :class:`~torch_crisp.CrispOptimizer`).
* :mod:`~torch_crisp.editing.demo`: the self-contained demo (world, tokenizer, tiny Llama,
  method comparison) behind ``torch-crisp demo``.
"""

from .batching import edit_batches, encode_example
from .evaluation import (
    evaluate_requests,
    exact_match,
    generate_answers,
    locality_reference,
    normalize_answer,
    perplexity,
    teacher_forced,
)
from .loop import EditRun, EditSettings, apply_edits, train_only
from .requests import EditDataError, EditRequest, load_requests, parse_record, save_requests

__all__ = [
    "EditDataError",
    "EditRequest",
    "EditRun",
    "EditSettings",
    "apply_edits",
    "edit_batches",
    "encode_example",
    "evaluate_requests",
    "exact_match",
    "generate_answers",
    "load_requests",
    "locality_reference",
    "normalize_answer",
    "parse_record",
    "perplexity",
    "save_requests",
    "teacher_forced",
    "train_only",
]
