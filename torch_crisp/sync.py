"""Keep the projectors of several ranks in step: merged factor sums, bit-identical bases.

:class:`RankSync` is the projector's distributed state: its process group, whether it reduces at
all, and which sums are still local to each rank. With ``torch.distributed`` initialised and more
than one rank in the group, an update of the bases proceeds as

1. a check that every rank projects the same layers (names, shapes, dtypes), so the collectives
   below cannot pair up mismatched tensors;
2. the factor sums ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ`` and token counts are summed over the ranks
   (only when some rank captured data since the last reduction);
3. each layer's eigendecomposition (cost ∝ ``d_in³ + d_out³``) is assigned to one rank (the LPT
   rule, :func:`~torch_crisp.distributed.assign_greedy`, deterministic, so every rank computes the
   same assignment without communicating), computed there and broadcast, so all ranks hold
   **bit-identical** ``U_in, U_out, λ, mask, τ``: replicas apply identical projections to
   identical (all-reduced) gradients and cannot drift apart.

EK-FAC's second-pass sums are reduced the same way: in the shared bases, the rotated per-example
gradients of all ranks live in the same coordinates.

With ``basis_placement="sharded"`` (kfac-pytorch's MEM-OPT) step 3 broadcasts only the owner's numbers
(eigenvalues, ``τ``, the kept fraction, the low-rank step's token budget): each rank keeps the bases
it computed, the others a :class:`~torch_crisp.basis.RemoteBasis`, and at every step the owner
projects its layers and broadcasts the result (:mod:`torch_crisp.placement`). ``"auto"`` decides
per update, identically on every rank (one all-reduce): sharded when the replicated bases would
take more than half of the smallest free device memory of the group, else replicated.

After a reduction every rank holds the same global sums ``G``. New local data ``L_r`` is added on
top, and the next reduction must yield ``G + Σ_r L_r``, not ``world_size·G + Σ_r L_r``: so ``G``
stays on rank 0 only and the other ranks start again from zero when they begin adding data (their
bases are kept). Loaded sums count as global too (:meth:`RankSync.mark_global`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed, low_rank
from .basis import AnyBasis, Basis, RemoteBasis
from .config import BasisPlacement, Curvature, Projection
from .placement import OwnerBroadcasts
from .state import LayerState

__all__ = ["RankSync", "eigendecomposition_cost"]

# "auto" shards when the replicated bases would need more than this share of the free device memory: the
# rest is for the gradients, optimizer state and activations of training (a choice, not a measurement)
AUTO_SHARD_FREE_FRACTION = 0.5


def eigendecomposition_cost(state: LayerState) -> float:
    """Relative cost of one layer's two eigendecompositions: ``d_in³ + d_out³`` (``d_in`` with bias)."""
    return float(state.geometry.d_in_augmented) ** 3 + float(state.geometry.d_out) ** 3


def _layers_description(layers: Mapping[str, LayerState]) -> str:
    return ";".join(
        f"{name}:{s.geometry.d_out}x{s.geometry.d_in_augmented}:{s.factor_dtype}" for name, s in layers.items()
    )


def _count(total: float) -> float:
    return int(total) if float(total).is_integer() else total


class RankSync:
    """The distributed state of one projector (see the module docstring).

    Attributes:
        process_group: the group the sums are reduced over (``None``: the default world group).
        enabled: set ``False`` to keep a projector purely local to its rank.
        owners: ``{layer: group rank}`` that computed each basis at the last distributed update.
        sharded: whether the bases are sharded over the ranks (each rank holds its owners' bases only).
    """

    def __init__(self) -> None:
        self.process_group: distributed.Group = None
        self.enabled = True
        self.owners: dict[str, int] = {}
        self.sharded = False
        self._local_factors = False  # this rank added data since the last reduction
        self._local_corrections = False

    @property
    def active(self) -> bool:
        return self.enabled and distributed.is_active(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self.active else 0

    def flags(self) -> tuple[bool, bool]:
        """Which sums are local to this rank (saved and restored around a collection that may fail)."""
        return self._local_factors, self._local_corrections

    def set_flags(self, flags: tuple[bool, bool]) -> None:
        self._local_factors, self._local_corrections = flags

    def mark_global(self) -> None:
        """The sums now held are global (e.g. just loaded from a file): nothing to reduce."""
        self._local_factors = self._local_corrections = False

    # ----------------------------------------------------------------- factors
    def begin_local_factors(self, layers: Mapping[str, LayerState]) -> None:
        """Call before adding data: ranks other than 0 drop the global sums they hold."""
        if not self.active or self._local_factors:
            return
        self._local_factors = True
        if self.rank != 0:
            for state in layers.values():
                state.A_sum = state.S_sum = None
                state.token_count = 0

    def reduce_factors(self, layers: Mapping[str, LayerState]) -> None:
        """Sum the factor sums and token counts over the ranks, if any rank added data (collective)."""
        if not self.active or not distributed.any_rank(self._local_factors, self.process_group):
            return
        self.begin_local_factors(layers)  # a rank without new data contributes zeros (rank 0: G)
        self._check_same_layers(layers)
        states = list(layers.values())
        sums = [t for s in states for t in s.ensure_sums()]
        totals = distributed.all_reduce_sums(sums, [s.token_count for s in states], self.process_group)
        for state, total in zip(states, totals):
            state.token_count = _count(total)
        self._local_factors = False

    # ----------------------------------------------------------------- EK-FAC corrections
    def begin_local_corrections(self, layers: Mapping[str, LayerState]) -> None:
        """As :meth:`begin_local_factors`, for EK-FAC's second-pass sums."""
        if not self.active or self._local_corrections:
            return
        self._local_corrections = True
        if self.rank != 0:
            for state in layers.values():
                state.clear_correction()

    def reduce_corrections(self, layers: Mapping[str, LayerState]) -> None:
        """Sum EK-FAC's correction sums and example counts over the ranks (collective)."""
        if not self.active:
            return
        self._check_same_layers(layers)
        states = list(layers.values())
        sums = [s.ensure_correction_sum() for s in states]
        totals = distributed.all_reduce_sums(sums, [s.example_count for s in states], self.process_group)
        for state, total in zip(states, totals):
            state.example_count = _count(total)
        self._local_corrections = False

    # ----------------------------------------------------------------- bases
    def owner_broadcasts(self) -> OwnerBroadcasts | None:
        """The broadcasts of one step when the bases are sharded (``None`` when every rank holds every basis)."""
        return OwnerBroadcasts(self.owners, self.process_group) if self.sharded and self.active else None

    def compute_bases(
        self, layers: Mapping[str, LayerState], gamma: float, curvature: Curvature,
        placement: BasisPlacement = "replicated", projection: Projection = "auto",
    ) -> None:
        """Each layer's basis computed on one rank and broadcast to all, or kept there with
        ``placement`` sharded (collective when active)."""
        if not self.active:
            for state in layers.values():
                state.compute_basis(gamma, curvature)
            self.sharded = False
            return
        group = self.process_group
        states = list(layers.values())
        me = dist.get_rank(group)
        owners = distributed.assign_greedy([eigendecomposition_cost(s) for s in states], dist.get_world_size(group))
        # Own work first, so the ranks compute in parallel before any broadcast waits on them.
        for state, owner in zip(states, owners):
            if owner == me:
                state.compute_basis(gamma, curvature, keep_full=True)  # broadcast in full, then stored
            elif curvature == "ekfac":
                state.clear_correction()  # as the owner's compute_basis does: it belonged to the old basis
        self.owners = {name: owner for name, owner in zip(layers, owners)}
        self.sharded = self._shards(placement, states, owners)
        if self.sharded:
            self._share_numbers(states, owners, curvature, projection)
            return
        pending, received = [], []
        for state, owner in zip(states, owners):
            device = distributed.comm_device(torch.empty(0, device=state.geometry.weight.device), group)
            if owner == me:
                buffers = _pack(state.require_basis(), device)
            else:
                state.basis = None  # free the old basis first: peak memory stays at one set of bases
                buffers = _empty_buffers(state, device)
                received.append((state, buffers))
            pending.extend(distributed.broadcast(buffers, owner, group))
        for work in pending:
            work.wait()
        for state, buffers in received:
            state.basis = _unpack(buffers, state.geometry.d_in_augmented, curvature, state.geometry.weight.device)
        for state in states:
            state.apply_storage(curvature)

    def place_loaded(self, layers: Mapping[str, LayerState], curvature: Curvature, projection: Projection) -> None:
        """Shard bases that every rank loaded (local: the owners are the deterministic assignment of
        :meth:`compute_bases`; each rank keeps its own and the numbers of the others)."""
        states = list(layers.values())
        owners = distributed.assign_greedy([eigendecomposition_cost(s) for s in states], dist.get_world_size(
            self.process_group))
        me = dist.get_rank(self.process_group)
        for state, owner in zip(states, owners):
            state.apply_storage(curvature)
            if owner != me:
                basis = state.require_basis()
                state.basis = _remote(state, _numbers(state, basis, projection), basis.curvature, owner)
        self.owners = {name: owner for name, owner in zip(layers, owners)}
        self.sharded = True

    def _shards(self, placement: BasisPlacement, states: list[LayerState], owners: list[int]) -> bool:
        """Whether to shard: as asked, or for ``"auto"`` when the replicated bases would take more than
        :data:`AUTO_SHARD_FREE_FRACTION` of the smallest free device memory (one all-reduce, one verdict)."""
        if placement != "auto":
            return placement == "sharded"
        me = dist.get_rank(self.process_group)
        free = distributed.free_device_memory(states[0].geometry.weight.device) if states else float("inf")
        probe = torch.tensor([_stored_bytes(s) if owner == me else 0 for s, owner in zip(states, owners)]
                             + [-int(min(free, 2.0**62))], dtype=torch.int64)
        probe = probe.to(distributed.comm_device(probe, self.process_group))
        dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=self.process_group)
        totals = probe.cpu().tolist()
        return sum(totals[:-1]) > AUTO_SHARD_FREE_FRACTION * -totals[-1]

    def _share_numbers(self, states: list[LayerState], owners: list[int], curvature: Curvature,
                       projection: Projection) -> None:
        """Sharded: owners keep their bases (as stored) and broadcast ``λ_in, λ_out, τ``, the kept fraction and
        the low-rank token budget; the other ranks keep those in a :class:`RemoteBasis`."""
        me, pending, received = dist.get_rank(self.process_group), [], []
        for state, owner in zip(states, owners):
            d_in, d_out = state.geometry.d_in_augmented, state.geometry.d_out
            device = distributed.comm_device(torch.empty(0, device=state.geometry.weight.device), self.process_group)
            if owner == me:
                state.apply_storage(curvature)
                buffer = _numbers(state, state.require_basis(), projection).to(device)
            else:
                state.basis = None  # free the old basis first
                buffer = torch.empty(d_in + d_out + 3, dtype=torch.float64, device=device)
                received.append((state, owner, buffer))
            pending.extend(distributed.broadcast([buffer], owner, self.process_group))
        for work in pending:
            work.wait()
        for state, owner, buffer in received:
            state.basis = _remote(state, buffer.cpu(), "activations" if curvature == "activations" else "kfac", owner)
            state.apply_storage(curvature)  # offloaded sums

    def _check_same_layers(self, layers: Mapping[str, LayerState]) -> None:
        if not distributed.check_same(_layers_description(layers), self.process_group):
            raise RuntimeError(
                f"the ranks of the process group project different layers (rank {self.rank} has "
                f"{len(layers)}: {list(layers)[:4]}…); build the CrispProjector with the same model and "
                "target_modules on every rank, before wrapping the model for FSDP/DDP"
            )


# ----------------------------------------------------------------------------- basis transport
def _pack(basis: Basis, device: torch.device) -> list[Tensor]:
    values = torch.cat([basis.eig_in.double(), basis.eig_out.double(), torch.tensor([basis.tau], dtype=torch.float64)
                        .to(basis.eig_in.device)])
    # bool is not portable across backends: the mask travels as uint8
    return [basis.U_in.to(device), basis.U_out.to(device), basis.mask.to(device, torch.uint8), values.to(device)]


def _empty_buffers(state: LayerState, device: torch.device) -> list[Tensor]:
    d_in, d_out = state.geometry.d_in_augmented, state.geometry.d_out
    return [
        torch.empty(d_in, d_in, dtype=torch.float32, device=device),
        torch.empty(d_out, d_out, dtype=torch.float32, device=device),
        torch.empty(d_out, d_in, dtype=torch.uint8, device=device),
        torch.empty(d_in + d_out + 1, dtype=torch.float64, device=device),  # λ_in, λ_out, τ
    ]


def _unpack(buffers: list[Tensor], d_in: int, curvature: Curvature, home: torch.device) -> Basis:
    U_in, U_out, mask, values = buffers
    values = values.cpu()
    return Basis(
        eig_in=values[:d_in].float().to(home),
        U_in=U_in.to(home),
        eig_out=values[d_in:-1].float().to(home),
        U_out=U_out.to(home),
        mask=mask.to(home, torch.bool),
        tau=float(values[-1].item()),
        curvature="activations" if curvature == "activations" else "kfac",
    )


def _stored_bytes(state: LayerState) -> int:
    """Bytes of a freshly computed (full) basis as the layer's options will store it."""
    basis = state.require_basis().stored(state.options.basis_storage, state.options.projection)
    return sum(t.numel() * t.element_size() for t in basis.tensors().values())


def _numbers(state: LayerState, basis: AnyBasis, projection: Projection) -> Tensor:
    """``[λ_in, λ_out, τ, kept fraction, low-rank token budget]`` in float64 (what a :class:`RemoteBasis` keeps)."""
    budget = 0 if isinstance(basis, RemoteBasis) else low_rank.token_budget(
        basis, projection, state.geometry.weight.device, "auto"
    )
    extra = torch.tensor([basis.tau, basis.kept_fraction, float(budget)], dtype=torch.float64)
    return torch.cat([basis.eig_in.double().cpu(), basis.eig_out.double().cpu(), extra])


def _remote(state: LayerState, values: Tensor, curvature: Curvature, owner: int) -> RemoteBasis:
    """The :class:`RemoteBasis` of :func:`_numbers`' ``values`` (received from the owner, or computed alike)."""
    d_in, home = state.geometry.d_in_augmented, state.geometry.weight.device
    return RemoteBasis(
        name=state.name, eig_in=values[:d_in].float().to(home), eig_out=values[d_in:-3].float().to(home),
        tau=float(values[-3]), curvature=curvature, owner=owner, kept=float(values[-2]),
        low_rank_tokens=int(values[-1]),
    )
