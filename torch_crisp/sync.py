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

from . import distributed
from .basis import Basis
from .config import Curvature
from .state import LayerState

__all__ = ["RankSync", "eigendecomposition_cost"]


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
    """

    def __init__(self) -> None:
        self.process_group: distributed.Group = None
        self.enabled = True
        self.owners: dict[str, int] = {}
        self._local_factors = False  # this rank added data since the last reduction
        self._local_corrections = False

    @property
    def active(self) -> bool:
        return self.enabled and distributed.is_active(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self.active else 0

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
    def compute_bases(self, layers: Mapping[str, LayerState], gamma: float, curvature: Curvature) -> None:
        """Each layer's basis computed on one rank and broadcast to all (collective when active)."""
        if not self.active:
            for state in layers.values():
                state.compute_basis(gamma, curvature)
            return
        group = self.process_group
        states = list(layers.values())
        me = dist.get_rank(group)
        owners = distributed.assign_greedy([eigendecomposition_cost(s) for s in states], dist.get_world_size(group))
        # Own work first, so the ranks compute in parallel before any broadcast waits on them.
        for state, owner in zip(states, owners):
            if owner == me:
                state.compute_basis(gamma, curvature)
            elif curvature == "ekfac":
                state.clear_correction()  # as the owner's compute_basis does: it belonged to the old basis
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
        self.owners = {name: owner for name, owner in zip(layers, owners)}

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
