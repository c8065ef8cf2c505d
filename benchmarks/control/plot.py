"""Plot of the controlled experiment: task-A accuracy against task-B accuracy, one curve per method,
one panel per fine-tuning learning rate."""

from __future__ import annotations

from pathlib import Path

STYLE = {
    "none": ("black", "*"), "activations": ("tab:red", "v"), "kfac": ("tab:blue", "o"),
    "kfac-mc": ("tab:cyan", "s"), "ekfac": ("tab:green", "D"), "ekfac-mc": ("tab:olive", "P"),
    "gauss-newton": ("tab:purple", "^"), "hessian": ("tab:brown", "x"),
}


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({row["lr"] for row in results["mean_over_seeds"]})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6.2 * len(lrs), 5.2), squeeze=False)
    pre = results["pretrained"]
    acc_a = sum(p["acc_a"] for p in pre) / len(pre)
    seeds = results["settings"]["seeds"]
    steps = results["settings"]["steps"]
    for ax, lr in zip(axes[0], lrs):
        by_method: dict[str, list[dict]] = {}
        for row in results["mean_over_seeds"]:
            if row["lr"] == lr:
                by_method.setdefault(row["method"], []).append(row)
        for method, rows in by_method.items():
            color, marker = STYLE.get(method, ("gray", "."))
            rows = sorted(rows, key=lambda r: r["gamma"] or 0)
            ax.plot([r["acc_b"] for r in rows], [r["acc_a"] for r in rows], marker=marker, color=color,
                    label=method, markersize=10 if method == "none" else 5,
                    linestyle="none" if method == "none" else "-")
            if method in ("gauss-newton", "activations"):
                for r in rows:
                    ax.annotate(f"{r['gamma']}", (r["acc_b"], r["acc_a"]), fontsize=6, color=color,
                                xytext=(3, 3), textcoords="offset points")
        ax.axhline(acc_a, color="gray", linestyle=":", linewidth=1, label="before fine-tuning")
        ax.set_xlabel("task B accuracy (digits 5–9, test)")
        ax.set_ylabel("task A accuracy (digits 0–4, test)")
        ax.set_title(f"SGD lr={lr}, {steps} steps (mean of {seeds} seed{'s' * (seeds > 1)}; labels: γ)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
