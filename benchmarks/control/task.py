"""Task A / task B of the controlled experiment: scikit-learn's handwritten digits, split by class.

Task A (the capability to preserve) is digits 0–4, task B (the new skill) digits 5–9; the images
(8×8, 16 grey levels, 1 797 of them, shipped inside scikit-learn, nothing is downloaded) are
scaled to [0, 1]. One MLP with a shared 10-way head is pretrained on A; then a single hidden layer
is fine-tuned on B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Split:
    x: Tensor
    y: Tensor


@dataclass
class Tasks:
    a_train: Split
    a_test: Split
    b_train: Split
    b_test: Split


def load_tasks(seed: int, test_fraction: float = 0.3, dtype: torch.dtype = torch.float64) -> Tasks:
    """Stratified train/test split of the digits, then A = labels 0–4 and B = labels 5–9."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )

    def split(x, y, task_b: bool) -> Split:
        keep = (y >= 5) if task_b else (y < 5)
        return Split(torch.tensor(x[keep], dtype=dtype), torch.tensor(y[keep], dtype=torch.long))

    return Tasks(
        a_train=split(x_train, y_train, False), a_test=split(x_test, y_test, False),
        b_train=split(x_train, y_train, True), b_test=split(x_test, y_test, True),
    )


def make_mlp(hidden: int, seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """64 → hidden → hidden → 10 with tanh; module "2" (hidden → hidden) is the edited layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
    ).to(dtype)


EDITED = "2"


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """10-way accuracy: a task-A image must not be classified as any digit of task B, and vice versa."""
    return float((model(split.x).argmax(dim=-1) == split.y).double().mean())


@torch.no_grad()
def mean_loss(model: nn.Module, split: Split) -> float:
    """Mean cross-entropy (10-way) on a split: the quantity the curvature models approximate."""
    return float(nn.functional.cross_entropy(model(split.x), split.y))


def pretrain(model: nn.Module, split: Split, steps: int, lr: float = 1e-2) -> None:
    """Full-batch Adam on the mean cross-entropy of task A."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(split.x), split.y).backward()
        optimizer.step()
