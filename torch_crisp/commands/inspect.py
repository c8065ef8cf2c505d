"""``torch-crisp inspect``: spectra and kept fractions of a saved projector, as a table, JSON or plot.

Model-free: per layer, shapes, token count, spectrum summaries of both factors and, for each
``γ``, the fraction of eigen-directions kept and the fraction of curvature energy they carry
(:mod:`torch_crisp.spectrum`); ``--plot`` draws the spectra and the kept fraction against ``γ``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .common import CLIError

__all__ = ["DEFAULT_GAMMAS", "inspect_folder", "register_inspect", "run_inspect"]

DEFAULT_GAMMAS = (0.5, 0.9, 0.95, 0.99, 0.999)


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
    from ..persistence import read_folder
    from ..spectrum import factor_summary, gamma_sweep, spectra_from_sums, sweep_curvature

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
    from ..spectrum import sweep_curvature

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
