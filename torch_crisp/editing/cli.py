"""``torch-crisp edit`` and ``torch-crisp demo``: registered into :mod:`torch_crisp.cli`.

Each ``register_*`` adds its subparser and sets ``func`` to a function taking the parsed args and
returning an exit code; user mistakes raise ``CLIError`` / ``ValueError`` / ``OSError``, which the
main entry point prints as one line. transformers is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch_crisp.commands.common import add_threads_argument, apply_threads
from torch_crisp.config import DEFAULT_MODE, MODES

__all__ = ["register", "register_demo", "register_edit", "run_demo_command", "run_edit"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register both ``edit`` and ``demo``."""
    register_edit(subparsers)
    register_demo(subparsers)


# ----------------------------------------------------------------------------- edit
def register_edit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="apply knowledge edits to a local Hugging Face model with CrispEdit",
        description="Edit a local causal LM from a JSON/JSONL file of edit requests (EasyEdit, CounterFact or "
        "ZsRE records), projecting every update onto the low-curvature directions of saved capability "
        "factors; save the edited model (safetensors) and a JSON report of reliability, generalisation, "
        "locality and capability before/after.",
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="local Hugging Face model folder")
    parser.add_argument("--edits", required=True, metavar="FILE", help="edit requests (.json or .jsonl)")
    parser.add_argument(
        "--factors",
        metavar="DIR",
        help="projector folder from 'torch-crisp collect'; if it does not exist, --capability-data is collected "
        "into it first",
    )
    parser.add_argument("--capability-data", metavar="FILE", help=".txt/.jsonl capability corpus to collect factors on")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the edited model and edit_report.json")
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="layers to edit: block indices (3 means layers.3.mlp.down_proj) or module-name suffixes; "
        "default: those of --factors, else the two middle blocks' mlp.down_proj",
    )
    parser.add_argument("--gamma", type=float, help="energy threshold (default: the saved one, else 0.99)")
    parser.add_argument(
        "--capability-budget", type=float, metavar="NATS",
        help="keep the predicted capability-loss increase below this (docs/budget.md); with it, --gamma defaults "
        "to none (the budget alone) when collecting",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0,
        help="softmax temperature when collecting --capability-data (default 1)",
    )
    parser.add_argument(
        "--mode", choices=list(MODES), default=DEFAULT_MODE,
        help="project the cumulative change after each step (update, default) or each gradient (grad)",
    )
    parser.add_argument("--no-crisp", action="store_true", help="plain fine-tuning of the same layers (baseline)")
    parser.add_argument("--epochs", type=int, default=50, help="maximum passes over the edits (default 50)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=8, help="edits per step (default 8)")
    parser.add_argument("--stop-at", type=float, default=1.0, help="stop once this fraction of edits is learnt")
    parser.add_argument("--eval-data", metavar="FILE", help="held-out .txt/.jsonl text: perplexity before and after")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of the evaluation")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N edit records")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_edit)


def _layer_suffixes(values: list[str]) -> list[str]:
    return [f"layers.{v}.mlp.down_proj" if v.isdigit() else v for v in values]


def _default_targets(model: Any) -> list[str]:
    """The two middle blocks' MLP output projections (one block for a one-block model)."""
    n = model.config.num_hidden_layers
    return _layer_suffixes([str(max(n // 2 - 1, 0)), str(n // 2)] if n > 1 else ["0"])


def _check_edit_arguments(args: argparse.Namespace) -> None:
    """``CLIError`` for any invalid argument or path of ``edit``, before any work: nothing is read
    beyond file metadata and nothing is written."""
    from torch_crisp.commands.common import (
        CLIError,
        check_fraction,
        check_input_file,
        check_model_folder,
        check_output_folder,
        check_positive,
        check_positive_int,
        check_seed,
        resolve_device,
    )

    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit)):
        check_positive_int(flag, value)
    check_positive("--lr", args.lr)
    check_positive("--capability-budget", args.capability_budget)
    check_positive("--temperature", args.temperature)
    check_fraction("--gamma", args.gamma)
    check_fraction("--stop-at", args.stop_at, closed_above=True)
    check_seed("--seed", args.seed)
    if args.layers and not all(args.layers):
        raise CLIError("--layers entries must be block indices or module-name suffixes, got an empty one")
    check_model_folder(Path(args.model))
    check_input_file("--edits", Path(args.edits), (".json", ".jsonl"))
    if args.eval_data:
        check_input_file("--eval-data", Path(args.eval_data), (".txt", ".jsonl"))
    check_output_folder("--out", Path(args.out), input_model=Path(args.model))
    resolve_device(args.device)
    if not args.no_crisp:
        _check_factor_arguments(args)


def _check_factor_arguments(args: argparse.Namespace) -> None:
    """``--factors`` is a saved projector, or a folder to create from ``--capability-data``."""
    from torch_crisp.commands.common import CLIError, check_input_file, check_output_folder
    from torch_crisp.persistence import CONFIG_NAME

    factors = Path(args.factors) if args.factors else None
    if factors is not None and factors.exists():
        if not (factors / CONFIG_NAME).is_file():
            raise CLIError(f"--factors {factors} exists but holds no {CONFIG_NAME}: not a projector folder "
                           "(create one with 'torch-crisp collect', or name a new folder with --capability-data)")
        return
    if args.capability_data is None:
        if factors is not None:
            raise CLIError(f"--factors {factors} does not exist; pass --capability-data to collect it there")
        raise CLIError("pass --factors DIR (from 'torch-crisp collect') or --capability-data FILE, or --no-crisp")
    check_input_file("--capability-data", Path(args.capability_data), (".txt", ".jsonl"))
    if factors is not None:
        check_output_folder("--factors", factors, input_model=Path(args.model))


def _projector(args: argparse.Namespace, model: Any, tokenizer: Any, targets: list[str] | None, log: Any) -> Any:
    """The projector of ``--factors``, or one collected on ``--capability-data`` (and saved to ``--factors``)."""
    from torch_crisp import CrispConfig, CrispProjector
    from torch_crisp.commands.common import CLIError
    from torch_crisp.corpus import lm_batches, pad_token_id, read_documents, token_windows

    factors = Path(args.factors) if args.factors else None
    if factors is not None and factors.exists():
        projector = CrispProjector.from_pretrained(factors, model, gamma=args.gamma)
        if args.capability_budget is not None:
            projector.config.capability_budget = args.capability_budget
        saved = projector.config.target_modules
        if args.layers and targets != saved:
            log(f"note: --layers ignored; the factors in {factors} belong to {saved}")
        return projector
    gamma = args.gamma if args.gamma is not None or args.capability_budget is not None else 0.99
    config = CrispConfig(
        target_modules=targets if targets is not None else _default_targets(model), gamma=gamma,
        capability_budget=args.capability_budget, temperature=args.temperature,
    )
    documents = read_documents(args.capability_data)
    windows = list(token_windows(tokenizer, documents, seq_len=512))
    if not windows:
        raise CLIError(f"--capability-data {args.capability_data} yields no text to collect on")
    projector = CrispProjector(model, config)
    projector.collect(lm_batches(windows, batch_size=8, pad_id=pad_token_id(tokenizer)), progress=not args.quiet)
    if factors is not None:
        projector.save_pretrained(factors)
        log(f"collected factors on {len(windows)} windows, saved to {factors}")
    return projector


def run_edit(args: argparse.Namespace) -> int:
    import torch

    from torch_crisp import CrispOptimizer
    from torch_crisp.commands.common import load_hf_model, resolve_device
    from torch_crisp.corpus import read_documents
    from torch_crisp.layers import find_target_modules

    from .evaluation import evaluate_requests, locality_reference, perplexity
    from .loop import EditSettings, apply_edits, train_only
    from .requests import load_requests

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    _check_edit_arguments(args)  # every mistake is reported before the model loads
    apply_threads(args)
    if args.no_crisp and (args.factors or args.capability_data):
        log("note: --no-crisp ignores --factors / --capability-data")
    requests = load_requests(args.edits, limit=args.limit)
    eval_texts = read_documents(args.eval_data)[:512] if args.eval_data else None
    torch.manual_seed(args.seed)
    model, tokenizer = load_hf_model(Path(args.model), "auto", resolve_device(args.device), args.quiet)
    model.eval()
    targets = _layer_suffixes(args.layers) if args.layers else None
    report: dict[str, Any] = {"model": str(args.model), "edits": str(args.edits), "num_edits": len(requests)}

    # The projector comes before the evaluation: a corrupt --factors folder fails in seconds, not
    # after minutes of generation. Neither loading nor collecting changes the model.
    if args.no_crisp:
        names = list(find_target_modules(model, targets if targets is not None else _default_targets(model)))
        params = train_only(model, names)
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=args.lr)
        report["method"] = {"name": "fine-tuning", "layers": names}
    else:
        projector = _projector(args, model, tokenizer, targets, log)
        params = train_only(model, projector.target_names)
        optimizer = CrispOptimizer(torch.optim.Adam(params, lr=args.lr), projector, mode=args.mode)
        report["method"] = {
            "name": "crisp",
            "mode": args.mode,
            "gamma": projector.config.gamma,
            "layers": projector.target_names,
            "kept_fraction": projector.kept_fraction(),
        }
    gen = {"max_new_tokens": args.max_new_tokens, "chat_template": args.chat_template}
    reference = locality_reference(model, tokenizer, requests, **gen)
    report["before"] = evaluate_requests(model, tokenizer, requests, reference, **gen)
    if eval_texts:
        report["before"]["perplexity"] = perplexity(model, tokenizer, eval_texts)
    settings = EditSettings(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        stop_at=args.stop_at,
        chat_template=args.chat_template,
        progress=not args.quiet,
    )
    run = apply_edits(model, tokenizer, requests, optimizer, settings)
    report["run"] = run.to_dict()
    report["after"] = evaluate_requests(model, tokenizer, requests, reference, **gen)
    if eval_texts:
        report["after"]["perplexity"] = perplexity(model, tokenizer, eval_texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "edit_report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    after = report["after"]
    print(
        f"edited {len(requests)} facts in {run.seconds:.1f} s ({run.epochs} epochs): reliability "
        f"{after['reliability']:.3f}, generalization {_fmt(after['generalization'])}, locality "
        f"{_fmt(after.get('locality'))}; model and edit_report.json written to {out}"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- demo
def register_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demo.grid import SWEEP_BUDGETS, SWEEP_GAMMAS
    from .demo.settings import ALL_METHODS

    parser = subparsers.add_parser(
        "demo",
        help="pretrain a tiny model on a generated world and compare editing methods",
        description="Generate a fictional world (facts + skills), pretrain a small Llama on it on the CPU "
        "(cached; --retrain to rebuild), apply counterfactual edits with fine-tuning, CrispEdit and baselines, "
        "and print/write the comparison (results.json, tradeoff.png) plus the world and base model as files "
        "(base-model/, capability.txt, heldout.txt, edits.json) for 'torch-crisp collect' and 'edit'. "
        "Every argument is checked before any work starts.",
    )
    parser.add_argument(
        "--out", default="torch_crisp_demo", metavar="DIR", help="output folder (default ./torch_crisp_demo)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny world and model, used by the tests: about 60 s on 2 CPU cores (one thread, also with one core "
        "busy) with an empty cache, about 30 s once its base model is cached; shows the pipeline, not the effect",
    )
    parser.add_argument("--edits", type=int, metavar="N", help="number of counterfactual edits (default 100; 6 quick)")
    parser.add_argument(
        "--anchors", type=int, metavar="N", help="entities whose facts form the capability corpus (default 80; 6 quick)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(ALL_METHODS),
        metavar="METHOD",
        help=f"methods to compare (default: all of {', '.join(ALL_METHODS)}); NAME:VALUE sets one's setting: "
        "crisp:G / crisp-update:G (gamma), crisp-budget:E (budget), ewc:LAMBDA, l2sp:ALPHA, corda:LR",
    )
    parser.add_argument("--gamma", type=float, default=0.995, help="energy threshold of CrispEdit (default 0.995)")
    parser.add_argument(
        "--budget", type=float, default=0.02,
        help="capability budget of crisp-budget, nats (default 0.02: 1%% of the seed-0 base model's held-out loss)",
    )
    parser.add_argument(
        "--ewc-lambda", type=float, default=1000.0, help="EWC penalty strength (default 1000, by the grid rule)"
    )
    parser.add_argument("--l2sp-alpha", type=float, default=0.01, help="L2-SP penalty strength (default 0.01)")
    parser.add_argument(
        "--corda-lr", type=float, default=1e-3, help="CorDA's Adam learning rate (default 1e-3, by the grid rule)"
    )
    parser.add_argument(
        "--grid", action="store_true",
        help="run each peer named in --methods (ewc, l2sp, corda) over its whole tuning grid and pick one setting "
        "by the stated rule (results.json 'grid')",
    )
    parser.add_argument(
        "--sweep", action="store_true",
        help="instead of --methods, sweep the capability budget (crisp-budget:E for E in --budgets) and gamma "
        "(crisp-update:G for G in --gammas); writes sweep.json and sweep.png",
    )
    parser.add_argument(
        "--budgets", type=float, nargs="+", metavar="E", default=list(SWEEP_BUDGETS),
        help=f"budgets of --sweep (default {' '.join(f'{v:g}' for v in SWEEP_BUDGETS)})",
    )
    parser.add_argument(
        "--gammas", type=float, nargs="+", metavar="G", default=list(SWEEP_GAMMAS),
        help=f"gammas of --sweep (default {' '.join(f'{v:g}' for v in SWEEP_GAMMAS)})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=3.0,
        help="softmax temperature of the curvature collection on the capability corpus (default 3; 1 = plain "
        "empirical Fisher)",
    )
    parser.add_argument(
        "--lr", type=float, default=5e-3, help="Adam learning rate of the full-weight methods (default 5e-3)"
    )
    parser.add_argument(
        "--lora-lr", type=float, default=3e-3, help="Adam learning rate of the LoRA methods (default 3e-3)"
    )
    parser.add_argument("--epochs", type=int, default=300, help="maximum passes over the edits (default 300)")
    parser.add_argument(
        "--layers", type=int, nargs="+", metavar="I", help="blocks whose mlp.down_proj is edited (default: all)"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="seed of the world and the runs (default 0)")
    seeds.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        help="run the comparison once per seed (each in DIR/seed-S/) and report every metric's mean and range",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="where base models are cached (default: user cache)")
    parser.add_argument("--retrain", action="store_true", help="pretrain the base model again")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch CPU threads (default 1: on 2 cores with one kept busy, two threads pretrained 2.4x slower than "
        "one; on idle cores 1.4x faster)",
    )
    parser.add_argument("--quiet", action="store_true", help="only the final table")
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``torch-crisp demo`` (in :mod:`torch_crisp.editing.demo.command`); returns the exit code."""
    from .demo.command import run

    return run(args)
