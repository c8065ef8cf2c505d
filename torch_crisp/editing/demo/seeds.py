"""The comparison over several seeds: one world and base model per seed, then means and ranges.

One table is one draw (the world, its base model and the edits all change with the seed), and
locality moves by several points between draws, so a claim needs several. :func:`run_seeds`
runs :func:`~.compare.run_demo` once per seed (each seed's complete output in ``seed-<S>/``)
and summarises every metric as mean, lowest and highest over the seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .compare import grid_choice, run_demo, write_pictures
from .environment import machine_record, torch_threads
from .plot import points_from_summary
from .report import format_summary_table, summarize_runs
from .settings import DemoSettingError, DemoSettings
from .sweep import sweep_record

__all__ = ["check_seeds", "run_seeds", "summary_table"]


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as a list; :class:`DemoSettingError` unless they are distinct non-negative integers."""
    seeds = list(seeds)
    if not seeds:
        raise DemoSettingError("seeds", "must name at least one seed", seeds)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise DemoSettingError("seeds", "must be non-negative integers", seeds)
    if len(set(seeds)) != len(seeds):
        raise DemoSettingError("seeds", "must not repeat a seed", seeds)
    return seeds


def _for_seed(settings: DemoSettings, seed: int) -> DemoSettings:
    # An explicit world spec carries its own seed: change it too, or every run would draw one world.
    world = replace(settings.world_spec, seed=seed) if settings.world_spec is not None else None
    return replace(settings, seed=seed, world_spec=world)


def run_seeds(settings: DemoSettings, seeds: Sequence[int], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the demo once per seed and summarise; every check happens before the first run.

    Returns ``{"seeds", "summary": {"base", "methods": {name: {metric: {mean, min, max,
    values}}}}, "runs": {seed: one-seed results}, "environment", "seconds"}``. With ``out_dir``,
    seed ``S`` writes its one-seed output to ``out_dir/seed-S/`` and the summary goes to
    ``out_dir/results.json`` and ``out_dir/tradeoff.png`` (means, with the seeds' range as bars).
    """
    seeds = check_seeds(seeds)
    per_seed = [_for_seed(settings, seed) for seed in seeds]  # each one checks itself
    out = Path(out_dir) if out_dir is not None else None
    start = time.perf_counter()
    with torch_threads(settings.threads):  # what every run will use
        environment = machine_record()
    runs: dict[str, dict[str, Any]] = {}
    for seed, seed_settings in zip(seeds, per_seed):
        settings.log(f"--- seed {seed} ({len(runs) + 1} of {len(seeds)}) ---")
        if settings.table is not None:
            settings.table(f"seed {seed}:")
        runs[str(seed)] = run_demo(seed_settings, out / f"seed-{seed}" if out is not None else None)
    summary = summarize_runs(runs)
    results: dict[str, Any] = {
        "seeds": seeds,
        "summary": summary,
        "runs": runs,
        "environment": environment,
        "seconds": time.perf_counter() - start,
    }
    if settings.grid:  # one setting per peer for all seeds, chosen on the means over the seeds
        means = {name: {k: c["mean"] for k, c in row.items() if isinstance(c, dict)}
                 for name, row in summary["methods"].items()}
        results["grid"] = grid_choice(means)
    if settings.sweep:
        results["sweep"] = sweep_record(summary["methods"], summary["base"], settings)
    if out is not None:
        _write(results, out, settings)
    return results


def _write(results: dict[str, Any], out: Path, settings: DemoSettings) -> None:
    first = next(iter(results["runs"].values()))
    title = (
        f"{first['settings']['world']['num_edits']} edits per method; mean and range over seeds "
        f"{', '.join(map(str, results['seeds']))}"
    )
    sweep = results.get("sweep")
    pictures = write_pictures(points_from_summary(results["summary"]), sweep, out, title)
    if not pictures:
        settings.log("no picture: matplotlib is not installed (pip install 'torch-crisp[plot]')")
    if sweep is not None:
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1, default=float) + "\n")
        pictures.insert(0, "sweep.json")
    results["files"] = ["results.json", *pictures, *(f"seed-{seed}/" for seed in results["seeds"])]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")


def summary_table(results: dict[str, Any]) -> str:
    """The multi-seed table of :func:`run_seeds`' results."""
    return format_summary_table(results["summary"], results["seeds"])
