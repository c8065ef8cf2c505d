"""``CrispArguments``: torch_crisp's command-line options for scripts built on ``HfArgumentParser``.

Parses alongside ``TrainingArguments`` (every field has a default, so a script parses with no
extra flag) and builds the projector and the Trainer callback in one call::

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, CrispArguments))
    model_args, data_args, training_args, crisp_args = parser.parse_args_into_dataclasses()
    ...
    trainer = Trainer(..., callbacks=[crisp_args.build_callback(model, tokenizer)])

``--capability_file corpus.txt`` (or ``--crisp_factors <folder from torch-crisp collect>``) says what
to protect; the curvature is collected when training starts, on the device the Trainer chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from torch_crisp import CrispConfig, CrispProjector
from torch_crisp.config import BASIS_PLACEMENTS, CURVATURES, DEFAULT_MODE, LOW_RANKS, MODES, check_choice
from torch_crisp.corpus import lm_batches, pad_token_id, read_documents, token_windows

from .hf_callback import CrispCallback

__all__ = ["CrispArguments"]

_DEFAULTS = CrispConfig()


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class CrispArguments:
    """torch_crisp options (prefix ``crisp_`` or ``capability_`` so they never clash with others)."""

    capability_file: str | None = field(
        default=None, metadata=_help(".txt (one document per line) or .jsonl capability corpus to protect")
    )
    crisp_factors: str | None = field(
        default=None, metadata=_help("projector folder from `torch-crisp collect` (instead of --capability_file)")
    )
    crisp_target_modules: list[str] = field(
        default_factory=lambda: list(_DEFAULTS.target_modules),
        metadata=_help("module-name suffixes to constrain, or all-linear"),
    )
    crisp_gamma: float | None = field(
        default=None,
        metadata=_help(
            f"energy threshold in (0, 1); larger blocks more (default: {_DEFAULTS.gamma}, or none when "
            "--crisp_capability_budget is given, or the saved one with --crisp_factors)"
        ),
    )
    crisp_capability_budget: float | None = field(
        default=None, metadata=_help("allowed predicted increase of the capability loss, in nats (e.g. 0.05)")
    )
    crisp_mode: str = field(default=DEFAULT_MODE, metadata=_help(f"one of {MODES}: project the change or the gradient"))
    crisp_low_rank: str = field(
        default="auto", metadata=_help(f"one of {LOW_RANKS}: grad mode's low-rank step from the tokens' factors")
    )
    crisp_basis_placement: str = field(
        default=_DEFAULTS.basis_placement,
        metadata=_help(f"one of {BASIS_PLACEMENTS}: every basis on every rank, or each on the rank that computed it"),
    )
    crisp_curvature: str = field(default=_DEFAULTS.curvature, metadata=_help(f"one of {CURVATURES}"))
    crisp_temperature: float = field(
        default=_DEFAULTS.temperature, metadata=_help("softmax temperature of the curvature collection")
    )
    capability_text_field: str = field(default="text", metadata=_help("text field of .jsonl capability files"))
    capability_seq_len: int = field(default=512, metadata=_help("tokens per capability window"))
    capability_batch_size: int = field(default=8, metadata=_help("capability windows per collection batch"))
    max_capability_tokens: int | None = field(default=None, metadata=_help("stop collecting after N tokens"))
    capability_eval_file: str | None = field(
        default=None, metadata=_help("held-out capability text whose real loss is logged next to the prediction")
    )
    capability_eval_steps: int = field(default=50, metadata=_help("log the held-out capability loss every N steps"))
    freeze_unprojected: bool = field(
        default=False, metadata=_help("freeze every parameter outside the constrained layers")
    )

    def __post_init__(self) -> None:
        check_choice("crisp_mode", self.crisp_mode, MODES)
        check_choice("crisp_curvature", self.crisp_curvature, CURVATURES)
        check_choice("crisp_low_rank", self.crisp_low_rank, LOW_RANKS)
        check_choice("crisp_basis_placement", self.crisp_basis_placement, BASIS_PLACEMENTS)
        for name in ("capability_seq_len", "capability_batch_size", "capability_eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def config(self) -> CrispConfig:
        """The :class:`~torch_crisp.CrispConfig` these options describe."""
        targets: Any = self.crisp_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        gamma = self.crisp_gamma
        if gamma is None and self.crisp_capability_budget is None:
            gamma = _DEFAULTS.gamma
        return CrispConfig(
            target_modules=targets, gamma=gamma, curvature=self.crisp_curvature,  # type: ignore[arg-type]
            capability_budget=self.crisp_capability_budget, temperature=self.crisp_temperature,
            basis_placement=self.crisp_basis_placement,  # type: ignore[arg-type]
        )

    def _batches(self, path: str, tokenizer: Any, max_tokens: int | None) -> list:
        if tokenizer is None:
            raise ValueError(f"reading {path} needs the tokenizer: build_callback(model, tokenizer)")
        documents = read_documents(path, text_field=self.capability_text_field)
        windows = list(token_windows(tokenizer, documents, seq_len=self.capability_seq_len, max_tokens=max_tokens))
        if not windows:
            raise ValueError(f"{path} yields no window of at least 2 tokens")
        return lm_batches(windows, batch_size=self.capability_batch_size, pad_id=pad_token_id(tokenizer))

    def build_callback(self, model: nn.Module, tokenizer: Any = None) -> CrispCallback:
        """The projector for ``model`` and its :class:`CrispCallback` (collecting when training starts)."""
        if (self.capability_file is None) == (self.crisp_factors is None):
            raise ValueError(
                "say what to protect: pass exactly one of --capability_file <corpus.txt|.jsonl> and "
                "--crisp_factors <projector folder from `torch-crisp collect`>"
            )
        if self.crisp_factors is not None:
            projector = CrispProjector.from_pretrained(self.crisp_factors, model, gamma=self.crisp_gamma)
            if self.crisp_capability_budget is not None:
                projector.config.capability_budget = self.crisp_capability_budget
                projector.config.validate()
            capability = None
        else:
            projector = CrispProjector(model, self.config())
            capability = self._batches(self.capability_file, tokenizer, self.max_capability_tokens)  # type: ignore[arg-type]
        evaluation = None
        if self.capability_eval_file is not None:
            evaluation = self._batches(self.capability_eval_file, tokenizer, None)
        return CrispCallback(
            projector,
            capability_data=capability,
            mode=self.crisp_mode,  # type: ignore[arg-type]
            low_rank=self.crisp_low_rank,  # type: ignore[arg-type]
            freeze_unprojected=self.freeze_unprojected,
            capability_eval_data=evaluation,
            capability_eval_steps=self.capability_eval_steps if evaluation is not None else None,
        )
