"""Complement path and blocked-only storage against the dense floor, measured side by side.

    python benchmarks/complement.py                   # power-law layers, the demo model, the control MLP
    python benchmarks/complement.py --smoke           # tiny shapes and models (the tests run this)
    python benchmarks/complement.py --demo-cache DIR  # where `torch-crisp demo` cached its base model

Spectra (``spectra.py``): power laws ``λ_k = k^-1.5`` at 512×2048 and 1024×4096 (``γ = 0.9``, and
0.99 for contrast), every linear layer of the demo's pretrained tiny Llama, and the control
experiment's MLP, the last two at ``γ = 0.9, 0.99, 0.995``. For each case these run interleaved,
in a rotating order, one "step" projecting every layer of the case once (a random float32
gradient per layer):

* ``floor``: the four bare float32 products of the full path, ``U_outᵀ Q U_in`` and back;
* ``auto``: what ``LayerState.project`` runs (the plan's cheaper path per layer);
* ``complement``: the complement path forced on every layer;
* ``blocked``: ``auto`` from a ``BlockedBasis`` (``basis_storage="blocked"``);
* ``reference``: :func:`torch_crisp.functional.project`.

Reported: medians of per-round time ratios to the floor, the FLOP ratio of the plan, the largest
relative error of each path against a float64 reference, and the bytes a layer keeps with
``basis_storage="blocked"`` and offloaded sums against ``4·(d_in² + d_out²)``, per layer from
:func:`torch_crisp.plan_report.plan_report`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, interleave, set_threads, write_result  # noqa: E402
from spectra import control_projector, demo_projector, power_law_basis  # noqa: E402

from torch_crisp import functional  # noqa: E402
from torch_crisp.basis import Basis  # noqa: E402
from torch_crisp.plan_report import format_plan_report, plan_report  # noqa: E402

POWER_LAW = [(512, 2048, 0.9), (1024, 4096, 0.9), (512, 2048, 0.99)]
SMOKE_POWER_LAW = [(24, 96, 0.9), (96, 24, 0.9)]
GAMMAS = (0.9, 0.99, 0.995)


def _floor(Q: torch.Tensor, basis: Basis) -> None:
    C = basis.U_out.mT @ Q @ basis.U_in
    basis.U_out @ C @ basis.U_in.mT


def _resident_ratio(basis: Basis) -> float:
    d_out, d_in = basis.shape
    stored = basis.stored("blocked")
    return sum(t.numel() * t.element_size() for t in stored.tensors().values()) / (4 * (d_out**2 + d_in**2))


def _relative_error(path: str, Q: torch.Tensor, basis: Basis, stored) -> float:
    """‖P_path(Q) − P(Q)‖ against the float64 reference, relative to ‖P(Q)‖ (at least 10 % of ‖Q‖)."""
    if path == "blocked":
        result = stored.project(Q)
    elif path == "reference":
        result = functional.project(Q, basis.U_out, basis.U_in, basis.mask)
    else:
        result = basis.project(Q, path)
    exact = functional.project(Q.double(), basis.U_out.double(), basis.U_in.double(), basis.mask)
    return float((result.double() - exact).norm() / max(exact.norm(), 0.1 * Q.norm()))


def measure_step(bases: list[Basis], rounds: int, seed: int = 0, max_inner: int = 100) -> dict[str, Any]:
    """Time one projection of every basis per candidate, interleaved; errors and FLOP ratios."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(*b.shape, generator=g) for b in bases]
    blocked = [b.stored("blocked") for b in bases]
    for b in bases:  # plans are made on first use, once per basis: not part of a step
        b.plan("auto"), b.plan("complement")

    def step(project) -> Any:
        return lambda: [project(Q, b, s) for Q, b, s in zip(grads, bases, blocked)]

    candidates = {
        "floor": step(lambda Q, b, s: _floor(Q, b)),
        "auto": step(lambda Q, b, s: b.project(Q, "auto")),
        "complement": step(lambda Q, b, s: b.project(Q, "complement")),
        "blocked": step(lambda Q, b, s: s.project(Q)),
        "reference": step(lambda Q, b, s: functional.project(Q, b.U_out, b.U_in, b.mask)),
    }
    full_flops = sum(b.plan().full_flops for b in bases)
    inner = min(max_inner, max(1, int(0.02 / (full_flops / 1e11))))  # samples of ~20 ms
    timings = interleave(candidates, rounds=rounds, warmup=1, inner=inner)
    errors = {name: max(_relative_error(name, Q, b, s) for Q, b, s in zip(grads, bases, blocked))
              for name in ("auto", "complement", "blocked", "reference")}
    return {
        "layers": len(bases),
        "flop_ratio_auto": sum(b.plan("auto").flops for b in bases) / full_flops,
        "flop_ratio_complement": sum(b.plan("complement").flops for b in bases) / full_flops,
        "ratio_auto_over_floor": timings.paired_median_ratio("auto", "floor"),
        "ratio_complement_over_floor": timings.paired_median_ratio("complement", "floor"),
        "ratio_blocked_over_floor": timings.paired_median_ratio("blocked", "floor"),
        "ratio_reference_over_floor": timings.paired_median_ratio("reference", "floor"),
        "ratio_auto_over_reference": timings.paired_median_ratio("auto", "reference"),
        "resident_ratio_blocked": sum(_resident_ratio(b) * 4 * sum(x * x for x in b.shape) for b in bases)
        / sum(4 * sum(x * x for x in b.shape) for b in bases),
        "max_relative_error": errors,
        "timings": timings.summary(),
    }


def power_law_cases(smoke: bool, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for d_out, d_in, gamma in SMOKE_POWER_LAW if smoke else POWER_LAW:
        basis = power_law_basis(d_out, d_in, gamma)
        plan = basis.plan()
        rows.append({"d_out": d_out, "d_in": d_in, "gamma": gamma, "exponent": 1.5, "path": plan.path,
                     "r": plan.blocked_rows, "J0": plan.max_blocked_per_row, "blocked_fraction": plan.blocked_fraction,
                     **measure_step([basis], rounds, max_inner=2 if smoke else 100)})
    return rows


def projector_cases(projector, description: str, rounds: int, demo_targets: bool, max_inner: int) -> dict[str, Any]:
    """Per ``γ``: the plan report of every layer, and steps over all layers (and the demo's targets)."""
    result: dict[str, Any] = {"source": description, "gammas": {}}
    for gamma in GAMMAS:
        projector.set_gamma(gamma)
        rows = plan_report(projector.layers, (None,))
        entry: dict[str, Any] = {"layers": [dict(r.to_dict(), gamma=gamma) for r in rows]}
        bases = [s.basis for s in projector.layers.values()]
        entry["all_layers"] = measure_step(bases, rounds, max_inner=max_inner)
        if demo_targets:  # the demo edits every block's MLP output projection
            targets = [s.basis for n, s in projector.layers.items() if n.endswith("mlp.down_proj")]
            entry["down_proj"] = measure_step(targets, rounds, max_inner=max_inner)
        result["gammas"][str(gamma)] = entry
        print(f"\n{description}, γ = {gamma}")
        print(format_plan_report(rows))
        _print_step("step, all layers", entry["all_layers"])
        if demo_targets:
            _print_step("step, the demo's down_proj targets", entry["down_proj"])
    return result


def _print_step(label: str, m: dict[str, Any]) -> None:
    print(f"  {label}: FLOPs auto/full {m['flop_ratio_auto']:.3f}; "
          f"time / floor: auto {m['ratio_auto_over_floor']:.3f}, "
          f"complement {m['ratio_complement_over_floor']:.3f}, blocked {m['ratio_blocked_over_floor']:.3f}, "
          f"reference {m['ratio_reference_over_floor']:.3f}, auto/reference {m['ratio_auto_over_reference']:.3f}; "
          f"resident (blocked) {m['resident_ratio_blocked']:.3f}; "
          f"max error {max(m['max_relative_error'].values()):.1e}")


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None,
        demo_cache: str | None = None, pretrain_demo: bool = False) -> dict[str, Any]:
    rounds = rounds or (2 if smoke else 9)
    result: dict[str, Any] = {"power_law": power_law_cases(smoke, rounds)}
    print(f"{'d_out×d_in':>11} {'γ':>5} {'r':>5} {'J(0)':>5} {'blocked':>8} {'FLOPs':>6} {'auto':>6} {'compl.':>6} "
          f"{'blocked':>7} {'ref.':>6} {'resident':>8} {'max err':>8}")
    for r in result["power_law"]:
        print(f"{r['d_out']:>5}×{r['d_in']:<5} {r['gamma']:>5} {r['r']:>5} {r['J0']:>5} {r['blocked_fraction']:>8.2%} "
              f"{r['flop_ratio_auto']:>6.3f} {r['ratio_auto_over_floor']:>6.3f} "
              f"{r['ratio_complement_over_floor']:>6.3f} {r['ratio_blocked_over_floor']:>7.3f} "
              f"{r['ratio_reference_over_floor']:>6.3f} {r['resident_ratio_blocked']:>8.3f} "
              f"{max(r['max_relative_error'].values()):>8.1e}")
    demo = demo_projector(demo_cache, pretrain_demo, smoke)
    max_inner = 2 if smoke else 100
    result["demo"] = None if demo is None else projector_cases(*demo, rounds, True, max_inner)
    result["control"] = projector_cases(*control_projector(smoke), rounds, False, max_inner)
    steps = list(result["power_law"])
    for source in ("demo", "control"):
        if result[source] is not None:
            steps += [e[k] for e in result[source]["gammas"].values() for k in ("all_layers", "down_proj") if k in e]
    result["worst_ratio_auto_over_floor"] = max(s["ratio_auto_over_floor"] for s in steps)
    result["median_ratio_reference_over_floor"] = statistics.median(s["ratio_reference_over_floor"] for s in steps)
    write_result("complement_smoke" if smoke else "complement", result, out_dir)
    print(f"\nworst auto / floor over every case: {result['worst_ratio_auto_over_floor']:.3f}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser: argparse.ArgumentParser = benchmark_parser(__doc__)
    parser.add_argument("--demo-cache", default=None, help="the demo's cache folder (default: the demo's own)")
    parser.add_argument("--pretrain-demo", action="store_true", help="pretrain the demo's base model if not cached")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    return run(args.smoke, args.rounds, args.out, args.demo_cache, args.pretrain_demo)


if __name__ == "__main__":
    main()
