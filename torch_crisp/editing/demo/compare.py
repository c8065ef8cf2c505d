"""The demo's method comparison: edit one base model several ways and measure each.

Every method starts from the same pretrained weights, trains only the same layers (by default
the MLP output projections of every block) on the same counterfactual edits, and stops
on the same criterion (every edit learnt, teacher-forced, or an epoch budget). Then:

* reliability / generalisation: greedy exact match on the edit prompts / held-out paraphrases;
* locality: neighbour prompts (same relation, other entities) vs the base model's own answers;
  ``locality_subject``: the edited subject's *other* relations vs the base model's answers;
* capability: exact-match accuracy on held-out skill problems (addition, list reversal), and
  perplexity on held-out capability text.

Methods: ``ft`` (plain fine-tuning), ``crisp`` (K-FAC projection of gradients), ``crisp-update``
(projection of Adam's updates), ``crisp-ekfac`` (EK-FAC curvature, Adam's updates projected),
``activations`` (AlphaEdit-style projection from the input factor
only), ``lora`` and ``lora-crisp`` (peft LoRA on the same layers, unconstrained / constrained).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..batching import collate_texts
from ..evaluation import (
    evaluate_requests,
    exact_match,
    generate_answers,
    locality_reference,
    normalize_answer,
    perplexity,
)
from ..loop import EditSettings, apply_edits, train_only
from .plot import write_tradeoff_svg
from .pretrain import ModelSpec, TrainSpec, load_or_pretrain
from .world import World, WorldSpec, build_world

__all__ = ["ALL_METHODS", "DemoSettings", "format_table", "run_demo"]

ALL_METHODS = ("ft", "crisp", "crisp-update", "crisp-ekfac", "activations", "lora", "lora-crisp")


@dataclass
class DemoSettings:
    """Everything ``torch-crisp demo`` can change (the CLI maps its flags onto these)."""

    quick: bool = False
    num_edits: int | None = None  # default: 100 (6 with quick)
    num_anchors: int | None = None  # anchor entities of the capability corpus (default: WorldSpec's)
    methods: Sequence[str] = ALL_METHODS
    gamma: float = 0.995
    capability_temperature: float = 3.0  # softmax temperature of the curvature collection (1 = plain)
    lr: float = 5e-3
    lora_lr: float = 3e-3
    lora_rank: int = 8
    layers: Sequence[int] | None = None  # default: every block (see _default_layers)
    max_epochs: int = 300  # EK-FAC (crisp-ekfac) needs ~270 at lr 5e-3; the others stop far earlier
    batch_size: int = 8
    seed: int = 0
    cache_dir: str | None = None
    retrain: bool = False
    progress: bool = True
    world_spec: WorldSpec | None = None  # overrides quick / num_edits / num_anchors / seed when given
    model_spec: ModelSpec | None = None
    train_spec: TrainSpec | None = None
    log: Callable[[str], None] = field(default=print, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
        if not self.methods:
            raise ValueError("no methods to compare")
        if not self.capability_temperature > 0:
            raise ValueError(f"capability_temperature must be positive, got {self.capability_temperature}")

    def resolved_specs(self) -> tuple[WorldSpec, ModelSpec, TrainSpec]:
        if self.world_spec is not None:
            world = self.world_spec
        else:
            if self.quick:
                world = WorldSpec.quick(num_edits=self.num_edits or 6, seed=self.seed)
            else:
                world = WorldSpec(num_edits=self.num_edits or 100, seed=self.seed)
            if self.num_anchors is not None:
                world = replace(world, num_anchor_entities=self.num_anchors)
        model = self.model_spec or (ModelSpec.quick() if self.quick else ModelSpec())
        train = self.train_spec or (TrainSpec.quick() if self.quick else TrainSpec())
        return world, model, train


# ----------------------------------------------------------------------------- measurement
class _Evaluator:
    """Measures a model on the world; holds the base model's reference answers."""

    def __init__(self, world: World, tokenizer: Any, base_model: Any) -> None:
        self.world = world
        self.tokenizer = tokenizer
        self.requests = world.edit_requests()
        self.subject_prompts = world.subject_probes()
        self.reference = locality_reference(base_model, tokenizer, self.requests, max_new_tokens=8)
        self.subject_reference = generate_answers(base_model, tokenizer, self.subject_prompts, max_new_tokens=8)

    def capability(self, model: Any) -> dict[str, Any]:
        problems = self.world.skill_test
        answers = generate_answers(model, self.tokenizer, [p.prompt for p in problems], max_new_tokens=8)
        correct = [exact_match(a, p.answer) for a, p in zip(answers, problems)]
        result: dict[str, Any] = {"capability": sum(correct) / len(correct)}
        for skill in sorted({p.skill for p in problems}):
            hits = [c for c, p in zip(correct, problems) if p.skill == skill]
            result[f"skill_{skill}"] = sum(hits) / len(hits)
        result["perplexity"] = perplexity(model, self.tokenizer, self.world.heldout_texts())
        return result

    def __call__(self, model: Any) -> dict[str, Any]:
        metrics = evaluate_requests(model, self.tokenizer, self.requests, self.reference, max_new_tokens=8)
        subject = generate_answers(model, self.tokenizer, self.subject_prompts, max_new_tokens=8)
        metrics["locality_subject"] = sum(
            normalize_answer(a) == normalize_answer(b) for a, b in zip(subject, self.subject_reference)
        ) / max(len(subject), 1)
        metrics.update(self.capability(model))
        return metrics


# ----------------------------------------------------------------------------- methods
def _capability_batches(world: World, tokenizer: Any, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    texts = world.capability_texts()
    return [collate_texts(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def tempered_lm_loss(temperature: float) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """Sum-reduced next-token cross-entropy of ``logits / temperature`` (a ``collect`` ``loss_fn``).

    A fact the model has memorised is predicted with probability ≈ 1, so its output gradients —
    and with them its share of the empirical Fisher (or Gauss-Newton) curvature — all but vanish,
    although a finite edit step flips it. Softening the predictive distribution while collecting
    lets those directions count; ``temperature=1`` is the plain empirical Fisher.
    """

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float() / temperature
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )

    return loss_fn


def _lora_model(model: Any, targets: list[str], rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", target_modules=targets)
    return get_peft_model(copy.deepcopy(model), config)


class _Methods:
    """Builds each method's (model, optimizer) pair on the shared base weights."""

    def __init__(self, model: Any, targets: list[str], batches: list, settings: DemoSettings) -> None:
        self.model = model
        self.targets = targets
        self.batches = batches
        self.settings = settings
        self.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._projectors: dict[str, tuple[Any, float]] = {}

    def projector(self, curvature: str, model: Any | None = None) -> tuple[Any, float]:
        """Projector with the given curvature model (collected once per model; seconds spent)."""
        from torch_crisp import CrispConfig, CrispProjector

        key = curvature if model is None else f"{curvature}@lora"
        if key not in self._projectors:
            config = CrispConfig(target_modules=self.targets, gamma=self.settings.gamma, curvature=curvature)
            start = time.perf_counter()
            projector = CrispProjector(model if model is not None else self.model, config)
            temperature = self.settings.capability_temperature
            loss_fn = None if temperature == 1.0 else tempered_lm_loss(temperature)
            projector.collect(self.batches, progress=False, loss_fn=loss_fn)
            self._projectors[key] = (projector, time.perf_counter() - start)
        return self._projectors[key]

    def build(self, method: str) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:
        from torch_crisp import CrispOptimizer

        s = self.settings
        # Every method starts from the base weights (the previous method edited them in place).
        self.model.load_state_dict(self.base_state)
        if method.startswith("lora"):
            model = _lora_model(self.model, self.targets, s.lora_rank)
            params = [p for p in model.parameters() if p.requires_grad]
            inner = torch.optim.Adam(params, lr=s.lora_lr)
            if method == "lora":
                return model, inner, {}
            projector, seconds = self.projector("kfac", model)
            info = {"collect_seconds": seconds, "lora_kept_fraction": projector.lora_kept_fraction()}
            return model, CrispOptimizer(inner, projector, mode="grad"), info
        params = train_only(self.model, self.targets)
        inner = torch.optim.Adam(params, lr=s.lr)
        if method == "ft":
            return self.model, inner, {}
        curvature = {"activations": "activations", "crisp-ekfac": "ekfac"}.get(method, "kfac")
        projector, seconds = self.projector(curvature)
        mode = "update" if method in ("crisp-update", "crisp-ekfac") else "grad"
        info = {"collect_seconds": seconds, "kept_fraction": projector.kept_fraction()}
        return self.model, CrispOptimizer(inner, projector, mode=mode), info


# ----------------------------------------------------------------------------- the run
def _default_layers(num_layers: int) -> list[int]:
    # Every block's MLP output projection. With only the two middle blocks, 100 edits did not land
    # in 30-150 epochs on the demo model (Adam, lr 1e-3 to 1e-2: 7-75 % learnt), so the comparison
    # would have measured nothing.
    return list(range(num_layers))


def run_demo(settings: DemoSettings, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Pretrain (or load) the base model, edit it with every method, measure, write results.

    Writes ``results.json`` and ``tradeoff.svg`` to ``out_dir`` when given, and returns the
    results dictionary (shape documented in ``docs/editing.md``).
    """
    log = settings.log
    start_all = time.perf_counter()
    world_spec, model_spec, train_spec = settings.resolved_specs()
    world = build_world(world_spec)
    base = load_or_pretrain(
        world,
        model_spec,
        train_spec,
        cache_dir=settings.cache_dir,
        retrain=settings.retrain,
        progress=settings.progress,
    )
    model, tokenizer = base.model, base.tokenizer
    how = "loaded from cache" if base.record.get("cached") else f"pretrained in {base.record['seconds']:.0f} s"
    log(f"base model: {base.record['num_parameters']:,} parameters, {how} ({base.path})")
    final = base.record.get("final", {})
    if (
        final.get("fact_accuracy", 0.0) < train_spec.target_fact_accuracy
        or final.get("skill_accuracy", 0.0) < train_spec.target_skill_accuracy
    ):
        # Edits of facts the model never knew, and locality of unstable answers, measure nothing.
        warnings.warn(
            f"the base model stopped at {base.record['steps']} steps below its pretraining targets (facts "
            f"{final.get('fact_accuracy', 0.0):.0%}, target {train_spec.target_fact_accuracy:.0%}; skills "
            f"{final.get('skill_accuracy', 0.0):.0%}, target {train_spec.target_skill_accuracy:.0%}): the "
            "comparison edits a model that has not learnt its world. Use a smaller world (fewer --anchors or "
            "--edits) or another --seed",
            stacklevel=2,
        )
    layers = list(settings.layers) if settings.layers is not None else _default_layers(model.config.num_hidden_layers)
    bad = [i for i in layers if not 0 <= i < model.config.num_hidden_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {model.config.num_hidden_layers} blocks")
    targets = [f"model.layers.{i}.mlp.down_proj" for i in layers]

    evaluate = _Evaluator(world, tokenizer, model)
    base_metrics = evaluate(model)
    base_metrics["knows_old_facts"] = sum(
        exact_match(a, r.target_true or "")
        for a, r in zip(generate_answers(model, tokenizer, [r.prompt for r in evaluate.requests]), evaluate.requests)
    ) / len(evaluate.requests)
    log(
        f"base: capability {base_metrics['capability']:.3f}, knows {base_metrics['knows_old_facts']:.0%} of the facts "
        f"to be edited; {len(evaluate.requests)} edits on {targets}"
    )
    methods = _Methods(model, targets, _capability_batches(world, tokenizer), settings)
    edit_settings = EditSettings(
        max_epochs=settings.max_epochs, batch_size=settings.batch_size, progress=settings.progress
    )
    results: dict[str, Any] = {
        "base": base_metrics,
        "methods": {},
        "skipped": {},
        "settings": {
            "world": asdict(world_spec),
            "model": asdict(model_spec),
            "train": asdict(train_spec),
            "targets": targets,
            "gamma": settings.gamma,
            "capability_temperature": settings.capability_temperature,
            "lr": settings.lr,
            "lora_lr": settings.lora_lr,
            "lora_rank": settings.lora_rank,
            "max_epochs": settings.max_epochs,
            "batch_size": settings.batch_size,
        },
        "pretraining": {k: v for k, v in base.record.items() if k != "history"},
    }
    for method in settings.methods:
        torch.manual_seed(settings.seed)  # LoRA's initialisation must not depend on the methods before it
        try:
            edited, optimizer, info = methods.build(method)
        except ImportError as err:  # peft missing: leave LoRA out, say why
            results["skipped"][method] = f"{type(err).__name__}: {err}"
            log(f"{method}: skipped ({err})")
            continue
        torch.manual_seed(settings.seed)
        run = apply_edits(edited, tokenizer, evaluate.requests, optimizer, edit_settings)
        metrics = evaluate(edited)
        metrics.update(info)
        metrics["seconds"] = run.seconds
        metrics["edit"] = run.to_dict()
        results["methods"][method] = metrics
        log(format_row(method, metrics))
    methods.model.load_state_dict(methods.base_state)
    results["seconds"] = time.perf_counter() - start_all
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
        write_tradeoff_svg(results, out / "tradeoff.svg")
    return results


# ----------------------------------------------------------------------------- table
_COLUMNS = (
    ("reliability", "rel"),
    ("generalization", "gen"),
    ("locality", "loc"),
    ("locality_subject", "loc-subj"),
    ("capability", "capab"),
    ("perplexity", "ppl"),
    ("seconds", "edit s"),
)


def format_row(name: str, metrics: dict[str, Any]) -> str:
    cells = [f"{name:<13}"]
    for key, _ in _COLUMNS:
        value = metrics.get(key)
        if value is None:
            cells.append(f"{'-':>8}")
        elif key in ("perplexity", "seconds"):
            cells.append(f"{value:8.2f}" if key == "perplexity" else f"{value:8.1f}")
        else:
            cells.append(f"{value:8.3f}")
    return " ".join(cells)


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a plain-text table (base row first)."""
    header = " ".join([f"{'method':<13}"] + [f"{label:>8}" for _, label in _COLUMNS])
    rows = [header, format_row("base", results["base"])]
    rows += [format_row(name, metrics) for name, metrics in results["methods"].items()]
    rows += [f"{name:<13} skipped: {why}" for name, why in results.get("skipped", {}).items()]
    return "\n".join(rows)
