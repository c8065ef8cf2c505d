"""The projection plan of one layer: which exact path computes ``P(Q)`` most cheaply, and what it needs.

``P(Q) = U_out ((U_outᵀ Q U_in) ⊙ M) U_inᵀ`` has two exact forms (equal up to float rounding):

* **full** (:func:`~torch_crisp.functional.project`): rotate into the whole eigenbasis, mask,
  rotate back, ``4·d_out·d_in·(d_out + d_in)`` FLOPs whatever the mask;
* **complement** (:func:`~torch_crisp.functional.project_complement`): ``Q`` minus its blocked
  part, rotating only the blocked directions.

K-FAC's blocked set ``{c_ij ≥ τ}``, ``c_ij = λ_out_i λ_in_j``, is a staircase: output direction
``i`` blocks the ``J(i)`` input directions of largest ``λ_in``, ``J`` growing with ``λ_out``. The
bases store eigenvalues **ascending** (as ``torch.linalg.eigh`` returns them), so in the mask's
order the blocked rows are the last ``r`` rows and row ``i`` blocks its last ``J(i)`` columns.
Banding the ``r`` blocked rows by ``J`` costs ``4·d_in·(r·d_out + Σ_b |R_b|·|C_b|)`` FLOPs, about
``(r + f·d_in) / (d_out + d_in)`` of the full path for a blocked fraction ``f`` (0.13 for a 512×2048
power-law layer at ``γ = 0.9``; nothing saved on flat spectra).

:func:`plan_projection` works from the mask alone, so any mask is handled (EK-FAC's are not
staircases: a band's columns are the union of its rows' blocked columns). It groups one side's
blocked directions into bands, for rows and for columns, and counts FLOPs, each product's weighted
by how fast a product of its shape runs (thin ones run far below the peak rate, see
:func:`product_cost`) plus a fixed cost per call: ``projection="auto"`` takes the cheapest of full,
complement by rows and complement by columns. Rows that block every
column form a band that needs no column eigenvectors at all (``U_in U_inᵀ = I``); an
activation-only mask is such a band over input directions: ``P(Q) = Q − Q U_C U_Cᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from . import functional
from .config import PROJECTIONS, Projection, check_choice

__all__ = ["Band", "Banding", "ProjectionPlan", "full_flops", "plan_projection"]

# Rows are grouped by their blocked count in geometric buckets of this ratio (in a staircase a
# bucket's union is its largest row, so a bucket computes at most 25 % more than its blocked area);
# adjacent buckets are then merged where one call costs less than two (see _merge_buckets).
_BUCKET_RATIO = 1.25
# What one call sequence costs beyond its FLOPs, in FLOPs at the device's matmul rate: the full
# path pays it once, the complement path once plus once per band (a slice, two products, a mask, a
# copy). Measured on one CPU core (~100 GFLOP/s): a 16×16 projection takes 15 µs on the full path
# and 20 µs on a one-band complement, so 20 µs (2 MFLOP) is charged per call sequence and per band;
# on a GPU, ~5 kernel launches of ~5 µs at ~50 TFLOP/s (not measured). It decides near-ties and
# keeps tiny layers (where the saving is a few µs) on the full path.
_CALL_OVERHEAD_FLOPS = {"cpu": 2e6}
_CALL_OVERHEAD_FLOPS_ACCELERATOR = 1e9
# Thin products run far below the peak rate. Fitted to 432 float32 products (a×k)@(k×b) with
# a, k, b in {3, 8, 19, 48, 128, 512}, plain and transposed a, on one CPU core: the rate scales as
# min(1, a/64)^0.7 · min(1, k/64)^0.7 · min(1, b/64)^1.0 (b: the result's contiguous dimension;
# median error of the fit ×1.35). GPU tiles are 64-128 wide: the same shape is assumed, unmeasured.
_FULL_RATE_DIMENSION = 64
_THIN_RATE_EXPONENTS = (0.7, 0.7, 1.0)


def full_flops(d_out: int, d_in: int) -> float:
    """FLOPs of the full path, ``4·d_out·d_in·(d_out + d_in)`` (four dense products)."""
    return 4.0 * d_out * d_in * (d_out + d_in)


def product_cost(a: int, k: int, b: int) -> float:
    """The time of an ``(a × k) @ (k × b)`` product in FLOPs at the peak rate: ``2·a·k·b`` over the
    relative rate ``min(1, a/64)^0.7 · min(1, k/64)^0.7 · min(1, b/64)`` of a product of that shape."""
    if min(a, k, b) == 0:
        return 0.0
    rate = 1.0
    for size, exponent in zip((a, k, b), _THIN_RATE_EXPONENTS):
        rate *= min(1.0, size / _FULL_RATE_DIMENSION) ** exponent
    return 2.0 * a * k * b / rate


def _full_cost(d_out: int, d_in: int) -> float:
    # U_outᵀ Q, then · U_in; U_out ·, then · U_inᵀ
    return 2.0 * (product_cost(d_out, d_out, d_in) + product_cost(d_out, d_in, d_in))


def _outer_cost(by_columns: bool, side: int, n_side: int, n_other: int) -> float:
    """Rotating ``side`` blocked directions out of ``Q`` and back (:func:`functional.project_complement`)."""
    if by_columns:  # Q U_C, then T U_Cᵀ
        return product_cost(n_other, n_side, side) + product_cost(n_other, side, n_side)
    return product_cost(side, n_side, n_other) + product_cost(n_side, side, n_other)  # U_Rᵀ Q, then U_R T


def _band_cost(by_columns: bool, side: int, other: int, n_other: int) -> float:
    """One band's two products: ``side`` blocked directions against their ``other`` union."""
    if by_columns:  # V^T T_b, then V X
        return product_cost(other, n_other, side) + product_cost(n_other, other, side)
    return product_cost(side, n_other, other) + product_cost(side, other, n_other)  # T_b V, then X V^T


def call_overhead_flops(device: torch.device) -> float:
    """The fixed cost of the full path, or of the complement path's setup and of each of its bands,
    on ``device``, in FLOPs."""
    return _CALL_OVERHEAD_FLOPS.get(device.type, _CALL_OVERHEAD_FLOPS_ACCELERATOR)


def _compact(indices: Tensor) -> slice | Tensor:
    """A slice when ``indices`` is a consecutive ascending range (a view instead of a gather), else the indices."""
    n = indices.numel()
    if n == 0:
        return slice(0, 0)
    first = int(indices[0].item())
    if int(indices[-1].item()) - first == n - 1 and bool((indices.diff() == 1).all()):
        return slice(first, first + n)
    return indices


def _length(index: slice | Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def _take(U: Tensor, index: slice | Tensor) -> Tensor:
    """Columns ``index`` of ``U`` (a view for a slice)."""
    return U[:, index]


def _move(index: slice | Tensor, device: torch.device) -> slice | Tensor:
    return index if isinstance(index, slice) else index.to(device)


@dataclass(frozen=True)
class Band:
    """Blocked directions of one side (``side``, positions in the banding's side list) with the union
    of their blocked directions on the other side (``other``, positions in its other list; ``None``:
    every direction there), and the blocked mask on that rectangle (``None``: all blocked)."""

    side: slice
    other: slice | Tensor | None
    blocked: Tensor | None

    def as_tuple(self) -> functional.Band:
        return (self.side, self.other, self.blocked)

    def to(self, device: torch.device) -> Band:
        other = None if self.other is None else _move(self.other, device)
        blocked = None if self.blocked is None else self.blocked.to(device)
        return Band(self.side, other, blocked)


@dataclass(frozen=True)
class Banding:
    """The complement path banded over one side: output directions, or input directions (``by_columns``).

    ``side`` indexes the banded side's eigenvectors of blocked directions (bands consecutive),
    ``other`` the other side's eigenvectors that non-spanning bands use; ``flops`` counts the path's
    FLOPs and ``cost`` its estimated time in FLOPs at the peak rate (:func:`product_cost`, overheads).
    """

    by_columns: bool
    side: slice | Tensor
    other: slice | Tensor
    bands: tuple[Band, ...]
    flops: float
    cost: float

    @property
    def side_count(self) -> int:
        return _length(self.side)

    @property
    def other_count(self) -> int:
        return _length(self.other) if any(b.other is not None for b in self.bands) else 0

    @cached_property
    def kernel_bands(self) -> tuple[functional.Band, ...]:
        """The bands as :func:`~torch_crisp.functional.project_complement` takes them (built once)."""
        return tuple(band.as_tuple() for band in self.bands)

    def to(self, device: torch.device) -> Banding:
        return replace(self, side=_move(self.side, device), other=_move(self.other, device),
                       bands=tuple(b.to(device) for b in self.bands))


@dataclass(frozen=True)
class ProjectionPlan:
    """How one layer projects, with the numbers behind the choice.

    Attributes:
        shape: ``(d_out, d_in)`` of ``[W | b]``.
        path: ``"full"`` or ``"complement"``.
        banding: the complement path's bands (``None`` on the full path).
        full_flops: ``4·d_out·d_in·(d_out + d_in)``.
        complement_flops: FLOPs of the cheaper complement orientation (also when the full path won).
        relative_time: estimated time of the chosen path / the full path's (what ``"auto"`` minimises).
        blocked_count: blocked directions (``M_ij`` false).
        blocked_rows: ``r``, output directions with a blocked entry.
        blocked_columns: input directions with a blocked entry.
        max_blocked_per_row: ``J(0)``, the most input directions one output direction blocks.
    """

    shape: tuple[int, int]
    path: Literal["full", "complement"]
    banding: Banding | None
    full_flops: float
    complement_flops: float
    relative_time: float
    blocked_count: int
    blocked_rows: int
    blocked_columns: int
    max_blocked_per_row: int

    @property
    def flops(self) -> float:
        """FLOPs of one projection on the chosen path."""
        return self.full_flops if self.path == "full" else self.complement_flops

    @property
    def flop_ratio(self) -> float:
        """FLOPs of the chosen path / the full path's."""
        return self.flops / self.full_flops

    @property
    def blocked_fraction(self) -> float:
        return self.blocked_count / (self.shape[0] * self.shape[1])

    def estimated_cost(self, device: torch.device) -> float:
        """Estimated time of one projection on the chosen path, in FLOPs at the peak rate (what ``"auto"`` compares)."""
        return self.relative_time * (_full_cost(*self.shape) + call_overhead_flops(device))

    def vectors(self, U_out: Tensor, U_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(U_side, U_other)``: the eigenvectors the complement path multiplies with (views where ranges)."""
        banding = self._require_banding()
        side_U, other_U = (U_in, U_out) if banding.by_columns else (U_out, U_in)
        other = _take(other_U, banding.other) if banding.other_count else None
        return _take(side_U, banding.side), other

    def apply(self, Q: Tensor, U_out: Tensor, U_in: Tensor, mask: Tensor) -> Tensor:
        """``P(Q)`` on the chosen path from the full bases and mask."""
        if self.path == "full":
            return functional.project(Q, U_out, U_in, mask)
        return self.apply_reduced(Q, *self.vectors(U_out, U_in))

    def apply_reduced(self, Q: Tensor, U_side: Tensor, U_other: Tensor | None) -> Tensor:
        """``P(Q)`` on the complement path from the eigenvectors of :meth:`vectors` alone."""
        if Q.shape[-2:] != self.shape:
            raise ValueError(f"cannot project a matrix of shape {tuple(Q.shape)} with a plan for {self.shape}")
        banding = self._require_banding()
        return functional.project_complement(Q, U_side, U_other, banding.kernel_bands, by_columns=banding.by_columns)

    def reduced_floats(self) -> int:
        """Eigenvector entries the complement path needs (``r·d_out + J·d_in`` for a staircase by rows);
        ``d_out² + d_in²`` on the full path."""
        d_out, d_in = self.shape
        if self.banding is None:
            return d_out * d_out + d_in * d_in
        d_side, d_other = (d_in, d_out) if self.banding.by_columns else (d_out, d_in)
        return self.banding.side_count * d_side + self.banding.other_count * d_other

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the plan holds (band masks, gathered index lists), for memory accounting."""
        held: dict[str, Tensor] = {}
        if self.banding is None:
            return held
        for key, index in (("side", self.banding.side), ("other", self.banding.other)):
            if isinstance(index, Tensor):
                held[f"plan.{key}"] = index
        for i, band in enumerate(self.banding.bands):
            if band.blocked is not None:
                held[f"plan.band{i}.blocked"] = band.blocked
            if isinstance(band.other, Tensor):
                held[f"plan.band{i}.other"] = band.other
        return held

    def to(self, device: torch.device | str) -> ProjectionPlan:
        device = torch.device(device)
        return self if self.banding is None else replace(self, banding=self.banding.to(device))

    def _require_banding(self) -> Banding:
        if self.banding is None:
            raise ValueError("this plan takes the full path; it has no complement bands")
        return self.banding


def plan_projection(mask: Tensor, projection: Projection = "auto") -> ProjectionPlan:
    """Plan the projection of a ``(d_out, d_in)`` kept mask (True = kept) in the bases' order.

    ``projection="auto"`` takes whichever of the full path and the complement path (banded over
    output or over input directions, the cheaper) has the lower estimated time: FLOPs weighted by
    the rate of each product's shape (:func:`product_cost`) plus per-call overheads
    (:func:`call_overhead_flops`); ``"full"`` and ``"complement"`` force the path. Exact for any mask.
    """
    check_choice("projection", projection, PROJECTIONS)
    if mask.dim() != 2:
        raise ValueError(f"expected a (d_out, d_in) mask, got shape {tuple(mask.shape)}")
    blocked = ~mask if mask.dtype == torch.bool else mask == 0
    d_out, d_in = blocked.shape
    overhead = call_overhead_flops(blocked.device)
    per_row = blocked.sum(dim=1)
    candidates = [_banding(blocked, False, d_out, d_in, overhead), _banding(blocked.mT, True, d_out, d_in, overhead)]

    best = min(candidates, key=lambda banding: banding.cost)
    full = _full_cost(d_out, d_in) + overhead
    if projection == "full":
        path = "full"
    elif projection == "complement":
        path = "complement"
    else:  # a tie goes to the full path: the reference implementation
        path = "full" if full <= best.cost else "complement"
    return ProjectionPlan(
        shape=(d_out, d_in), path=path, banding=best if path == "complement" else None,
        full_flops=full_flops(d_out, d_in), complement_flops=best.flops,
        relative_time=1.0 if path == "full" else best.cost / full, blocked_count=int(per_row.sum().item()),
        blocked_rows=int((per_row > 0).sum().item()), blocked_columns=int(blocked.any(dim=0).sum().item()),
        max_blocked_per_row=int(per_row.max().item()),
    )


def _banding(blocked: Tensor, by_columns: bool, d_out: int, d_in: int, overhead: float) -> Banding:
    """Band the rows of ``blocked`` (``(n_side, n_other)``: rows are the banded side's directions)."""
    n_side, n_other = blocked.shape
    counts = blocked.sum(dim=1)
    rows = torch.nonzero(counts).flatten()
    spanning = rows[counts[rows] == n_other]  # block every direction of the other side
    partial = rows[counts[rows] < n_other]
    order = torch.sort(counts[partial], stable=True).indices  # ascending count (a staircase: ascending index)
    partial = partial[order]
    groups: list[tuple[Tensor, Tensor]] = []  # (rows, union of their blocked columns)
    if partial.numel():
        keys = torch.floor(torch.log(counts[partial].double()) / math.log(_BUCKET_RATIO)).long()
        sizes = torch.unique_consecutive(keys, return_counts=True)[1].tolist()
        buckets = list(torch.split(partial, sizes))
        unions = torch.stack([blocked[b].any(dim=0) for b in buckets])
        for start, stop in _merge_buckets(sizes, unions, by_columns, overhead):
            groups.append((torch.cat(buckets[start:stop]), unions[start:stop].any(dim=0)))
    used = torch.zeros(n_other, dtype=torch.bool, device=blocked.device)
    for _, union in groups:
        used |= union
    other = torch.nonzero(used).flatten()
    position = torch.cumsum(used.long(), 0) - 1  # column -> its position in `other`
    bands, side_parts, start, inner, inner_cost = [], [], 0, 0.0, 0.0
    for group_rows, union in groups:
        columns = torch.nonzero(union).flatten()
        rectangle = blocked[group_rows][:, columns]
        side = slice(start, start + group_rows.numel())
        bands.append(Band(side, _compact(position[columns]), None if bool(rectangle.all()) else rectangle))
        side_parts.append(group_rows)
        start += group_rows.numel()
        inner += 4.0 * n_other * group_rows.numel() * columns.numel()
        inner_cost += _band_cost(by_columns, group_rows.numel(), columns.numel(), n_other) + overhead
    if spanning.numel():
        bands.append(Band(slice(start, start + spanning.numel()), None, None))
        side_parts.append(spanning)
    side = torch.cat(side_parts) if side_parts else rows[:0]
    flops = 4.0 * side.numel() * d_out * d_in + inner
    cost = _outer_cost(by_columns, side.numel(), n_side, n_other) + inner_cost + overhead if bands else 0.0
    return Banding(by_columns, _compact(side), _compact(other), tuple(bands), flops, cost)


def _merge_buckets(sizes: list[int], unions: Tensor, by_columns: bool, overhead: float) -> list[tuple[int, int]]:
    """Partition consecutive buckets into groups minimising the bands' estimated time: per group, its
    two products (:func:`_band_cost`) plus ``overhead``.

    Dynamic programming over the ``K`` buckets (``K ≤ log_{1.25} n_other + 1``, 44 at 14336); the
    union size of every range of buckets comes from a running maximum (logical or) down the stack.
    """
    K, n_other = len(sizes), unions.shape[1]
    flags = unions.to(torch.uint8)
    width = torch.zeros(K, K, dtype=torch.float64)
    for a in range(K):
        width[a, a:] = flags[a:].cummax(dim=0).values.sum(dim=1).double().cpu()
    width_list = [[int(w) for w in row] for row in width.tolist()]
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    best = [0.0] + [math.inf] * K
    cut = [0] * (K + 1)
    for b in range(1, K + 1):
        for a in range(1, b + 1):
            rows = prefix[b] - prefix[a - 1]
            cost = best[a - 1] + _band_cost(by_columns, rows, width_list[a - 1][b - 1], n_other) + overhead
            if cost < best[b]:
                best[b], cut[b] = cost, a - 1
    groups, b = [], K
    while b > 0:
        groups.append((cut[b], b))
        b = cut[b]
    return groups[::-1]
