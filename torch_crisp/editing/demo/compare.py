"""The demo's method comparison: edit one base model several ways and measure each.

Every method starts from the same pretrained weights, trains only the same layers (by default
the MLP output projections of every block) on the same counterfactual edits, and stops
on the same criterion (every edit learnt, teacher-forced, or an epoch budget). Then:

* reliability / generalisation: greedy exact match on the edit prompts / held-out paraphrases;
* locality: neighbour prompts (same relation, other entities) vs the base model's own answers;
  ``locality_subject``: the edited subject's *other* relations vs the base model's answers;
* capability: exact-match accuracy on held-out skill problems (addition, list reversal), and
  perplexity on held-out capability text;
* capability loss: the mean per-token loss on the held-out text (``log`` of the perplexity), its
  tempered form (``logits / T``, the loss the collected curvature describes) and the tempered loss
  on the capability corpus itself; each row records their increase over the base model beside
  K-FAC's predictions ``L̂`` (:meth:`.methods.MethodBuilder.predictions`).

Methods (:mod:`.methods`, :mod:`.peers`): ``ft`` (plain fine-tuning), ``crisp`` (K-FAC projection
of gradients), ``crisp-update`` (projection of Adam's updates), ``crisp-ekfac`` (EK-FAC curvature,
Adam's updates projected), ``crisp-budget`` (a capability budget instead of ``γ``),
``activations`` (AlphaEdit-style projection from the input factor only), ``lora`` and
``lora-crisp`` (peft LoRA on the same layers, unconstrained / constrained), ``corda`` (peft's
CorDA, knowledge-preserved mode), ``ewc`` and ``l2sp`` (quadratic penalties). ``NAME:VALUE`` rows
carry their setting (:mod:`.grid`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...losses import num_loss_terms, tempered_dict_loss
from ..evaluation import (
    evaluate_requests,
    exact_match,
    generate_answers,
    locality_reference,
    normalize_answer,
    perplexity,
)
from ..loop import EditSettings, apply_edits
from .environment import (
    captured_library_warnings,
    machine_record,
    no_transformers_progress_bars,
    summarize_warnings,
    torch_threads,
)
from .export import export_world
from .grid import GRID_RULE, choose_settings
from .methods import MethodBuilder, text_batches
from .plot import points_from_results, write_reliability_png, write_tradeoff_png
from .pretrain import TrainSpec, cache_path, count_parameters, is_cached, load_or_pretrain
from .report import TABLE_LEGEND, format_row, format_table, plan_lines, table_header
from .settings import ALL_METHODS, DemoSettings
from .sweep import sweep_record, write_sweep_png
from .world import World, build_world

__all__ = ["ALL_METHODS", "DemoSettings", "format_table", "grid_choice", "mean_token_loss", "run_demo"]

LOSS_KEYS = ("heldout_loss", "heldout_tempered_loss", "corpus_tempered_loss")

# ----------------------------------------------------------------------------- measurement
@torch.no_grad()
def mean_token_loss(model: Any, batches: Sequence[dict[str, torch.Tensor]], temperature: float = 1.0) -> float:
    """Mean per-token next-token cross-entropy of ``logits / temperature`` over ``batches``.

    With ``temperature=1`` it is the log of :func:`~torch_crisp.editing.evaluation.perplexity` on
    the same texts. The model is left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    total, terms = 0.0, 0
    try:
        for batch in batches:
            loss = tempered_dict_loss(model, batch, temperature)
            if loss is not None:
                total += float(loss)
                terms += num_loss_terms(model, batch["labels"])
    finally:
        model.train(was_training)
    return total / max(terms, 1)


class _Evaluator:
    """Measures a model on the world; holds the base model's reference answers."""

    def __init__(self, world: World, tokenizer: Any, base_model: Any, temperature: float) -> None:
        self.world = world
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.heldout = text_batches(tokenizer, world.heldout_texts())
        self.corpus = text_batches(tokenizer, world.capability_texts())
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
        result["heldout_loss"] = mean_token_loss(model, self.heldout)
        result["heldout_tempered_loss"] = mean_token_loss(model, self.heldout, self.temperature)
        result["corpus_tempered_loss"] = mean_token_loss(model, self.corpus, self.temperature)
        return result

    def __call__(self, model: Any) -> dict[str, Any]:
        metrics = evaluate_requests(model, self.tokenizer, self.requests, self.reference, max_new_tokens=8)
        subject = generate_answers(model, self.tokenizer, self.subject_prompts, max_new_tokens=8)
        metrics["locality_subject"] = sum(
            normalize_answer(a) == normalize_answer(b) for a, b in zip(subject, self.subject_reference)
        ) / max(len(subject), 1)
        metrics.update(self.capability(model))
        return metrics


# ----------------------------------------------------------------------------- kept for other callers
# The demo itself collects with CrispConfig(temperature=...) (bit-identical factors, docs/editing.md).
# benchmarks/spectra.py and tests/test_editing.py still import these two.
def _capability_batches(world: World, tokenizer: Any, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    return text_batches(tokenizer, world.capability_texts(), batch_size)


def tempered_lm_loss(temperature: float) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """Sum-reduced next-token cross-entropy of ``logits / temperature`` (a ``collect`` ``loss_fn``).

    What ``CrispConfig(temperature=...)`` now does for dict batches; kept for its callers outside
    the demo.
    """

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float() / temperature
        labels = batch["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )

    return loss_fn


# ----------------------------------------------------------------------------- the run
def _default_layers(num_layers: int) -> list[int]:
    # Every block's MLP output projection. With only the two middle blocks, 100 edits did not land
    # in 30-150 epochs on the demo model (Adam, lr 1e-3 to 1e-2: 7-75 % learnt), so the comparison
    # would have measured nothing.
    return list(range(num_layers))


def _warn_if_not_learnt(base: Any, train_spec: TrainSpec) -> None:
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
            stacklevel=4,  # the caller of run_demo
        )


def _settings_record(settings: DemoSettings, specs: tuple, targets: list[str]) -> dict[str, Any]:
    world_spec, model_spec, train_spec = specs
    return {
        "world": asdict(world_spec),
        "model": asdict(model_spec),
        "train": asdict(train_spec),
        "targets": targets,
        "methods": settings.resolved_methods(),
        "gamma": settings.gamma,
        "budget": settings.budget,
        "capability_temperature": settings.capability_temperature,
        "lr": settings.lr,
        "lora_lr": settings.lora_lr,
        "lora_rank": settings.lora_rank,
        "ewc_lambda": settings.ewc_lambda,
        "l2sp_alpha": settings.l2sp_alpha,
        "corda_lr": settings.corda_lr,
        "max_epochs": settings.max_epochs,
        "batch_size": settings.batch_size,
        "threads": settings.threads,
    }


def _base_metrics(evaluate: _Evaluator, model: Any, tokenizer: Any) -> dict[str, Any]:
    metrics = evaluate(model)
    answers = generate_answers(model, tokenizer, [r.prompt for r in evaluate.requests])
    known = [exact_match(a, r.target_true or "") for a, r in zip(answers, evaluate.requests)]
    metrics["knows_old_facts"] = sum(known) / len(known)
    metrics["capability_retained"] = 1.0
    metrics["predicted_increase"] = metrics["predicted_heldout_increase"] = 0.0
    metrics.update({f"{key}_increase": 0.0 for key in LOSS_KEYS})
    return metrics


def _row(evaluate: _Evaluator, methods: MethodBuilder, edited: Any, base: dict[str, Any]) -> dict[str, Any]:
    """The edited model's metrics, with its predicted and measured capability loss increases."""
    metrics = evaluate(edited)
    metrics["capability_retained"] = metrics["capability"] / base["capability"] if base["capability"] else None
    metrics.update(methods.predictions(edited))
    for key in LOSS_KEYS:
        metrics[f"{key}_increase"] = metrics[key] - base[key]
    return metrics


def _run_methods(settings: DemoSettings, methods: MethodBuilder, evaluate: _Evaluator, results: dict[str, Any]) -> None:
    """Edit with every method in turn; rows go to ``results`` and, as they come, to the table."""
    edit_settings = EditSettings(
        max_epochs=settings.max_epochs, batch_size=settings.batch_size, progress=settings.progress
    )
    show = settings.table or (lambda _: None)
    methods.prepare_predictions()  # K-FAC at the base weights: every row's predictions L̂ use it
    for name in settings.resolved_methods():
        torch.manual_seed(settings.seed)  # LoRA's initialisation must not depend on the methods before it
        try:
            method = methods.build(name)
        except ImportError as err:  # peft missing: leave LoRA and CorDA out, say why
            results["skipped"][name] = f"{type(err).__name__}: {err}"
            show(f"{name:<13} skipped: {err}")
            continue
        torch.manual_seed(settings.seed)
        run = apply_edits(method.model, evaluate.tokenizer, evaluate.requests, method.optimizer, edit_settings)
        metrics = {**method.info, **method.after()}
        metrics.update(_row(evaluate, methods, method.model, results["base"]))
        metrics["seconds"] = run.seconds
        metrics["epochs"] = run.epochs
        metrics["edit"] = run.to_dict()
        results["methods"][name] = metrics
        show(format_row(name, metrics))
    methods.model.load_state_dict(methods.base_state)


def grid_choice(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The grid setting chosen for each peer from (mean) rows, with the rule that chose it."""
    return {"rule": GRID_RULE, "reference": "crisp", "chosen": choose_settings(rows, "crisp")}


def _plan(settings: DemoSettings, world: World, specs: tuple, layers: list[int]) -> None:
    """Say what the run will do, before any work (to ``settings.log``)."""
    _, model_spec, train_spec = specs
    cache = cache_path(world, model_spec, train_spec, settings.cache_dir)
    lines = plan_lines(
        world, model_spec, train_spec, count_parameters(world, model_spec), settings.resolved_methods(), layers,
        settings.max_epochs, torch.get_num_threads(), str(cache), is_cached(cache) and not settings.retrain,
    )
    for line in lines:
        settings.log(line)


def write_pictures(points: list, sweep: dict[str, Any] | None, out: Path, title: str) -> list[str]:
    """tradeoff.png, reliability.png and (for a sweep) sweep.png in ``out``; the names written.

    Without matplotlib nothing is drawn and the list is empty.
    """
    pictures = [
        write_tradeoff_png(points, out / "tradeoff.png", f"What else the edits changed: {title}"),
        write_reliability_png(points, out / "reliability.png", f"Edits learnt against capability kept: {title}"),
    ]
    if sweep is not None:
        pictures.append(write_sweep_png(sweep, out / "sweep.png", f"Capability budget ε against γ: {title}"))
    return [p.name for p in pictures if p is not None]


def _write_outputs(results: dict[str, Any], out: Path, settings: DemoSettings) -> None:
    """results.json, sweep.json (a sweep) and the pictures (none without matplotlib: one line says so)."""
    world = results["settings"]["world"]
    title = f"{world['num_edits']} edits per method, world seed {world['seed']}"
    rows = {name: results["methods"][name] for name in results["methods"]}
    sweep = sweep_record(rows, results["base"], settings) if settings.sweep else None
    pictures = write_pictures(points_from_results(results), sweep, out, title)
    if not pictures:
        settings.log("no picture: matplotlib is not installed (pip install 'torch-crisp[plot]')")
    if sweep is not None:
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1, default=float) + "\n")
        pictures.insert(0, "sweep.json")
    results["files"] = ["results.json", *pictures, *results["files"]]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")


def run_demo(settings: DemoSettings, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Pretrain (or load) the base model, edit it with every method, measure, write results.

    Checks ``settings`` first and runs with ``settings.threads`` torch threads. With ``out_dir``,
    writes there ``results.json``, ``tradeoff.png`` (with matplotlib) and the world and base
    model as files (:mod:`.export`). Returns the results dictionary (shape documented in
    ``docs/editing.md``).
    """
    settings.check()
    with torch_threads(settings.threads), no_transformers_progress_bars():
        return _run_demo(settings, Path(out_dir) if out_dir is not None else None)


def _run_demo(settings: DemoSettings, out: Path | None) -> dict[str, Any]:
    log, start_all = settings.log, time.perf_counter()
    environment = machine_record()  # before any work: the load the run started at
    specs = settings.resolved_specs()
    world_spec, model_spec, train_spec = specs
    world = build_world(world_spec)
    layers = list(settings.layers) if settings.layers is not None else _default_layers(model_spec.num_hidden_layers)
    targets = [f"model.layers.{i}.mlp.down_proj" for i in layers]
    _plan(settings, world, specs, layers)
    base = load_or_pretrain(
        world, model_spec, train_spec, cache_dir=settings.cache_dir, retrain=settings.retrain,
        progress=settings.progress,
    )
    model, tokenizer = base.model, base.tokenizer
    if not base.record.get("cached"):  # the plan already said where a cached one came from
        log(f"base model: pretrained in {base.record['seconds']:.0f} s ({base.record['steps']} steps), cached")
    _warn_if_not_learnt(base, train_spec)
    files = list(export_world(world, model, tokenizer, out)) if out is not None else []

    evaluate = _Evaluator(world, tokenizer, model, settings.capability_temperature)
    base_metrics = _base_metrics(evaluate, model, tokenizer)
    log(
        f"base: capability {base_metrics['capability']:.3f}, knows {base_metrics['knows_old_facts']:.0%} of the facts "
        f"to be edited; {len(evaluate.requests)} edits"
    )
    results: dict[str, Any] = {
        "base": base_metrics,
        "methods": {},
        "skipped": {},
        "settings": _settings_record(settings, specs, targets),
        "pretraining": {k: v for k, v in base.record.items() if k != "history"},
        "environment": environment,
    }
    if settings.table is not None:
        for line in (TABLE_LEGEND, table_header(), format_row("base", base_metrics)):
            settings.table(line)
    methods = MethodBuilder(model, tokenizer, targets, world.capability_texts(), settings, world.heldout_texts())
    # Library warnings (deprecations inside peft / transformers) would land between the rows.
    with captured_library_warnings() as messages:
        _run_methods(settings, methods, evaluate, results)
    if settings.grid:
        results["grid"] = grid_choice(results["methods"])
    results["warnings"] = summarize_warnings(messages)
    results["seconds"] = time.perf_counter() - start_all
    results["files"] = files
    if out is not None:
        _write_outputs(results, out, settings)
    return results
