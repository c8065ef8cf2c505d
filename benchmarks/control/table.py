"""Markdown tables of a results.json written by run.py (used for docs/curvature.md).

    python benchmarks/control/table.py benchmarks/control/results/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["none", "activations", "kfac", "kfac-mc", "ekfac", "ekfac-mc", "gauss-newton", "hessian"]
LEVELS = {0.05: [0.1, 0.2, 0.3], 0.5: [0.3, 0.5, 0.7]}


def frontier_table(results: dict) -> str:
    """Best mean task-A accuracy over γ among a method's points that reach a task-B accuracy level."""
    rows = results["mean_over_seeds"]
    lines = []
    for lr in sorted({r["lr"] for r in rows}):
        levels = LEVELS.get(lr, [0.2, 0.4, 0.6])
        lines.append(f"\n**lr = {lr}** — best task-A accuracy with task-B accuracy ≥ level (γ in brackets)\n")
        lines.append("| method | " + " | ".join(f"B ≥ {x}" for x in levels) + " |")
        lines.append("|---" * (len(levels) + 1) + "|")
        for method in ORDER:
            mine = [r for r in rows if r["lr"] == lr and r["method"] == method]
            if not mine:
                continue
            cells = []
            for level in levels:
                ok = [r for r in mine if r["acc_b"] >= level]
                if not ok:
                    cells.append("—")
                    continue
                best = max(ok, key=lambda r: r["acc_a"])
                gamma = "" if best["gamma"] is None else f" ({best['gamma']})"
                cells.append(f"{best['acc_a']:.3f}{gamma}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quadratic_table(results: dict, method: str = "gauss-newton") -> str:
    """Task-A training-loss increase: measured, against the Gauss-Newton quadratic model's prediction."""
    rows = [r for r in results["mean_over_seeds"] if r["method"] in (method, "none")]
    lines = [
        "| lr | method | γ | acc A | acc B | ‖Δ‖ | ΔL_A measured | ½ΔᵀGΔ predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["lr"], r["method"] != "none", r["gamma"] or 0)):
        lines.append(
            f"| {r['lr']} | {r['method']} | {r['gamma'] if r['gamma'] is not None else '—'} | {r['acc_a']:.3f} | "
            f"{r['acc_b']:.3f} | {r['delta_norm']:.1f} | {r['loss_a_train_increase']:.3f} | "
            f"{r['gn_predicted_increase']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(frontier_table(data))
    print()
    print(quadratic_table(data))
