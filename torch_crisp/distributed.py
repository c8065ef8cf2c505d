"""Multi-process curvature: reduce factor sums across ranks, split and share eigendecompositions.

Pure ``torch.distributed`` (no Accelerate, no DeepSpeed). The reductions, :func:`update_bases`,
:func:`any_rank` and the ``DTensor`` helpers are *collectives*: all ranks of the process group
must call them, with the same projected layers, in the same order. :func:`assign_greedy` and
:func:`shard_batches` are plain functions.

How a distributed :meth:`~torch_crisp.CrispProjector.update_basis` proceeds:

1. :func:`check_same_layers` — one small all-reduce proves every rank projects the same layers
   with the same shapes (otherwise the collectives below would pair up mismatched tensors).
2. :func:`all_reduce_factors` — the sums ``Σ_t a_t a_tᵀ``, ``Σ_t g_t g_tᵀ`` and the token counts
   ``N`` are summed over ranks. Because the factors are *sums* with counts, the result is exactly
   what one process would accumulate over the union of all ranks' data (up to the order of float
   additions). A rank with no local data contributes zeros, so uneven shards never deadlock.
3. :func:`assign_greedy` — each layer's eigendecomposition (cost ∝ ``d_in³ + d_out³``) is given
   to one rank, largest first, always to the least loaded rank (the LPT rule; deterministic, so
   every rank computes the same assignment without communicating).
4. :func:`update_bases` — each rank eigendecomposes its own layers, then every basis is broadcast
   from its owner, so all ranks hold **bit-identical** ``U_in, U_out, λ, mask, τ``: replicas apply
   identical projections to identical (all-reduced) gradients and cannot drift apart.

EK-FAC's second pass is reduced the same way (:func:`all_reduce_corrections`): in the shared
bases, the rotated per-example gradients of all ranks live in the same coordinates.

FSDP2 (``fully_shard``) shards a projected weight's gradient as a ``DTensor``;
:func:`full_tensor` / :func:`copy_from_full_` let the projector gather it, project the full
matrix and write back the local shard. DeepSpeed ZeRO and FSDP1 flat parameters are detected by
:func:`check_supported_parameter` and refused with an error that names the alternative.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from itertools import islice
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .state import Basis, LayerState

__all__ = [
    "all_reduce_corrections",
    "all_reduce_factors",
    "any_rank",
    "assign_greedy",
    "check_same_layers",
    "check_supported_parameter",
    "copy_from_full_",
    "eigendecomposition_cost",
    "full_tensor",
    "is_active",
    "is_dtensor",
    "project_dtensor",
    "ShardedBatches",
    "shard_batches",
    "update_bases",
]

T = TypeVar("T")
ProcessGroup = Any  # torch.distributed.ProcessGroup; None means the default (world) group


# --------------------------------------------------------------------------- process group
def is_active(group: ProcessGroup = None) -> bool:
    """True when ``torch.distributed`` is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _global_rank(group: ProcessGroup, group_rank: int) -> int:
    # broadcast's ``src`` is a global rank even when a sub-group is given.
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _comm_device(tensor: Tensor, group: ProcessGroup) -> torch.device:
    """Where ``tensor`` must live for a collective on ``group``.

    NCCL only moves CUDA tensors; factors kept on the CPU (e.g. a CPU-offloaded model) travel
    through the current CUDA device. Gloo and MPI accept the tensor where it is.
    """
    backend = str(dist.get_backend(group)).lower()
    if tensor.device.type == "cpu" and "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


# --------------------------------------------------------------------------- data sharding
class ShardedBatches(Generic[T]):
    """Batches ``rank, rank + world_size, …`` of ``batches``; re-iterable when ``batches`` is.

    Re-iterability matters for ``curvature="ekfac"``, whose :meth:`~torch_crisp.CrispProjector.collect`
    makes two passes over the data.
    """

    def __init__(self, batches: Iterable[T], rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[T]:
        return islice(iter(self.batches), self.rank, None, self.world_size)


class _SizedShardedBatches(ShardedBatches[T]):
    """A shard of a sized collection has a length too (progress bars use it)."""

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> ShardedBatches[T]:
    """Every ``world_size``-th batch starting at ``rank``: disjoint shards whose union is ``batches``.

    Unlike a sampler that pads the last round (Accelerate's ``even_batches``), nothing is counted
    twice, so the reduced factors equal a single process's factors over ``batches``. Ranks may get
    different numbers of batches (or none); the reduction handles that. Every rank must see
    ``batches`` in the same order.
    """
    if isinstance(batches, Sized):
        return _SizedShardedBatches(batches, rank, world_size)
    return ShardedBatches(batches, rank, world_size)


# --------------------------------------------------------------------------- factors
def _signature(layers: Mapping[str, LayerState]) -> int:
    text = ";".join(
        f"{name}:{s.geometry.d_out}x{s.geometry.d_in_augmented}:{s.factor_dtype}" for name, s in layers.items()
    )
    # 62 bits so the value and its negation fit an int64.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def check_same_layers(layers: Mapping[str, LayerState], group: ProcessGroup = None) -> None:
    """Raise on every rank if the ranks do not project the same layers (names, shapes, dtypes).

    One all-reduce of ``[h, -h]`` with ``MAX`` yields ``[max h, -min h]``; all ranks agree iff
    ``max == min``. Every rank reaches the same verdict, so none is left waiting in a collective.
    """
    signature = _signature(layers)
    probe = torch.tensor([signature, -signature], dtype=torch.int64)
    device = _comm_device(probe, group)
    probe = probe.to(device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    high, low = int(probe[0].item()), -int(probe[1].item())
    if high != low:
        raise RuntimeError(
            f"the ranks of the process group project different layers (rank {dist.get_rank(group)} has "
            f"{len(layers)}: {list(layers)[:4]}…); build the CrispProjector with the same model and "
            "target_modules on every rank, before wrapping the model for FSDP/DDP"
        )


def any_rank(flag: bool, group: ProcessGroup = None) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (one tiny all-reduce)."""
    probe = torch.tensor([int(bool(flag))], dtype=torch.int64)
    probe = probe.to(_comm_device(probe, group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return bool(probe.item())


def _allocate_zeros(state: LayerState) -> None:
    d_in, d_out = state.geometry.d_in_augmented, state.geometry.d_out
    device = state.geometry.weight.device
    state.A_sum = torch.zeros(d_in, d_in, dtype=state.factor_dtype, device=device)
    state.S_sum = torch.zeros(d_out, d_out, dtype=state.factor_dtype, device=device)


def all_reduce_factors(layers: Mapping[str, LayerState], group: ProcessGroup = None) -> None:
    """Sum ``A_sum``, ``S_sum`` and ``num_tokens`` of every layer over the ranks of ``group``, in place.

    Afterwards each rank holds the sums of the union of all ranks' data; the normalised factors
    ``A = ΣA / N``, ``S = ΣS / N`` use the global ``N``. Layers that saw no data on this rank take
    part with zeros (allocated here), so ranks with fewer or no batches do not deadlock.
    Token counts are reduced in float64 (exact for counts below 2⁵³, also for weighted counts).
    """
    check_same_layers(layers, group)
    states = list(layers.values())
    for state in states:
        if state.A_sum is None or state.S_sum is None:
            _allocate_zeros(state)
    sums = [t for s in states for t in (s.A_sum, s.S_sum)]
    totals = _all_reduce_in_place([float(s.num_tokens) for s in states], sums, group)  # type: ignore[misc]
    for state, total in zip(states, totals):
        state.num_tokens = int(total) if float(total).is_integer() else total


def _all_reduce_in_place(counts: list[float], tensors: list[Tensor], group: ProcessGroup) -> list[float]:
    """Sum ``tensors`` (in place) and ``counts`` (float64, returned) over ranks, all asynchronously."""
    counts_comm = torch.tensor(counts, dtype=torch.float64)
    counts_comm = counts_comm.to(_comm_device(counts_comm, group))
    pending = [dist.all_reduce(counts_comm, group=group, async_op=True)]
    transfers: list[tuple[Tensor, Tensor]] = []  # (comm copy, home tensor) where they differ
    for home in tensors:
        comm = home.to(_comm_device(home, group))
        if comm is not home:
            transfers.append((comm, home))
        pending.append(dist.all_reduce(comm, group=group, async_op=True))
    for work in pending:
        work.wait()
    for comm, home in transfers:
        home.copy_(comm)
    return counts_comm.cpu().tolist()


def all_reduce_corrections(layers: Mapping[str, LayerState], group: ProcessGroup = None) -> None:
    """Sum the EK-FAC second-pass sums ``Σ_n (U_outᵀ G_n U_in)²`` and example counts over ranks.

    The bases must be identical on all ranks (they are after :func:`update_bases`), so the rotated
    per-example gradients of different ranks live in the same coordinates and simply add up.
    Layers without local examples contribute zeros.
    """
    check_same_layers(layers, group)
    states = list(layers.values())
    for state in states:
        if state.correction_sum is None:
            shape = (state.geometry.d_out, state.geometry.d_in_augmented)
            state.correction_sum = torch.zeros(shape, dtype=state.factor_dtype, device=state.geometry.weight.device)
    sums = [s.correction_sum for s in states]
    totals = _all_reduce_in_place([float(s.num_examples) for s in states], sums, group)  # type: ignore[misc]
    for state, total in zip(states, totals):
        state.num_examples = int(total) if float(total).is_integer() else total


# --------------------------------------------------------------------------- eigendecompositions
def eigendecomposition_cost(state: LayerState) -> float:
    """Relative cost of one layer's two eigendecompositions: ``d_in³ + d_out³`` (``d_in`` with bias)."""
    return float(state.geometry.d_in_augmented) ** 3 + float(state.geometry.d_out) ** 3


def assign_greedy(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each task: largest cost first, each to the currently least-loaded rank.

    This is the LPT rule (makespan within 4/3 of optimal). Ties are broken by task index and rank
    number, so every rank computes the same assignment from the same costs.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for task in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[task] = rank
        loads[rank] += float(costs[task])
    return owners


def _basis_buffers(state: LayerState, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d_in, d_out = state.geometry.d_in_augmented, state.geometry.d_out
    return (
        torch.empty(d_in, d_in, dtype=torch.float32, device=device),
        torch.empty(d_out, d_out, dtype=torch.float32, device=device),
        torch.empty(d_out, d_in, dtype=torch.uint8, device=device),  # bool is not portable across backends
        torch.empty(d_in + d_out + 1, dtype=torch.float64, device=device),  # λ_in, λ_out, τ
    )


def update_bases(
    layers: Mapping[str, LayerState], gamma: float, group: ProcessGroup = None, curvature: str = "kfac"
) -> dict[str, int]:
    """Eigendecompose each layer on one rank and broadcast the basis to all ranks.

    The factors must already be identical on all ranks (:func:`all_reduce_factors`). The owner
    computes ``U_in, λ_in, U_out, λ_out``, the threshold ``τ`` and the mask ``M`` exactly as a single
    process would; the others receive copies, so every rank's :class:`~torch_crisp.state.Basis` is
    bit-identical. Bases are float32 on the device of the layer's weight. ``curvature`` is passed to
    :meth:`LayerState.update_basis` (``"activations"`` changes the mask and ``τ``, which travel with
    the basis; ``"ekfac"`` clears the previous correction sums on every rank).

    Returns:
        ``{layer name: group rank that computed it}``.
    """
    states = list(layers.values())
    world, me = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_greedy([eigendecomposition_cost(s) for s in states], world)
    # Own work first, so the ranks compute in parallel before any broadcast waits on them.
    for state, owner in zip(states, owners):
        if owner == me:
            state.update_basis(gamma, device=state.geometry.weight.device, curvature=curvature)
        elif curvature == "ekfac":
            state.clear_correction()  # the owner's update_basis does the same: it belonged to the old basis
    pending = []
    received: list[tuple[LayerState, tuple[Tensor, ...]]] = []
    for state, owner in zip(states, owners):
        home = state.geometry.weight.device
        probe = torch.empty(0, device=home)
        device = _comm_device(probe, group)
        if owner == me:
            b = state.basis
            assert b is not None
            buffers: tuple[Tensor, ...] = (
                b.U_in.to(device),
                b.U_out.to(device),
                b.mask.to(device, torch.uint8),
                torch.cat([b.eig_in.double(), b.eig_out.double(), torch.tensor([b.tau], dtype=torch.float64,
                          device=b.eig_in.device)]).to(device),
            )
        else:
            state.basis = None  # free the old basis first: peak memory stays at one set of bases
            buffers = _basis_buffers(state, device)
            received.append((state, buffers))
        src = _global_rank(group, owner)
        pending.extend(dist.broadcast(t, src=src, group=group, async_op=True) for t in buffers)
    for work in pending:
        work.wait()
    for state, (U_in, U_out, mask, values) in received:
        home = state.geometry.weight.device
        d_in = state.geometry.d_in_augmented
        values = values.cpu()
        state.basis = Basis(
            eig_in=values[:d_in].float().to(home),
            U_in=U_in.to(home),
            eig_out=values[d_in:-1].float().to(home),
            U_out=U_out.to(home),
            mask=mask.to(home, torch.bool),
            tau=float(values[-1].item()),
            curvature="activations" if curvature == "activations" else "kfac",
        )
    return {name: owner for name, owner in zip(layers, owners)}


# --------------------------------------------------------------------------- sharded gradients
def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole (global) tensor: all-gathers a ``DTensor`` (collective), returns others as they are."""
    return t.full_tensor() if is_dtensor(t) else t


def copy_from_full_(dst: Tensor, full: Tensor) -> None:
    """Write ``full`` (the global value) into ``dst``; for a ``DTensor`` only its local shard.

    The shard is cut locally with the DTensor's own placement rule (no communication), which is
    correct because every rank holds the same ``full`` (it was computed from all-gathered data
    with bit-identical bases).
    """
    if is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local()
        dst.to_local().copy_(local)
    else:
        dst.copy_(full)


def project_dtensor(matrix: Tensor, project: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``project`` to the gathered value of a ``DTensor`` and shard the result the same way.

    A collective (all-gather); every rank computes the same projection of the same full matrix,
    then keeps its own shard without further communication.
    """
    from torch.distributed.tensor import distribute_tensor

    projected = project(matrix.full_tensor())
    return distribute_tensor(projected, matrix.device_mesh, matrix.placements, src_data_rank=None)


def check_supported_parameter(param: Tensor, layer: str) -> None:
    """Refuse parameters whose gradients the projector cannot see (DeepSpeed ZeRO, FSDP1)."""
    if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
        raise RuntimeError(
            f"layer {layer!r} is managed by DeepSpeed ZeRO: its gradient lives in DeepSpeed's partitioned "
            "buffers, where torch_crisp cannot project it. Use DDP (accelerate launch --multi_gpu) or "
            "FSDP2 (fully_shard / Accelerate's FSDP plugin with fsdp_version: 2) instead"
        )
    if getattr(param, "_is_flat_param", False) or not isinstance(param, torch.nn.Parameter):
        raise RuntimeError(
            f"the weight of layer {layer!r} is not a plain parameter (FSDP1 flat parameters?); torch_crisp "
            "supports FSDP2 (fully_shard / Accelerate's FSDP plugin with fsdp_version: 2) and DDP"
        )
