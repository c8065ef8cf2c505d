"""Curvature models compared in the controlled experiment, each as a projection of the edited
layer's gradient ``[∂W | ∂b]``.

* ``activations``, ``kfac``, ``kfac-mc``, ``ekfac``, ``ekfac-mc``: torch_crisp's
  ``CrispProjector`` with the matching ``CrispConfig`` (the code path users run).
* ``gauss-newton``: the exact layer-wise Gauss-Newton matrix from ``torch.func``
  (``torch_crisp.curvature.layer_gauss_newton``), energy rule on its eigenvalues.
* ``hessian``: the exact layer-wise Hessian of the task-A loss; it is indefinite away from a
  minimum, so the energy rule runs on ``|eigenvalue|``.
* ``none``: plain fine-tuning of the same layer (no projection).

All curvature is computed on the task-A training set, normalised per example (``1/N``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from task import EDITED, Split
from torch import Tensor, nn

from torch_crisp import CrispConfig, CrispProjector, functional
from torch_crisp import curvature as curvature_models

LIBRARY_METHODS: dict[str, dict[str, str]] = {
    "activations": {"curvature": "activations", "fisher": "empirical"},
    "kfac": {"curvature": "kfac", "fisher": "empirical"},
    "kfac-mc": {"curvature": "kfac", "fisher": "mc"},
    "ekfac": {"curvature": "ekfac", "fisher": "empirical"},
    "ekfac-mc": {"curvature": "ekfac", "fisher": "mc"},
}
EXACT_METHODS = ("gauss-newton", "hessian")

# project_fn(Q) maps a (d_out, d_in + 1) gradient matrix to its projection
ProjectFn = Callable[[Tensor], Tensor]


def _batches(split: Split, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    return [(split.x[i : i + size], split.y[i : i + size]) for i in range(0, len(split.y), size)]


def layer_matrix(layer: nn.Linear) -> Tensor:
    return torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()


def _output_fn(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    def output(weight: Tensor) -> Tensor:
        params = {f"{EDITED}.weight": weight[:, :-1], f"{EDITED}.bias": weight[:, -1]}
        return torch.func.functional_call(model, params, (x,))

    return output


class ExactSpectrum:
    """Eigendecomposition of an explicit layer curvature matrix, reused across ``gamma``."""

    def __init__(self, matrix: Tensor, shape: tuple[int, int]) -> None:
        self.eigenvalues, self.vectors = torch.linalg.eigh(0.5 * (matrix + matrix.mT))
        self.magnitude = self.eigenvalues.abs()  # Hessian: negative curvature counts as curvature too
        self.shape = shape

    def quadratic(self, delta: Tensor) -> float:
        """``½ vec(Δ)ᵀ M vec(Δ)``: the quadratic model's prediction of the loss change for a step ``Δ``."""
        coordinates = self.vectors.mT @ delta.reshape(-1).to(self.vectors)
        return 0.5 * float((self.eigenvalues * coordinates.square()).sum())

    def kept(self, gamma: float) -> Tensor:
        """Boolean mask of the eigen-directions the energy rule keeps (``|μ| < τ``)."""
        return self.magnitude < functional.threshold_from_curvature(self.magnitude, gamma)

    def projector(self, gamma: float) -> ProjectFn:
        kept = self.vectors[:, self.kept(gamma)]
        return lambda Q: (kept @ (kept.mT @ Q.reshape(-1))).reshape(self.shape)


def exact_spectrum(method: str, model: nn.Module, capability: Split) -> ExactSpectrum:
    layer = model.get_submodule(EDITED)
    weight = layer_matrix(layer)
    output_fn = _output_fn(model, capability.x)
    n = len(capability.y)
    if method == "gauss-newton":
        with torch.no_grad():
            logits = model(capability.x)
        hessians = curvature_models.cross_entropy_output_hessians(logits)
        matrix = curvature_models.layer_gauss_newton(output_fn, weight, hessians, n)
    elif method == "hessian":
        def loss(w: Tensor) -> Tensor:
            return nn.functional.cross_entropy(output_fn(w), capability.y, reduction="sum") / n

        matrix = torch.func.hessian(loss)(weight).reshape(weight.numel(), weight.numel())
    else:
        raise ValueError(f"unknown exact method {method!r}")
    return ExactSpectrum(matrix.detach(), tuple(weight.shape))


def library_projector(method: str, model: nn.Module, capability: Split, gamma: float) -> CrispProjector:
    options = LIBRARY_METHODS[method]
    config = CrispConfig(target_modules=[EDITED], gamma=gamma, factor_dtype="float64", **options)
    projector = CrispProjector(model, config)
    batches = _batches(capability)
    if options["fisher"] == "mc":
        projector.collect(batches, logits_fn=lambda m, b: m(b[0]), progress=False)
    else:
        projector.collect(
            batches, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"),
            progress=False,
        )
    return projector
