"""Per-layer numbers of the projection plan on a projector's real spectra, at any ``γ``.

For each layer and threshold: ``r`` (output directions with a blocked entry), ``J(0)`` (the most
input directions one output direction blocks), the blocked fraction, the plan's path and its FLOPs
against the full path's ``4·d_out·d_in·(d_out + d_in)``, and the bytes the layer would keep with
``basis_storage="blocked"`` and offloaded sums against the full bases' ``4·(d_in² + d_out²)``. The
masks at other thresholds come from the stored eigenvalues (K-FAC, activation-only) or from
EK-FAC's corrected curvature, so no eigendecomposition is repeated. :func:`plan_report` reads a
projector's layers; :func:`spectrum_plan_rows` needs only a layer's spectra (or corrected
curvature), as ``torch-crisp inspect`` reads them from a saved folder; :func:`format_plan_report`
prints either as a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from . import curvature as curvature_models
from . import functional
from .config import Projection
from .plan import ProjectionPlan, plan_projection
from .state import LayerState

__all__ = ["PlanRow", "format_plan_report", "mask_at", "plan_report", "plan_row", "spectrum_plan_rows"]


@dataclass(frozen=True)
class PlanRow:
    """The plan of one layer at one ``γ`` (``None``: the basis' own threshold)."""

    layer: str
    gamma: float | None
    d_out: int
    d_in: int
    path: str
    by_columns: bool | None  # complement path banded over input directions (None: full path)
    blocked_rows: int  # r
    max_blocked_per_row: int  # J(0)
    blocked_columns: int
    blocked_fraction: float
    bands: int
    flop_ratio: float  # chosen path / full path (FLOPs)
    complement_ratio: float  # complement path / full path (FLOPs), chosen or not
    relative_time: float  # estimated time of the chosen path / the full path's (what "auto" minimises)
    resident_ratio: float  # basis_storage="blocked", sums offloaded: bytes / 4·(d_in² + d_out²)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_at(eig_out: Tensor, eig_in: Tensor, gamma: float, curvature: str = "kfac",
            corrected: Tensor | None = None) -> Tensor:
    """The kept mask at ``gamma`` of a curvature model: ``"kfac"`` from the eigenvalues, ``"activations"``
    from ``λ_in`` alone, ``"ekfac"`` from the corrected curvature ``corrected`` (K-FAC's without it)."""
    if curvature == "ekfac" and corrected is not None:
        return curvature_models.corrected_mask(corrected, gamma)[0]
    if curvature == "activations":
        return curvature_models.activation_mask(eig_in, eig_out.numel(), gamma)[0]
    return functional.low_curvature_mask(eig_out, eig_in, gamma)


def _stored_bytes(plan: ProjectionPlan) -> int:
    """Bytes a layer keeps for this plan with ``basis_storage="blocked"`` (no sums: offloaded)."""
    d_out, d_in = plan.shape
    eigenvalues = 4 * (d_out + d_in)
    full = 4 * (d_out * d_out + d_in * d_in) + d_out * d_in
    if plan.path == "full":
        return full + eigenvalues
    plan_tensors = sum(t.numel() * t.element_size() for t in plan.tensors().values())
    return eigenvalues + min(full, 4 * plan.reduced_floats() + plan_tensors)  # as Basis.stored chooses


def plan_row(layer: str, plan: ProjectionPlan, gamma: float | None) -> PlanRow:
    """The numbers of one plan as a :class:`PlanRow`."""
    d_out, d_in = plan.shape
    banding = plan.banding
    return PlanRow(
        layer=layer, gamma=gamma, d_out=d_out, d_in=d_in, path=plan.path,
        by_columns=None if banding is None else banding.by_columns,
        blocked_rows=plan.blocked_rows, max_blocked_per_row=plan.max_blocked_per_row,
        blocked_columns=plan.blocked_columns, blocked_fraction=plan.blocked_fraction,
        bands=0 if banding is None else len(banding.bands), flop_ratio=plan.flop_ratio,
        complement_ratio=plan.complement_flops / plan.full_flops, relative_time=plan.relative_time,
        resident_ratio=_stored_bytes(plan) / (4 * (d_out * d_out + d_in * d_in)),
    )


def spectrum_plan_rows(
    layer: str, eig_out: Tensor, eig_in: Tensor, gammas: Sequence[float], curvature: str = "kfac",
    corrected: Tensor | None = None, projection: Projection = "auto",
) -> list[PlanRow]:
    """Model-free: the rows of one layer from its spectra (ascending) or EK-FAC's corrected curvature,
    as ``torch-crisp inspect`` has them from a saved folder."""
    return [plan_row(layer, plan_projection(mask_at(eig_out, eig_in, g, curvature, corrected), projection), g)
            for g in gammas]


def plan_report(
    layers: Mapping[str, LayerState], gammas: Sequence[float | None] = (None,), projection: Projection = "auto"
) -> list[PlanRow]:
    """One :class:`PlanRow` per layer and ``γ`` in ``gammas`` (``None``: the layer's current mask).

    Layers need a basis; a :class:`~torch_crisp.basis.BlockedBasis` reports its stored plan at
    ``None`` and recomputes masks from its eigenvalues at other ``γ`` (K-FAC and activation-only).
    """
    rows = []
    for name, state in layers.items():
        basis = state.require_basis()
        has_correction = state.correction_sum is not None and state.example_count
        corrected = state.corrected_curvature() if basis.curvature == "ekfac" and has_correction else None
        for gamma in gammas:
            if gamma is None:
                rows.append(plan_row(name, basis.plan(projection), None))
            else:
                mask = mask_at(basis.eig_out, basis.eig_in, gamma, basis.curvature, corrected)
                rows.append(plan_row(name, plan_projection(mask, projection), gamma))
    return rows


def format_plan_report(rows: Sequence[PlanRow]) -> str:
    """The rows as a text table (one line per layer and ``γ``)."""
    header = (f"{'layer':<36} {'gamma':>6} {'d_out×d_in':>11} {'r':>5} {'J(0)':>5} {'blocked':>8} {'path':>10} "
              f"{'FLOPs':>6} {'compl.':>6} {'resident':>8}")
    lines = [header]
    for row in rows:
        gamma = "basis" if row.gamma is None else f"{row.gamma:g}"
        path = row.path if row.by_columns is None else f"{row.path[:4]}/{'col' if row.by_columns else 'row'}"
        shape = f"{row.d_out}×{row.d_in}"
        lines.append(
            f"{row.layer[-36:]:<36} {gamma:>6} {shape:>11} {row.blocked_rows:>5} {row.max_blocked_per_row:>5} "
            f"{row.blocked_fraction:>8.2%} {path:>10} {row.flop_ratio:>6.3f} {row.complement_ratio:>6.3f} "
            f"{row.resident_ratio:>8.3f}"
        )
    lines.append("FLOPs, compl.: FLOPs / 4·d_out·d_in·(d_out + d_in) of the chosen and the complement path; "
                 "resident: bytes with basis_storage='blocked' and offloaded sums / 4·(d_in² + d_out²)")
    return "\n".join(lines)
