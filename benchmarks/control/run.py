"""Controlled experiment: how well does each curvature model keep task A while learning task B?

    python benchmarks/control/run.py            # full sweep (a few minutes on 2 CPU cores)
    python benchmarks/control/run.py --quick    # smoke run (seconds), exercised by the tests

For each seed: pretrain an MLP on digits 0–4 (task A), then, for each curvature model and each
energy threshold γ, start from the pretrained weights and fine-tune only the middle layer on digits
5–9 (task B) with projected full-batch SGD, and record task-A and task-B test accuracy (10-way).
Writes ``results.json`` (every run plus per-method means over seeds) and ``control.png`` (plot.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from methods import EXACT_METHODS, LIBRARY_METHODS, exact_spectrum, layer_matrix, library_projector  # noqa: E402
from task import EDITED, accuracy, load_tasks, make_mlp, mean_loss, pretrain  # noqa: E402

from torch_crisp import CrispOptimizer  # noqa: E402

FULL_GAMMAS = [0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
MEAN_KEYS = (
    "acc_a", "acc_b", "loss_a", "loss_b", "kept_fraction", "loss_a_train_increase", "gn_predicted_increase",
    "delta_norm",
)


def finetune(model: nn.Module, split, steps: int, lr: float, projector=None, project_fn=None) -> None:
    """Full-batch SGD on task B's mean cross-entropy, edited layer only, gradient projected."""
    layer = model.get_submodule(EDITED)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    if projector is not None:
        optimizer = CrispOptimizer(optimizer, projector)  # the library path: project, then step
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(split.x), split.y).backward()
        if project_fn is not None:
            with torch.no_grad():
                Q = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
                P = project_fn(Q)
                layer.weight.grad.copy_(P[:, :-1])
                layer.bias.grad.copy_(P[:, -1])
        optimizer.step()


def run(args: argparse.Namespace) -> dict:
    methods = args.methods
    records = []
    pretrained_acc = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        tasks = load_tasks(seed)
        base = make_mlp(args.hidden, seed)
        pretrain(base, tasks.a_train, args.pretrain_steps)
        pretrained_acc.append({
            "seed": seed, "acc_a": accuracy(base, tasks.a_test), "acc_b": accuracy(base, tasks.b_test),
            "loss_a": mean_loss(base, tasks.a_test),
        })

        wanted = [m for m in methods if m in EXACT_METHODS]
        # the Gauss-Newton matrix also serves as the quadratic model reported for every run
        spectra = {m: exact_spectrum(m, base, tasks.a_train) for m in {*wanted, "gauss-newton"}}
        context = {"seed": seed, "tasks": tasks, "base": base, "gauss_newton": spectra["gauss-newton"],
                   "base_loss": mean_loss(base, tasks.a_train)}

        for lr in args.lrs:
            if "none" in methods:
                model = copy.deepcopy(base)
                finetune(model, tasks.b_train, args.steps, lr)
                records.append(evaluate(model, context, "none", None, 1.0, lr))
            for gamma in args.gammas:
                for method in methods:
                    model = copy.deepcopy(base)
                    torch.manual_seed(1000 * seed + 17)  # MC label draws are reproducible
                    if method in LIBRARY_METHODS:
                        projector = library_projector(method, model, tasks.a_train, gamma)
                        kept = projector.kept_fraction()[EDITED]
                        finetune(model, tasks.b_train, args.steps, lr, projector=projector)
                    elif method in spectra:
                        kept = float(spectra[method].kept(gamma).double().mean())
                        finetune(model, tasks.b_train, args.steps, lr, project_fn=spectra[method].projector(gamma))
                    else:
                        continue
                    records.append(evaluate(model, context, method, gamma, kept, lr))
    return {
        "description": "digits 0-4 (task A) pretrained, middle layer fine-tuned on digits 5-9 (task B) "
        "with projected full-batch SGD; accuracies are 10-way on held-out test images",
        "command": "python benchmarks/control/run.py" + (" --quick" if args.quick else ""),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "pretrained": pretrained_acc,
        "runs": records,
        "mean_over_seeds": _means(records),
    }


def evaluate(model: nn.Module, context: dict, method: str, gamma: float | None, kept: float, lr: float) -> dict:
    tasks, base = context["tasks"], context["base"]
    delta = layer_matrix(model.get_submodule(EDITED)) - layer_matrix(base.get_submodule(EDITED))
    return {
        "seed": context["seed"], "lr": lr, "method": method, "gamma": gamma, "kept_fraction": kept,
        "acc_a": accuracy(model, tasks.a_test), "acc_b": accuracy(model, tasks.b_test),
        "loss_a": mean_loss(model, tasks.a_test), "loss_b": mean_loss(model, tasks.b_test),
        # the local quadratic (Gauss-Newton) model of task A's training loss against the truth
        "loss_a_train_increase": mean_loss(model, tasks.a_train) - context["base_loss"],
        "gn_predicted_increase": context["gauss_newton"].quadratic(delta),
        "delta_norm": float(delta.norm()),
    }


def _means(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["lr"], r["method"], r["gamma"]), []).append(r)
    out = []
    for (lr, method, gamma), rs in groups.items():
        out.append({
            "lr": lr, "method": method, "gamma": gamma, "seeds": len(rs),
            **{k: sum(r[k] for r in rs) / len(rs) for k in MEAN_KEYS},
        })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, two gammas, few steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--gammas", type=float, nargs="+", default=FULL_GAMMAS)
    parser.add_argument("--methods", nargs="+",
                        default=["none", *LIBRARY_METHODS, *EXACT_METHODS])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.5],
                        help="SGD learning rates: small steps (the quadratic model holds) and large ones")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.gammas, args.lrs, args.steps, args.pretrain_steps, args.hidden = 1, [0.99], [0.5], 20, 60, 16
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_plot:
        from plot import plot_results

        plot_results(results, args.out / "control.png")
    for row in sorted(results["mean_over_seeds"], key=lambda r: (r["lr"], r["method"], r["gamma"] or 0)):
        print(f"lr={row['lr']} {row['method']:>13} gamma={row['gamma']}: acc_A={row['acc_a']:.3f} "
              f"acc_B={row['acc_b']:.3f} loss_A={row['loss_a']:.3f} loss_B={row['loss_b']:.3f} "
              f"kept={row['kept_fraction']:.3f} ΔL_A(train)={row['loss_a_train_increase']:.3f} "
              f"GN-quadratic={row['gn_predicted_increase']:.3f}")
    print(f"{results['seconds']} s; wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
