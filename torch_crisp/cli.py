"""The ``torch-crisp`` command line.

Subcommands:

* ``collect``: load a local Hugging Face model folder and a text corpus, collect the K-FAC factors
  of the target layers and save a projector folder.
* ``inspect``: per layer of a saved projector, shapes, token count, spectrum summary, and the kept
  fraction of directions and of curvature energy at several ``γ``; ``--plot`` draws it.

Adding a subcommand: write ``register_<name>(subparsers)`` that adds its parser and sets
``func=<run function taking the parsed args and returning an exit code>``, and append it to
:data:`COMMANDS`. User mistakes raise :class:`CLIError` (or ``ValueError`` / ``OSError``) and are
printed as one line with exit code 2; ``--traceback`` shows the full trace for debugging.

The core never imports transformers; ``collect`` imports it when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]

PROG = "torch-crisp"
DEFAULT_GAMMAS = (0.5, 0.9, 0.95, 0.99, 0.999)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A mistake the user can fix; printed as ``torch-crisp <command>: error: <message>``."""


Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# --------------------------------------------------------------------------- collect
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
    parser.add_argument("--max-tokens", type=int, metavar="N", help="stop after N (non-padding) tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward/backward pass (default 8)")
    parser.add_argument(
        "--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *_DTYPES],
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
    parser.set_defaults(func=run_collect)


def run_collect(args: argparse.Namespace) -> int:
    from . import __version__
    from .config import CrispConfig
    from .corpus import lm_batches, read_documents, token_windows
    from .projector import CrispProjector

    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CLIError(f"{flag} must be a positive integer, got {value}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise CLIError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.target_regex is not None:
        target_modules: Any = args.target_regex
    elif args.target_modules is None:
        target_modules = ["mlp.down_proj"]
    elif args.target_modules == ["all-linear"]:
        target_modules = "all-linear"
    else:
        target_modules = args.target_modules
    config = CrispConfig(
        target_modules=target_modules, gamma=args.gamma, factor_dtype=args.factor_dtype,
        curvature=args.curvature, fisher=args.fisher,
    )
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_hf_model(path: Path, dtype: str, device: torch.device, quiet: bool) -> tuple[torch.nn.Module, Any]:
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("collect needs Hugging Face transformers: pip install 'torch-crisp[hf]'") from None
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such folder (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path} is not a Hugging Face model folder (it has no config.json)")
    # transformers >= 4.56 calls the argument dtype; older versions torch_dtype
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()  # its "Loading weights" bar; restored below
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CLIError(f"--model {path}: cannot load its tokenizer ({_first_line(err)})") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **{dtype_kw: _DTYPES.get(dtype, "auto")}
            )
        except (OSError, ValueError) as err:
            raise CLIError(f"--model {path}: cannot load it as a causal LM ({_first_line(err)})") from None
    finally:
        if quiet and bars_were_enabled:
            hf_logging.enable_progress_bar()
    return model.to(device), tokenizer


def pad_token_id(tokenizer: Any) -> int:
    # Padding positions are masked out of the factors and the loss, so any valid id will do.
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


# --------------------------------------------------------------------------- inspect
def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="spectra and kept fractions of a saved projector",
        description="Per layer of a saved projector: shapes, token count, factor spectra and, for each "
        "gamma, the fraction of eigen-directions kept and the fraction of curvature energy they carry.",
    )
    parser.add_argument("folder", metavar="DIR", help="projector folder (from collect or save_pretrained)")
    parser.add_argument(
        "--gamma", type=float, nargs="+", metavar="G",
        help=f"energy thresholds to evaluate (default: {' '.join(map(str, DEFAULT_GAMMAS))} and the saved one)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw spectra and kept fraction against gamma (matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.set_defaults(func=run_inspect)


def inspect_folder(folder: str | Path, gammas: Sequence[float] | None = None) -> dict[str, Any]:
    """The report ``torch-crisp inspect`` prints, as a JSON-serialisable dict."""
    from .persistence import read_folder
    from .spectrum import factor_summary, gamma_sweep, spectra_from_sums, sweep_curvature

    sd, manifest = read_folder(folder)
    saved_gamma = float(sd["config"]["gamma"])
    curvature = sd["config"].get("curvature", "kfac")
    if gammas is None:
        gammas = sorted(set(DEFAULT_GAMMAS) | {saved_gamma})
    layers = []
    for name, entry in sd["layers"].items():
        fp = entry["fingerprint"]
        report: dict[str, Any] = {
            "name": name,
            "shape": [fp["d_out"], fp["d_in"] + int(fp["has_bias"])],
            "bias": fp["has_bias"],
            "module_type": fp["module_type"],
            "num_tokens": entry["num_tokens"],
        }
        if entry["A_sum"] is None or not entry["num_tokens"]:
            report["empty"] = True
            layers.append(report)
            continue
        eig_in, eig_out = spectra_from_sums(entry["A_sum"], entry["S_sum"], entry["num_tokens"])
        report["input_factor"] = asdict(factor_summary(eig_in))
        report["output_factor"] = asdict(factor_summary(eig_out))
        # the curvature model the projector uses: what a kept fraction means depends on it
        if curvature == "activations":
            values, report["curvature"] = eig_in, "activations (λ_in)"
        elif curvature == "ekfac" and entry.get("correction_sum") is not None and entry.get("num_examples"):
            # divided in the stored dtype, as LayerState.corrected_curvature does: same τ to the bit
            values, report["curvature"] = entry["correction_sum"] / entry["num_examples"], "ekfac (corrected)"
        else:
            values, report["curvature"] = None, "kfac (λ_out λ_in)"
        points = gamma_sweep(eig_out, eig_in, gammas) if values is None else sweep_curvature(values, gammas)
        report["gammas"] = [asdict(point) for point in points]
        report["_eig_in"], report["_eig_out"] = eig_in, eig_out  # for the plot; dropped from JSON
        report["_curvature"] = values if values is not None else torch.outer(eig_out.double(), eig_in.double())
        layers.append(report)
    return {
        "folder": str(folder),
        "config": sd["config"],
        "metadata": manifest.get("metadata", {}),
        "layers": layers,
    }


def run_inspect(args: argparse.Namespace) -> int:
    if args.gamma is not None:
        bad = [g for g in args.gamma if not 0.0 < g < 1.0]
        if bad:
            raise CLIError(f"--gamma values must lie strictly between 0 and 1, got {bad}")
    report = inspect_folder(args.folder, sorted(set(args.gamma)) if args.gamma else None)
    if args.plot:
        _plot(report, Path(args.plot))
    layers = [{k: v for k, v in layer.items() if not k.startswith("_")} for layer in report["layers"]]
    public = {**report, "layers": layers}
    if args.json:
        print(json.dumps(_json_safe(public), indent=2))
    else:
        print(_format_report(public))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf": strict JSON has no infinity
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _format_report(report: dict[str, Any]) -> str:
    config = report["config"]
    meta = report["metadata"]
    lines = [f"projector {report['folder']}"]
    lines.append(
        f"  target_modules={config['target_modules']}  saved gamma={config['gamma']}  fisher={config['fisher']}"
    )
    if meta.get("model") or meta.get("data"):
        lines.append(f"  collected from model {meta.get('model', '?')} on {meta.get('data', '?')}")
    for layer in report["layers"]:
        d_out, d_in = layer["shape"]
        bias = " (last column: bias)" if layer["bias"] else ""
        lines.append("")
        lines.append(
            f"{layer['name']}  [{layer['module_type']}]  [W|b] {d_out} x {d_in}{bias}  N = {_num(layer['num_tokens'])}"
        )
        if layer.get("empty"):
            lines.append("  no curvature collected")
            continue
        for label, key in (("A (input) ", "input_factor"), ("S (output)", "output_factor")):
            f = layer[key]
            lines.append(
                f"  {label} size {f['size']:>6}  max {f['max']:.3e}  trace {f['trace']:.3e}  "
                f"90% of trace in {f['rank_90']} eigenvalues  numerical rank {f['numerical_rank']}"
            )
        lines.append(f"  curvature {layer['curvature']}")
        lines.append(f"  {'gamma':>8}  {'tau':>10}  {'kept directions':>15}  {'kept energy':>11}")
        for point in layer["gammas"]:
            lines.append(
                f"  {point['gamma']:>8g}  {point['tau']:>10.3e}  {point['kept_fraction']:>15.2%}  "
                f"{point['kept_energy']:>11.3%}"
            )
    return "\n".join(lines)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'torch-crisp[plot]'") from None
    from .spectrum import sweep_curvature

    layers = [layer for layer in report["layers"] if not layer.get("empty")]
    if not layers:
        raise CLIError(f"{report['folder']} holds no collected curvature to plot")
    if path.suffix.lower() not in {".png", ".pdf", ".svg", ".jpg", ".jpeg"}:
        raise CLIError(f"--plot {path}: use a .png, .pdf, .svg or .jpg file name")
    # 1 - gamma on a log axis: the interesting range of gamma is close to 1
    grid = [1.0 - 10.0 ** (-0.3 - 3.7 * i / 59) for i in range(60)]
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    spectra, kept = figure.subplots(1, 2)
    for index, layer in enumerate(layers):
        color = f"C{index % 10}"
        for eig, style in ((layer["_eig_in"], "-"), (layer["_eig_out"], "--")):
            values = torch.sort(eig.double(), descending=True).values
            values = values / values[0] if values[0] > 0 else values
            spectra.semilogy(range(1, len(values) + 1), values.clamp_min(1e-12).tolist(), style, color=color, lw=1)
        points = sweep_curvature(layer["_curvature"], grid)
        kept_fraction = [p.kept_fraction for p in points]
        kept.semilogx([1 - p.gamma for p in points], kept_fraction, color=color, label=layer["name"])
    spectra.set(title="factor spectra (A solid, S dashed)", xlabel="eigenvalue index", ylabel="λ / λ_max")
    kept.set(title="kept directions against gamma", xlabel="1 − gamma (log scale; gamma grows to the right)",
             ylabel="kept fraction of directions")
    kept.invert_xaxis()
    kept.axvline(1 - report["config"]["gamma"], color="gray", ls=":", label=f"saved gamma {report['config']['gamma']}")
    kept.set_ylim(0, 1.02)
    kept.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------- entry point
def register_editing(subparsers: argparse._SubParsersAction) -> None:
    """``edit`` and ``demo`` (in :mod:`torch_crisp.editing.cli`; transformers loads when they run)."""
    from .editing.cli import register

    register(subparsers)


COMMANDS: list[Registrar] = [register_collect, register_inspect, register_editing]
"""Subcommand registrars, in the order ``--help`` lists them."""


def build_parser(commands: Sequence[Registrar] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="CrispEdit tools: collect capability curvature once, inspect it, reuse it for editing.",
    )
    parser.add_argument("--traceback", action="store_true", help="show full Python tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands if commands is not None else COMMANDS:
        register(subparsers)
    return parser


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())  # errors of other libraries may span lines; keep one


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torch-crisp``; returns the exit code (0 success, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 and a usage line on bad flags
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
