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

from .common import CLIError, check_output_folder

__all__ = ["DEFAULT_GAMMAS", "PLOT_GAMMAS", "check_plot_path", "inspect_folder", "register_inspect", "run_inspect"]

DEFAULT_GAMMAS = (0.5, 0.9, 0.95, 0.99, 0.999)
# the plot's γ axis: 1 - γ on a log scale, where the interesting range of γ (close to 1) spreads out
PLOT_GAMMAS = tuple(1.0 - 10.0 ** (-0.3 - 3.7 * i / 59) for i in range(60))


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


def inspect_folder(folder: str | Path, gammas: Sequence[float] | None = None, *, plot: bool = False) -> dict[str, Any]:
    """The report ``torch-crisp inspect`` prints, as a JSON-serialisable dict.

    The folder is validated (:func:`torch_crisp.persistence.open_folder`) and its layers are read
    and summarised one at a time: no ``d_out × d_in`` curvature grid outlives its layer. With
    ``plot``, each layer also keeps what the plot draws (both spectra and the kept fraction on a
    grid of ``γ``), under keys starting with ``_``.
    """
    from ..persistence import open_folder

    projector_folder = open_folder(folder)
    config = projector_folder.manifest["config"]
    if gammas is None:
        saved = {float(config["gamma"])} if config["gamma"] is not None else set()  # None: a budget alone
        gammas = sorted(set(DEFAULT_GAMMAS) | saved)
    layers = [
        _layer_report(name, entry, config["curvature"], gammas, plot) for name, entry in projector_folder.layers()
    ]
    metadata = projector_folder.manifest["metadata"]
    return {"folder": str(folder), "config": config, "metadata": metadata, "layers": layers}


def _layer_report(
    name: str, entry: dict[str, Any], curvature: str, gammas: Sequence[float], plot: bool
) -> dict[str, Any]:
    """Shapes, counts, spectra and the γ sweep of one layer (and the plot's data with ``plot``)."""
    from ..plan_report import spectrum_plan_rows
    from ..spectrum import factor_summary, spectra_from_sums

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
        return report
    eig_in, eig_out = spectra_from_sums(entry["A_sum"], entry["S_sum"], entry["num_tokens"])
    report["input_factor"] = asdict(factor_summary(eig_in))
    report["output_factor"] = asdict(factor_summary(eig_out))
    # the curvature model the projector uses: what a kept fraction means depends on it
    if curvature == "activations":
        values, report["curvature"] = eig_in, "activations (λ_in)"
    elif curvature == "ekfac" and entry["correction_sum"] is not None and entry["num_examples"]:
        # divided in the stored dtype, as LayerState.corrected_curvature does: same τ to the bit
        values, report["curvature"] = entry["correction_sum"] / entry["num_examples"], "ekfac (corrected)"
    else:
        values, report["curvature"] = None, "kfac (λ_out λ_in)"
    report["gammas"] = [asdict(point) for point in _sweep(eig_out, eig_in, values, gammas)]
    # which path a projection takes at each γ, and what it costs (torch_crisp.plan)
    corrected = values if curvature == "ekfac" and values is not None else None
    rows = spectrum_plan_rows(name, eig_out, eig_in, gammas, curvature.split()[0], corrected)
    for point, row in zip(report["gammas"], rows):
        point["plan"] = {key: value for key, value in row.to_dict().items() if key not in ("layer", "gamma")}
    if plot:
        report["_eig_in"], report["_eig_out"] = eig_in, eig_out
        report["_kept"] = [point.kept_fraction for point in _sweep(eig_out, eig_in, values, PLOT_GAMMAS)]
    return report


def _sweep(eig_out: torch.Tensor, eig_in: torch.Tensor, values: torch.Tensor | None, gammas: Sequence[float]) -> list:
    from ..spectrum import gamma_sweep, sweep_curvature

    return gamma_sweep(eig_out, eig_in, gammas) if values is None else sweep_curvature(values, gammas)


def run_inspect(args: argparse.Namespace) -> int:
    if args.gamma is not None:
        bad = [g for g in args.gamma if not 0.0 < g < 1.0]  # NaN fails too
        if bad:
            raise CLIError(f"--gamma values must lie strictly between 0 and 1, got {bad}")
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        check_plot_path(plot)  # before the (possibly long) reading of the folder
    report = inspect_folder(args.folder, sorted(set(args.gamma)) if args.gamma else None, plot=plot is not None)
    if plot is not None:
        _plot(report, plot)
    layers = [{k: v for k, v in layer.items() if not k.startswith("_")} for layer in report["layers"]]
    public = {**report, "layers": layers}
    if args.json:
        print(json.dumps(_json_safe(public), indent=2))
    else:
        print(_format_report(public))
        if plot is not None:
            print(f"plot written to {plot}")
    return 0


def check_plot_path(path: Path) -> None:
    """Raise ``CLIError`` unless ``--plot`` names an image file that can be written (and matplotlib exists)."""
    if path.suffix.lower() not in {".png", ".pdf", ".svg", ".jpg", ".jpeg"}:
        raise CLIError(f"--plot {path}: use a .png, .pdf, .svg or .jpg file name")
    if path.is_dir():
        raise CLIError(f"--plot {path} is a folder; name an image file in it")
    check_output_folder("--plot", path.parent)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'torch-crisp[plot]'") from None


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
        lines.append(f"  {'gamma':>8}  {'tau':>10}  {'kept directions':>15}  {'kept energy':>11}  "
                     f"{'r':>6} {'J(0)':>6} {'path':>10} {'cost':>5}")
        for point in layer["gammas"]:
            plan = point["plan"]
            lines.append(
                f"  {point['gamma']:>8g}  {point['tau']:>10.3e}  {point['kept_fraction']:>15.2%}  "
                f"{point['kept_energy']:>11.3%}  {plan['blocked_rows']:>6} {plan['max_blocked_per_row']:>6} "
                f"{plan['path']:>10} {plan['relative_time']:>5.2f}"
            )
        lines.append("  (r: output directions with a blocked coefficient, J(0): most blocked in one of them, "
                     "path and cost: the projection's and its estimated time / the full rotation's)")
    return "\n".join(lines)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    layers = [layer for layer in report["layers"] if not layer.get("empty")]
    if not layers:
        raise CLIError(f"{report['folder']} holds no collected curvature to plot")
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    spectra, kept = figure.subplots(1, 2)
    for index, layer in enumerate(layers):
        color = f"C{index % 10}"
        for eig, style in ((layer["_eig_in"], "-"), (layer["_eig_out"], "--")):
            values = torch.sort(eig.double(), descending=True).values
            values = values / values[0] if values[0] > 0 else values
            spectra.semilogy(range(1, len(values) + 1), values.clamp_min(1e-12).tolist(), style, color=color, lw=1)
        kept.semilogx([1 - gamma for gamma in PLOT_GAMMAS], layer["_kept"], color=color, label=layer["name"])
    spectra.set(title="factor spectra (A solid, S dashed)", xlabel="eigenvalue index", ylabel="λ / λ_max")
    kept.set(title="kept directions against gamma", xlabel="1 − gamma (log scale; gamma grows to the right)",
             ylabel="kept fraction of directions")
    kept.invert_xaxis()
    saved_gamma = report["config"]["gamma"]
    if saved_gamma is not None:
        kept.axvline(1 - saved_gamma, color="gray", ls=":", label=f"saved gamma {saved_gamma}")
    kept.set_ylim(0, 1.02)
    kept.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
