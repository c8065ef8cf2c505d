"""The ``torch-crisp demo`` command behind :func:`torch_crisp.editing.cli.run_demo_command`.

Every flag is checked before any work starts: a value out of range is a one-line
:class:`~torch_crisp.commands.common.CLIError` naming the flag (exit code 2). Then one seed
(:func:`~.compare.run_demo`) or several (:func:`~.seeds.run_seeds`) run; the table goes to
standard output, progress and notes to standard error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from torch_crisp.commands.common import CLIError

from .compare import run_demo
from .report import TABLE_LEGEND, format_table
from .seeds import check_seeds, run_seeds, summary_table
from .settings import DemoSettingError, DemoSettings

__all__ = ["FLAGS", "checked_out_dir", "print_warnings", "run", "settings_from_args"]

# DemoSettings fields (and run_seeds' seeds) -> the flags that set them, to name them in errors.
FLAGS = {
    "num_edits": "--edits",
    "num_anchors": "--anchors",
    "methods": "--methods",
    "gamma": "--gamma",
    "budget": "--budget",
    "ewc_lambda": "--ewc-lambda",
    "l2sp_alpha": "--l2sp-alpha",
    "corda_lr": "--corda-lr",
    "grid": "--grid",
    "sweep_budgets": "--budgets",
    "sweep_gammas": "--gammas",
    "capability_temperature": "--temperature",
    "lr": "--lr",
    "lora_lr": "--lora-lr",
    "max_epochs": "--epochs",
    "layers": "--layers",
    "seed": "--seed",
    "seeds": "--seeds",
    "threads": "--threads",
}


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """DemoSettings from the flags; a value out of range is a one-line error naming its flag."""
    quiet = args.quiet
    try:
        if args.seeds is not None:
            check_seeds(args.seeds)
        return DemoSettings(
            quick=args.quick,
            num_edits=args.edits,
            num_anchors=args.anchors,
            methods=tuple(args.methods),
            gamma=args.gamma,
            budget=args.budget,
            ewc_lambda=args.ewc_lambda,
            l2sp_alpha=args.l2sp_alpha,
            corda_lr=args.corda_lr,
            grid=args.grid,
            sweep=args.sweep,
            sweep_budgets=tuple(args.budgets),
            sweep_gammas=tuple(args.gammas),
            capability_temperature=args.temperature,
            lr=args.lr,
            lora_lr=args.lora_lr,
            layers=args.layers,
            max_epochs=args.epochs,
            seed=args.seed,
            threads=args.threads,
            cache_dir=args.cache_dir,
            retrain=args.retrain,
            progress=not quiet,
            log=(lambda _: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
            # Rows are printed as they are measured; --quiet prints the whole table at the end.
            table=None if quiet else (lambda line: print(line, flush=True)),
        )
    except DemoSettingError as err:
        raise CLIError(f"{FLAGS.get(err.field, err.field)} {err.rule}, got {_shown(err.value)}") from None


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def checked_out_dir(args: argparse.Namespace) -> Path:
    """--out and --cache-dir must be folders (or not exist yet); --out is created."""
    for flag, value in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise CLIError(f"{flag} {value} is a file, not a folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # fails now, not after pretraining, where it cannot be written
    return out


def print_warnings(runs: list[dict[str, Any]]) -> None:
    """The warnings of every run's edits, once each with their total count (stderr)."""
    counts: dict[str, int] = {}
    for item in (w for run in runs for w in run.get("warnings", [])):
        counts[item["message"]] = counts.get(item["message"], 0) + item["count"]
    if not counts:
        return
    total = sum(counts.values())
    print(f"{total} library warning(s) during the edits (kept out of the table; in results.json):", file=sys.stderr)
    for message, count in counts.items():
        text = message if len(message) <= 150 else message[:147] + "..."
        print(f"  {count}x {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``torch-crisp demo``: check every flag, run one seed or several, print the table; exit code."""
    settings = settings_from_args(args)
    out = checked_out_dir(args)
    start = time.perf_counter()
    if args.seeds is None:
        results = run_demo(settings, out_dir=out)
        runs, table = [results], format_table(results)
    else:
        results = run_seeds(settings, args.seeds, out_dir=out)
        runs, table = list(results["runs"].values()), summary_table(results)
    if args.quiet:
        print(TABLE_LEGEND)
    if args.quiet or args.seeds is not None:
        print(table)
    if "grid" in results:
        chosen = ", ".join(results["grid"]["chosen"].values())
        print(f"grid: chosen {chosen} ({results['grid']['rule']})")
    if not args.quiet:
        print_warnings(runs)
    print(
        f"\n{len(runs[0]['methods'])} methods, {len(runs)} seed(s) in {time.perf_counter() - start:.0f} s; "
        f"wrote {', '.join(results['files'])} to {out}"
    )
    if not args.quiet:
        base_model = out / ("base-model" if args.seeds is None else f"seed-{args.seeds[0]}/base-model")
        print(
            f"next, on these files: torch-crisp collect --model {base_model} --data {base_model.parent}/capability.txt "
            "--out factors",
            file=sys.stderr,
        )
    return 0
