"""Sources of real and model spectra for the projection-plan benchmarks (nothing is downloaded).

* :func:`power_law_basis`: ``λ_k = k^-exponent`` on both sides, random orthonormal bases, the K-FAC
  mask at ``γ`` (a stand-in for trained spectra at LLM shapes);
* :func:`demo_projector`: every linear layer of ``torch-crisp demo``'s pretrained tiny Llama,
  collected on the demo's capability corpus as the demo collects (its softmax temperature);
* :func:`control_projector`: the three layers of the controlled experiment's MLP
  (``benchmarks/control``, seed 0) pretrained on task A, collected on task A.

Smoke mode swaps the demo model for a random tiny Llama and shortens the control's pretraining.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import benchmark_llama, lm_batches  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector, functional  # noqa: E402
from torch_crisp.basis import Basis  # noqa: E402

DEMO_TEMPERATURE = 3.0  # DemoSettings.capability_temperature


def orthonormal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q.contiguous()


def power_law(d: int, exponent: float) -> torch.Tensor:
    """``k^-exponent`` for ``k = 1..d``, ascending (the order ``eigh`` returns)."""
    return torch.arange(1, d + 1, dtype=torch.float32).pow(-exponent).flip(0)


def power_law_basis(d_out: int, d_in: int, gamma: float, exponent: float = 1.5, seed: int = 0) -> Basis:
    """A :class:`Basis` with power-law eigenvalues on both sides and random orthonormal eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    eig_out, eig_in = power_law(d_out, exponent), power_law(d_in, exponent)
    tau = functional.energy_threshold(eig_out, eig_in, gamma)
    return Basis(eig_in=eig_in, U_in=orthonormal(d_in, g), eig_out=eig_out, U_out=orthonormal(d_out, g),
                 mask=functional.kept_below(eig_out, eig_in, tau), tau=tau)


def demo_projector(cache_dir: str | None, pretrain: bool, smoke: bool) -> tuple[CrispProjector, str] | None:
    """All-linear projector of the demo's base model (``None`` if it is not cached and ``pretrain`` is off)."""
    if smoke:
        model = benchmark_llama(hidden=32, intermediate=96, layers=2, vocab=64)
        projector = CrispProjector(model, CrispConfig(target_modules="all-linear", gamma=0.995))
        projector.collect(lm_batches(2, 2, 16, 64), progress=False)
        return projector, "random tiny Llama (smoke)"
    from torch_crisp.editing.demo import DemoSettings, build_world
    from torch_crisp.editing.demo.compare import _capability_batches, tempered_lm_loss
    from torch_crisp.editing.demo.pretrain import cache_path, is_cached, load_or_pretrain

    settings = DemoSettings(cache_dir=cache_dir, progress=False)
    world_spec, model_spec, train_spec = settings.resolved_specs()
    world = build_world(world_spec)
    path = cache_path(world, model_spec, train_spec, cache_dir)
    if not is_cached(path) and not pretrain:
        print(f"demo base model not cached at {path}: skipped (pass --pretrain-demo to pretrain it, ~7 min)")
        return None
    base = load_or_pretrain(world, model_spec, train_spec, cache_dir=cache_dir, progress=False)
    projector = CrispProjector(base.model, CrispConfig(target_modules="all-linear", gamma=0.995))
    projector.collect(_capability_batches(world, base.tokenizer), loss_fn=tempered_lm_loss(DEMO_TEMPERATURE),
                      progress=False)
    return projector, f"demo base model {path.name} ({base.record.get('steps')} pretraining steps)"


def control_projector(smoke: bool) -> tuple[CrispProjector, str]:
    """All three linear layers of the control MLP (seed 0, hidden 32, 300 pretraining steps), K-FAC."""
    sys.path.insert(0, str(HERE / "control"))
    from task import load_tasks, make_mlp, pretrain

    tasks = load_tasks(0)
    model = make_mlp(32, 0)
    steps = 30 if smoke else 300
    pretrain(model, tasks.a_train, steps)
    projector = CrispProjector(model, CrispConfig(target_modules="all-linear", gamma=0.995, factor_dtype="float64"))
    x, y = tasks.a_train.x, tasks.a_train.y
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    projector.collect(batches, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"),
                      progress=False)
    return projector, f"control MLP 64-32-32-10, seed 0, {steps} pretraining steps on task A"
