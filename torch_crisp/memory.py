"""Know before you run: the memory a projector will hold, per layer and in total.

:func:`memory_report` works from module shapes alone (a model built on the ``meta`` device is
enough), so a user with an 8B model can see whether ``target_modules="all-linear"`` fits before
collecting anything; given a projector's layers after ``collect`` it reports what they hold
exactly. Counted, per layer, in bytes (``n = d_in`` with the bias column, ``m = d_out``, ``F`` the
factor dtype's size):

* **factor sums** ``F·(n² + m²)``, on the layer's device or, with ``offload_factors``, in CPU memory;
  EK-FAC adds its correction sums ``F·m·n``;
* **basis**: full storage ``4·(n² + m²)`` for ``U_in, U_out``, ``4·(n + m)`` eigenvalues and the
  boolean mask ``m·n``; ``basis_storage="blocked"``: the eigenvectors of the plan (``4·(r·m + J·n)``
  for a staircase, see :mod:`torch_crisp.plan`), the band masks and the eigenvalues. Before any data
  the plan is unknown: the report assumes ``blocked_rank_fraction`` ``ρ`` (``r = ρ·m``, ``J = ρ·n``)
  or, without one, the full storage as an upper bound;
* **anchors** ``W₀``: a float32 copy of ``[W | b]``, ``4·m·n``, in update mode or with a capability
  budget (:mod:`torch_crisp.constraint`);
* **transients**: the peak of computing one layer's basis beyond what stays (normalised factors,
  LAPACK ``syevd``'s ``2k²`` workspace, copies; cuSOLVER's workspace is of the same order), of one
  projection, and of the inputs a collection keeps from each layer's forward to its backward
  (``tokens · d_in · 4`` per batch, with ``tokens_per_batch``).

With ``world_size`` ranks and ``basis_placement="sharded"`` each rank holds the bases of the layers it
computes (the LPT assignment of :mod:`torch_crisp.sync`) plus the other layers' eigenvalues; the
report gives both that and the replicated figure, so it tells whether ``"auto"`` would shard.
The model itself, its gradients and the optimizer's state come on top and are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .basis import AnyBasis
from .config import CrispConfig, Mode
from .distributed import assign_greedy
from .layers import LinearGeometry, find_target_modules
from .plan import ProjectionPlan
from .state import LayerState

__all__ = ["LayerMemory", "MemoryReport", "basis_peak_bytes", "held_bytes", "memory_report", "projection_peak_bytes"]

_SORT_MAX_GRID = 1 << 17  # functional's threshold sorts grids up to this size, and searches above
_MASK_ROWS = 256  # functional.kept_below's float64 rows per chunk


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one projected layer holds (``*_bytes``) or needs for a moment (``*_peak_bytes``)."""

    name: str
    d_out: int
    d_in: int  # with the bias column
    factor_sums_bytes: int
    correction_sums_bytes: int
    basis_bytes: int  # eigenvectors, eigenvalues, mask or band masks, as stored
    anchor_bytes: int
    basis_peak_bytes: int  # computing this layer's basis: the most held at once beyond its sums and final basis
    projection_peak_bytes: int  # one projection of this layer's gradient
    saved_inputs_bytes: int  # one collection batch: the layer input kept until its backward
    exact_basis: bool  # basis_bytes measured from a stored basis (else from the shapes)
    sums_on_host: bool


@dataclass(frozen=True)
class MemoryReport:
    """Per-layer :class:`LayerMemory` and the totals of collection and training (bytes)."""

    layers: tuple[LayerMemory, ...]
    config: CrispConfig
    mode: Mode
    world_size: int = 1

    def _total(self, key: str, device_only: bool = False) -> int:
        return sum(getattr(layer, key) for layer in self.layers if not (device_only and layer.sums_on_host))

    @property
    def replicated_bases_bytes(self) -> int:
        """Bases every rank holds with ``basis_placement="replicated"``: all of them."""
        return self._total("basis_bytes")

    @property
    def sharded_bases_bytes(self) -> int:
        """Bases the fullest rank holds with ``basis_placement="sharded"``: its layers' bases (the same LPT
        assignment by ``d_in³ + d_out³`` as :mod:`torch_crisp.sync`) and the others' eigenvalues and numbers."""
        owners = assign_greedy([float(x.d_in) ** 3 + float(x.d_out) ** 3 for x in self.layers], self.world_size)
        numbers = [8 * (x.d_in + x.d_out + 3) for x in self.layers]  # a RemoteBasis: float32 λ, float64 scalars
        return max(
            sum(x.basis_bytes if owner == rank else small for x, owner, small in zip(self.layers, owners, numbers))
            for rank in range(self.world_size)
        )

    @property
    def bases_per_rank_bytes(self) -> int:
        """Bases one rank holds: sharded when ``config.basis_placement="sharded"`` over several ranks, else all
        (``"auto"`` shards only when the replicated bases would exceed half the free device memory)."""
        if self.config.basis_placement == "sharded" and self.world_size > 1:
            return self.sharded_bases_bytes
        return self.replicated_bases_bytes

    @property
    def sums_device_bytes(self) -> int:
        return self._total("factor_sums_bytes", True) + self._total("correction_sums_bytes", True)

    @property
    def host_bytes(self) -> int:
        """CPU memory of offloaded factor (and correction) sums."""
        return self._total("factor_sums_bytes") + self._total("correction_sums_bytes") - self.sums_device_bytes

    @property
    def collection_peak_bytes(self) -> int:
        """Device memory at the peak of ``collect``: during the data pass (sums, saved inputs, one offloaded
        product) or while the bases are computed (sums, every stored basis, one layer's transient)."""
        offload_product = max((max(x.d_in, x.d_out) ** 2 * 4 for x in self.layers if x.sums_on_host), default=0)
        data_pass = self.sums_device_bytes + self._total("saved_inputs_bytes") + offload_product
        bases = self.sums_device_bytes + self.bases_per_rank_bytes + max(
            (x.basis_peak_bytes for x in self.layers), default=0
        )
        return max(data_pass, bases)

    @property
    def training_bytes(self) -> int:
        """Device memory torch_crisp holds while training: bases, device sums, anchors, one projection."""
        held = self.sums_device_bytes + self.bases_per_rank_bytes + self._total("anchor_bytes")
        return held + max((x.projection_peak_bytes for x in self.layers), default=0)

    def format(self) -> str:
        """A table per layer and the totals, in MiB / GiB."""
        lines = [
            f"torch_crisp memory report: {len(self.layers)} layers, projection={self.config.projection!r}, "
            f"basis_storage={self.config.basis_storage!r}, offload_factors={self.config.offload_factors}, "
            f"mode={self.mode!r}, curvature={self.config.curvature!r}",
            f"{'layer':<44} {'d_out×d_in':>13} {'sums':>10} {'basis':>10} {'anchor':>10} {'eigh peak':>10}",
        ]
        for x in self.layers:
            basis = _size(x.basis_bytes) + ("" if x.exact_basis else "*")
            sums = _size(x.factor_sums_bytes + x.correction_sums_bytes) + ("h" if x.sums_on_host else "")
            shape = f"{x.d_out}×{x.d_in}"
            lines.append(
                f"{x.name[-44:]:<44} {shape:>13} {sums:>10} {basis:>10} {_size(x.anchor_bytes):>10} "
                f"{_size(x.basis_peak_bytes):>10}"
            )
        if self.world_size > 1:
            lines += [f"bases per rank over {self.world_size} ranks: replicated {_size(self.replicated_bases_bytes)}, "
                      f"sharded {_size(self.sharded_bases_bytes)} (basis_placement={self.config.basis_placement!r})"]
        lines += [
            f"collection peak (device): {_size(self.collection_peak_bytes)}",
            f"training (device):        {_size(self.training_bytes)}",
            f"host (offloaded sums):    {_size(self.host_bytes)}",
            "(* estimated from shapes; h: in CPU memory; the model, its gradients and optimizer state come on top)",
        ]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def held_bytes(state: LayerState) -> int:
    """Bytes of every tensor ``state`` holds now (sums, basis, cached plans), storage shared once."""
    seen: set[int] = set()
    total = 0
    for tensor in state.tensors().values():
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def basis_peak_bytes(d_out: int, d_in: int, factor_bytes: int = 4, reduced_bytes: int | None = None) -> int:
    """Most bytes :meth:`LayerState.compute_basis` holds at once beyond the sums and the basis it keeps.

    Phases (``n = d_in``, ``m = d_out``, ``F`` factor bytes): the normalised factors ``F(n² + m²)`` live
    throughout; ``eigh`` of ``A`` holds the symmetrised copy, the eigenvectors and LAPACK's
    ``2n² + 6n + 1`` workspace; ``eigh`` of ``S`` the same with ``U_in`` kept; the threshold and mask
    hold both bases, the mask and either a sort (grids up to 2¹⁷: the float64 grid, sorted values,
    indices and a buffer, ``32·m·n``) or a chunk of float64 rows of the mask; the row-major copy of
    each basis briefly doubles it; ``reduced_bytes`` (blocked storage) adds the plan's temporary
    masks and the copied vectors while the full basis still exists.
    """
    n, m, F = d_in, d_out, factor_bytes
    factors = F * (n * n + m * m)
    eigh_in = factors + F * (4 * n * n + 6 * n)
    eigh_out = factors + F * n * n + F * (4 * m * m + 6 * m)
    search = 32 * m * n if m * n <= _SORT_MAX_GRID else 8 * min(_MASK_ROWS, m) * n
    mask_phase = factors + F * (n * n + m * m) + m * n + search
    copies = factors + 4 * (n * n + m * m) + 4 * max(n * n, m * m) + m * n
    peak = max(eigh_in, eigh_out, mask_phase, copies)
    full_basis = 4 * (n * n + m * m + n + m) + m * n
    if reduced_bytes is not None:
        peak = max(peak, full_basis + 2 * m * n + reduced_bytes)
        return peak - reduced_bytes
    return peak - full_basis


def projection_peak_bytes(d_out: int, d_in: int, grad_bytes: int = 4, plan: ProjectionPlan | None = None) -> int:
    """Most bytes one :meth:`LayerState.project` holds at once, its result included.

    Full path: three ``m × n`` float32 products at a time (``12·m·n``, also for a bf16 gradient, whose
    float32 copy is gone by then). Complement path: the blocked rows ``T`` (``4·|side|·d_other``) held
    throughout, then either a band's rotated rectangle and its back-rotation (before it is copied
    into ``T``) or the result
    ``4·m·n`` (the bands are done by then); a low-precision gradient adds its float32 copy, held
    throughout, and the cast result.
    """
    m, n = d_out, d_in
    if plan is None or plan.banding is None:
        return 12 * m * n
    banding = plan.banding
    d_other = m if banding.by_columns else n
    # a band holds its rotated rectangle X (|side_b| × |other_b|) and X's back-rotation (|side_b| × d_other)
    band = max((_span(b.side) * (d_other + _span(b.other)) for b in banding.bands if b.other is not None), default=0)
    low_precision = grad_bytes != 4
    result = (4 + (grad_bytes if low_precision else 0)) * m * n
    return 4 * banding.side_count * d_other + max(4 * band, result) + (4 * m * n if low_precision else 0)


def _span(index: slice | Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def memory_report(
    target: nn.Module | Mapping[str, LayerState],
    config: CrispConfig,
    *,
    mode: Mode = "grad",
    tokens_per_batch: int | None = None,
    blocked_rank_fraction: float | None = None,
    world_size: int = 1,
) -> MemoryReport:
    """What collection and training will hold for ``config``, per layer and in total.

    Args:
        target: a model (its ``config.target_modules`` are found; a ``meta``-device model is enough),
            or a projector's layers (``projector.layers``): stored bases are then measured exactly.
        config: the options that will be used (storage, offloading, curvature, budget).
        mode: the optimizer's mode; ``"update"`` (or a capability budget) keeps float32 anchors ``W₀``.
        tokens_per_batch: tokens of one collection batch (counts the inputs kept for the backward).
        blocked_rank_fraction: for ``basis_storage="blocked"`` before data: assumed ``r/d_out`` and
            ``J/d_in`` (see the table in ``docs/performance.md``); ``None`` reports the full storage,
            an upper bound.
        world_size: ranks of the process group: with ``basis_placement="sharded"`` the device totals count
            one rank's share of the bases (:attr:`MemoryReport.sharded_bases_bytes`).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if blocked_rank_fraction is not None and not 0.0 <= blocked_rank_fraction <= 1.0:
        raise ValueError(f"blocked_rank_fraction must lie in [0, 1], got {blocked_rank_fraction!r}")
    if isinstance(target, nn.Module):
        modules = find_target_modules(target, config.target_modules)
        geometries = {name: LinearGeometry.of(module) for name, module in modules.items()}
        states: Mapping[str, LayerState] = {}
    else:
        states = target
        geometries = {name: state.geometry for name, state in states.items()}
    rows = []
    for name, geometry in geometries.items():
        basis = states[name].basis if name in states else None
        rows.append(_layer(name, geometry, config, mode, basis, tokens_per_batch, blocked_rank_fraction))
    return MemoryReport(tuple(rows), config, mode, world_size)


def _layer(
    name: str, geometry: LinearGeometry, config: CrispConfig, mode: Mode, basis: AnyBasis | None, tokens: int | None,
    rank_fraction: float | None,
) -> LayerMemory:
    m, n = geometry.d_out, geometry.d_in_augmented
    F = torch.empty((), dtype=config.torch_factor_dtype).element_size()
    grad_bytes = geometry.weight.element_size()
    blocked = config.basis_storage == "blocked"
    basis_bytes = 4 * (m * m + n * n + m + n) + m * n  # full storage
    projection = projection_peak_bytes(m, n, grad_bytes)  # full path
    reduced_bytes: int | None = None
    if basis is not None:
        basis_bytes = sum(t.numel() * t.element_size() for t in basis.tensors().values())
        plan = basis.plan(config.projection)
        projection = projection_peak_bytes(m, n, grad_bytes, plan)
        if blocked and plan.path == "complement":
            reduced_bytes = 4 * plan.reduced_floats()
    elif rank_fraction is not None and config.projection != "full":
        # a staircase banded by rows: r = ρ·m blocked rows against all n columns, J = ρ·n
        rows = round(rank_fraction * m)
        low_precision = (8 + grad_bytes) * m * n if grad_bytes != 4 else 4 * m * n
        projection = min(projection, 4 * rows * n + low_precision)
        if blocked:  # band masks cover about the blocked rectangle, r × J entries of one byte
            reduced_bytes = 4 * round(rank_fraction * (m * m + n * n))
            basis_bytes = reduced_bytes + 4 * (m + n) + round(rank_fraction**2 * m * n)
    anchored = mode == "update" or config.capability_budget is not None
    return LayerMemory(
        name=name, d_out=m, d_in=n,
        factor_sums_bytes=F * (m * m + n * n),
        correction_sums_bytes=F * m * n if config.curvature == "ekfac" else 0,
        basis_bytes=basis_bytes,
        anchor_bytes=4 * m * n if anchored else 0,
        basis_peak_bytes=basis_peak_bytes(m, n, F, reduced_bytes),
        projection_peak_bytes=projection,
        saved_inputs_bytes=(tokens or 0) * geometry.d_in * 4,
        exact_basis=basis is not None,
        sums_on_host=config.offload_factors,
    )
