"""What the demo prints: the plan before it starts, the table (one seed, or means and ranges over
several seeds) with a legend of its abbreviated columns, and the summary over seeds itself."""

from __future__ import annotations

from typing import Any

from .pretrain import ModelSpec, TrainSpec
from .world import World, WorldSpec

__all__ = [
    "COLUMNS",
    "TABLE_LEGEND",
    "format_row",
    "format_summary_table",
    "format_table",
    "plan_lines",
    "summarize_runs",
    "table_header",
]

COLUMNS = (
    ("reliability", "rel"),
    ("generalization", "gen"),
    ("locality", "loc"),
    ("locality_subject", "loc-subj"),
    ("capability", "capab"),
    ("perplexity", "ppl"),
    ("predicted_increase", "L̂"),
    ("heldout_loss_increase", "Δloss"),
    ("seconds", "edit s"),
)
_SMALL = ("predicted_increase", "heldout_loss_increase")  # nats: four decimals

TABLE_LEGEND = (
    "rel: edits learnt (greedy exact match on the edit prompts) | gen: the same on held-out paraphrases\n"
    "loc: neighbour facts unchanged | loc-subj: the edited subjects' other facts unchanged\n"
    "capab: held-out skill problems solved | ppl: held-out perplexity | edit s: seconds of the edit loop\n"
    "L̂: K-FAC's predicted increase of the (tempered) capability loss | Δloss: measured increase of the held-out "
    "loss (log ppl)"
)

_NAME = 20  # fits a method with its setting, e.g. crisp-budget:0.0003
_WIDE = 13  # a summary cell: a range of two four-decimal numbers


# ----------------------------------------------------------------------------- one seed
def _cell(key: str, value: float | None, width: int = 8) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if key == "perplexity":
        return f"{value:{width}.2f}"
    if key == "seconds":
        return f"{value:{width}.1f}"
    if key in _SMALL:
        return f"{value:{width}.4f}"
    return f"{value:{width}.3f}"


def table_header() -> str:
    """The column header of :func:`format_row`'s rows."""
    return " ".join([f"{'method':<{_NAME}}"] + [f"{label:>8}" for _, label in COLUMNS])


def format_row(name: str, metrics: dict[str, Any]) -> str:
    """One table row: the method's name and its value in every column (``-`` where missing)."""
    return " ".join([f"{name:<{_NAME}}"] + [_cell(key, metrics.get(key)) for key, _ in COLUMNS])


def format_table(results: dict[str, Any]) -> str:
    """The comparison as a plain-text table (base row first, skipped methods last)."""
    rows = [table_header(), format_row("base", results["base"])]
    rows += [format_row(name, metrics) for name, metrics in results["methods"].items()]
    rows += [f"{name:<{_NAME}} skipped: {why}" for name, why in results.get("skipped", {}).items()]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- several seeds
def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def _summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min, max and the per-seed values of every number the rows share."""
    numbers = [_numbers(row) for row in rows]
    shared = [k for k in numbers[0] if all(k in n for n in numbers)]
    return {key: _spread([n[key] for n in numbers]) for key in shared} | {"seeds_measured": len(rows)}


def summarize_runs(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per metric mean / min / max over the one-seed results ``runs`` (keyed by seed).

    Every number of the base row and of each method's row is summarised (a method skipped in
    some seeds over the seeds that ran it; ``seeds_measured`` says how many).
    """
    results = list(runs.values())
    names = list(dict.fromkeys(name for r in results for name in r["methods"]))
    return {
        "base": _summarize_rows([r["base"] for r in results]),
        "methods": {
            name: _summarize_rows([r["methods"][name] for r in results if name in r["methods"]]) for name in names
        },
    }


def _range_cell(key: str, spread: dict[str, Any] | None) -> str:
    if spread is None:
        return f"{'-':>{_WIDE}}"
    low, high = (_cell(key, spread[k], 0).strip() for k in ("min", "max"))
    return f"{low + '-' + high:>{_WIDE}}"


def format_summary_table(summary: dict[str, Any], seeds: list[int]) -> str:
    """Two lines per row: the mean over ``seeds``, and the lowest-highest seed beneath it."""
    head = " ".join([f"{'method':<{_NAME}} {'':5}"] + [f"{label:>{_WIDE}}" for _, label in COLUMNS])
    lines = [f"mean and range (lowest-highest) over seeds {', '.join(map(str, seeds))}", head]
    for name, row in [("base", summary["base"]), *summary["methods"].items()]:
        means = [_cell(key, row[key]["mean"], _WIDE) if key in row else f"{'-':>{_WIDE}}" for key, _ in COLUMNS]
        lines.append(" ".join([f"{name:<{_NAME}} {'mean':5}", *means]))
        lines.append(" ".join([f"{'':<{_NAME}} {'range':5}", *(_range_cell(key, row.get(key)) for key, _ in COLUMNS)]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the plan
# Measured with one thread on 2 cores of an AMD EPYC (docs/editing.md): the default world's base
# models stopped at 4200-6400 steps in 199-313 s for seeds 0, 1 and 3 (seed 2 used all 16000
# steps, 766 s); the quick world's stopped at 600 steps in about 20 s.
_PRETRAINING_TIME = {"default": "3-5 min (up to 13 min if it learns slowly)", "quick": "about 20 s"}


def _pretraining_estimate(world: WorldSpec, model: ModelSpec, train: TrainSpec) -> str:
    for kind, (w, m, t) in {
        "default": (WorldSpec(seed=world.seed), ModelSpec(), TrainSpec()),
        "quick": (WorldSpec.quick(seed=world.seed), ModelSpec.quick(), TrainSpec.quick()),
    }.items():
        if (world, model, train) == (w, m, t):
            return f"{_PRETRAINING_TIME[kind]} on 2 CPU cores with one thread"
    return "a time that grows with the world (not measured for these sizes)"


def plan_lines(
    world: World, model: ModelSpec, train: TrainSpec, num_parameters: int, methods: list[str], layers: list[int],
    max_epochs: int, threads: int, cache: str, cached: bool,
) -> list[str]:
    """What the run is about to do, in a few lines (printed before any work starts)."""
    spec = world.spec
    facts = len(world.entities) * len(world.relations)
    lines = [
        f"world (seed {spec.seed}): {len(world.entities)} invented people, {facts} facts, "
        f"{len(world.skill_test)} held-out skill problems; {spec.num_edits} counterfactual edits "
        f"({spec.num_locality_entities} neighbour and {spec.num_anchor_entities} anchor people kept apart)",
        f"model: Llama, {model.num_hidden_layers} blocks, hidden {model.hidden_size}, MLP {model.intermediate_size}, "
        f"{num_parameters:,} parameters; edited: mlp.down_proj of blocks {', '.join(map(str, layers))}",
        f"methods ({len(methods)}): {', '.join(methods)}; each trained until all edits are learnt "
        f"(at most {max_epochs} epochs), then measured by generation",
    ]
    if cached:
        lines.append(f"base model: cached in {cache} (no pretraining)")
    else:
        lines.append(
            f"base model: not cached; pretraining until it knows {train.target_fact_accuracy:.0%} of the facts and "
            f"{train.target_skill_accuracy:.0%} of the skill problems (at most {train.max_steps} steps) takes "
            f"{_pretraining_estimate(spec, model, train)}; then cached in {cache}"
        )
    lines.append(f"torch threads: {threads} (--threads N to change; more threads can be far slower on a busy machine)")
    return lines
