"""How far from the pretrained weights does the quadratic model of task A's loss hold?

    python benchmarks/control/quadratic_check.py

Pretrains seed 0 as run.py does, then moves the edited layer by ε·D along one random direction D
and compares the measured change of task A's mean training loss with the second-order model
``gᵀΔ + ½ ΔᵀGΔ`` (``G`` the exact layer Gauss-Newton matrix). Prints one line per ε.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import exact_spectrum, layer_matrix  # noqa: E402
from task import EDITED, load_tasks, make_mlp, mean_loss, pretrain  # noqa: E402


def main() -> None:
    tasks = load_tasks(0)
    base = make_mlp(32, 0)
    pretrain(base, tasks.a_train, 300)
    gauss_newton = exact_spectrum("gauss-newton", base, tasks.a_train)
    loss0 = mean_loss(base, tasks.a_train)
    layer = base.get_submodule(EDITED)
    base.zero_grad()
    nn.functional.cross_entropy(base(tasks.a_train.x), tasks.a_train.y).backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    torch.manual_seed(0)
    direction = torch.randn_like(grad)
    print(f"task A training loss at the pretrained weights: {loss0:.2e}")
    for eps in (1e-3, 1e-2, 1e-1, 1.0):
        moved = copy.deepcopy(base)
        with torch.no_grad():
            edited = moved.get_submodule(EDITED)
            edited.weight += eps * direction[:, :-1]
            edited.bias += eps * direction[:, -1]
        delta = layer_matrix(edited) - layer_matrix(layer)
        predicted = float((grad * delta).sum()) + gauss_newton.quadratic(delta)
        measured = mean_loss(moved, tasks.a_train) - loss0
        print(f"|Δ| = {float(delta.norm()):7.3f}: predicted {predicted:.2e}, measured {measured:.2e}")


if __name__ == "__main__":
    main()
