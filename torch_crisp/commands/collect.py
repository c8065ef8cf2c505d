"""``torch-crisp collect``: capability curvature of a local Hugging Face model on a text corpus.

Loads a local model folder and a ``.txt`` / ``.jsonl`` corpus, collects the K-FAC factors of the
target layers and saves a projector folder (load it with ``CrispProjector.from_pretrained``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .common import (
    DTYPES,
    CLIError,
    add_threads_argument,
    apply_threads,
    check_fraction,
    check_input_file,
    check_model_folder,
    check_output_folder,
    check_positive_int,
    check_seed,
    load_hf_model,
    resolve_device,
)

__all__ = ["check_collect_arguments", "register_collect", "run_collect"]


def register_collect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collect",
        help="collect K-FAC factors of a local Hugging Face model on a text corpus",
        description="Collect the capability curvature (K-FAC factors) of a local Hugging Face causal LM "
        "on a text corpus and save a projector folder (load it with CrispProjector.from_pretrained).",
    )
    parser.add_argument(
        "--model", required=True, metavar="PATH", help="local model folder (config, weights, tokenizer)"
    )
    parser.add_argument(
        "--data", required=True, metavar="FILE",
        help=".txt (one document per line, or blank-line separated) or .jsonl with a text field",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the projector to")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules", nargs="+", metavar="SUFFIX",
        help="module-name suffixes to project (default: mlp.down_proj), or 'all-linear'",
    )
    targets.add_argument("--target-regex", metavar="REGEX", help="regular expression matched against full module names")
    parser.add_argument("--gamma", type=float, default=0.9, help="energy threshold stored in the config (default 0.9)")
    parser.add_argument(
        "--temperature", type=float, default=1.0,
        help="softmax temperature of the collection (default 1: the plain Fisher; see docs/editing.md)",
    )
    parser.add_argument("--max-tokens", type=int, metavar="N", help="stop after N (non-padding) tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward/backward pass (default 8)")
    parser.add_argument(
        "--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="model dtype for the passes (default: the checkpoint's); factors use --factor-dtype",
    )
    parser.add_argument(
        "--curvature", default="kfac", choices=["kfac", "ekfac", "activations"],
        help="curvature model (ekfac makes a second pass over the data); see docs/concepts.md",
    )
    parser.add_argument(
        "--fisher", default="empirical", choices=["empirical", "mc"],
        help="output gradients from the data's labels, or from labels sampled from the model",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (labels sampled for --fisher mc)")
    parser.add_argument("--factor-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--split", default="auto", choices=["auto", "line", "blank"], help="how a .txt file is split")
    parser.add_argument("--text-field", default="text", help="field of the .jsonl objects holding the text")
    parser.add_argument("--save-basis", action="store_true", help="also save eigenbases (bigger; faster loading)")
    parser.add_argument("--no-weight-hash", action="store_true", help="do not record hashes of the target weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_threads_argument(parser)
    parser.set_defaults(func=run_collect)


def run_collect(args: argparse.Namespace) -> int:
    from .._version import __version__
    from ..corpus import lm_batches, pad_token_id, read_documents, token_windows
    from ..projector import CrispProjector

    check_collect_arguments(args)  # every mistake is reported before the model loads
    apply_threads(args)
    config = _config(args)
    device = resolve_device(args.device)
    documents = read_documents(args.data, split=args.split, text_field=args.text_field)
    model, tokenizer = load_hf_model(Path(args.model), args.dtype, device, args.quiet)
    projector = CrispProjector(model, config)  # resolves target_modules before the corpus is tokenised

    pad_id = pad_token_id(tokenizer)
    windows = list(token_windows(tokenizer, documents, seq_len=args.seq_len, max_tokens=args.max_tokens))
    if not windows:
        raise CLIError(f"{args.data} yields no window of at least 2 tokens; check the file and --seq-len")
    batches = lm_batches(windows, batch_size=args.batch_size, pad_id=pad_id)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        projector.collect(batches, progress=not args.quiet)
    except torch.cuda.OutOfMemoryError:  # an alias of torch.OutOfMemoryError, present in older torch too
        raise CLIError(f"out of memory on {device}; lower --batch-size or --seq-len") from None
    seconds = time.perf_counter() - start
    num_tokens = sum(len(w) for w in windows)
    metadata = {
        "command": "torch-crisp collect",
        "model": str(Path(args.model).resolve()),
        "data": str(Path(args.data).resolve()),
        "documents": len(documents),
        "windows": len(windows),
        "tokens": num_tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "collect_seconds": round(seconds, 3),
        "torch_crisp_version": __version__,
    }
    folder = projector.save_pretrained(
        args.out, include_basis=args.save_basis, hash_weights=not args.no_weight_hash, metadata=metadata
    )
    if not args.quiet:
        kept = projector.kept_fraction()
        print(
            f"collected {num_tokens} tokens ({len(windows)} windows, {len(documents)} documents) over "
            f"{len(projector.layers)} layers in {seconds:.1f} s; saved to {folder}"
        )
        print(f"kept directions at gamma={config.gamma}: mean {sum(kept.values()) / len(kept):.1%} "
              f"(torch-crisp inspect {folder} for the details)")
    return 0


def check_collect_arguments(args: argparse.Namespace) -> None:
    """``CLIError`` for any invalid argument or path of ``collect``; creates and reads nothing."""
    check_positive_int("--seq-len", args.seq_len, minimum=2)  # a window needs a next-token target
    check_positive_int("--batch-size", args.batch_size)
    check_positive_int("--max-tokens", args.max_tokens, minimum=2)
    check_fraction("--gamma", args.gamma)
    check_seed("--seed", args.seed)
    if not args.text_field:
        raise CLIError("--text-field must name a field of the .jsonl objects, got an empty string")
    check_model_folder(Path(args.model))
    check_input_file("--data", Path(args.data), (".txt", ".jsonl"))
    check_output_folder("--out", Path(args.out), input_model=Path(args.model))
    resolve_device(args.device)


def _config(args: argparse.Namespace) -> Any:
    """The :class:`CrispConfig` the flags describe (``CLIError`` naming the flag if invalid)."""
    from ..config import CrispConfig

    if args.target_regex is not None:
        target_modules: Any = args.target_regex
    elif args.target_modules is None:
        target_modules = ["mlp.down_proj"]
    elif args.target_modules == ["all-linear"]:
        target_modules = "all-linear"
    else:
        target_modules = args.target_modules
    try:
        return CrispConfig(
            target_modules=target_modules, gamma=args.gamma, factor_dtype=args.factor_dtype,
            curvature=args.curvature, fisher=args.fisher, temperature=args.temperature,
        )
    except ValueError as err:
        flags = "--temperature" if "temperature" in str(err) else "--target-modules / --target-regex"
        raise CLIError(f"{flags}: {err}") from None
