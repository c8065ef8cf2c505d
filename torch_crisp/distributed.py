"""Collectives on plain tensors, and the work assignment and data sharding they rely on.

Pure ``torch.distributed`` (no Accelerate, no DeepSpeed), and nothing about layers: the callers
(:mod:`torch_crisp.sync`) decide which tensors travel. :func:`any_rank`, :func:`check_same`,
:func:`all_reduce_sums` and :func:`broadcast` are *collectives*: all ranks of the process group
must call them with tensors of the same shapes, in the same order. :func:`assign_greedy` and
:func:`shard_batches` are plain functions.

Why sums: the factors are sums with token counts, so summing them over ranks gives exactly what
one process would accumulate over the union of all ranks' data (up to the order of float
additions). A rank with no local data contributes zeros, so uneven shards never deadlock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence, Sized
from itertools import islice
from typing import TYPE_CHECKING, Generic, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:  # an annotation only: importing torch.distributed's classes needs no cycle guard
    from torch.distributed import ProcessGroup

__all__ = [
    "Group",
    "ShardedBatches",
    "all_gather_ints",
    "all_gather_varying",
    "all_reduce_sums",
    "any_rank",
    "assign_greedy",
    "broadcast",
    "check_same",
    "comm_device",
    "extreme_counts",
    "free_device_memory",
    "global_rank",
    "is_active",
    "shard_batches",
]

T = TypeVar("T")
Group = Optional["ProcessGroup"]
"""A ``torch.distributed`` process group; ``None`` means the default (world) group."""


# --------------------------------------------------------------------------- process group
def is_active(group: Group = None) -> bool:
    """True when ``torch.distributed`` is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def global_rank(group: Group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (``broadcast``'s ``src`` is a global rank)."""
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def comm_device(tensor: Tensor, group: Group) -> torch.device:
    """Where ``tensor`` must live for a collective on ``group``.

    NCCL only moves CUDA tensors; tensors kept on the CPU (e.g. offloaded factor sums) travel
    through the current CUDA device. Gloo and MPI accept the tensor where it is.
    """
    backend = str(dist.get_backend(group)).lower()
    if tensor.device.type == "cpu" and "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def any_rank(flag: bool, group: Group = None) -> bool:
    """True on every rank if ``flag`` is true on at least one rank (one tiny all-reduce)."""
    probe = torch.tensor([int(bool(flag))], dtype=torch.int64)
    probe = probe.to(comm_device(probe, group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return bool(probe.item())


def check_same(description: str, group: Group = None) -> bool:
    """True on every rank iff every rank passed the same ``description`` (one all-reduce).

    The text is hashed to 62 bits; an all-reduce of ``[h, -h]`` with ``MAX`` yields
    ``[max h, -min h]``, and all ranks agree iff ``max == min``. Every rank reaches the same
    verdict, so none is left waiting in a later collective.
    """
    signature = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "big") >> 2
    probe = torch.tensor([signature, -signature], dtype=torch.int64)
    probe = probe.to(comm_device(probe, group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return int(probe[0].item()) == -int(probe[1].item())


def extreme_counts(count: int, group: Group = None) -> tuple[int, int]:
    """``(largest, smallest)`` of an integer over the ranks (one all-reduce)."""
    probe = torch.tensor([count, -count], dtype=torch.int64)
    probe = probe.to(comm_device(probe, group))
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    return int(probe[0].item()), -int(probe[1].item())


def all_reduce_sums(tensors: Sequence[Tensor], counts: Sequence[float], group: Group = None) -> list[float]:
    """Sum ``tensors`` in place and ``counts`` (float64, returned) over the ranks, all asynchronously.

    Counts travel in float64: exact for counts below 2⁵³, also for weighted counts.
    """
    counts_comm = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    counts_comm = counts_comm.to(comm_device(counts_comm, group))
    pending = [dist.all_reduce(counts_comm, group=group, async_op=True)]
    transfers: list[tuple[Tensor, Tensor]] = []  # (comm copy, home tensor) where they differ
    for home in tensors:
        comm = home.to(comm_device(home, group))
        if comm is not home:
            transfers.append((comm, home))
        pending.append(dist.all_reduce(comm, group=group, async_op=True))
    for work in pending:
        work.wait()  # type: ignore[union-attr]
    for comm, home in transfers:
        home.copy_(comm)
    return counts_comm.cpu().tolist()


def all_gather_ints(values: Sequence[int], group: Group = None) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in group-rank order (one all-gather)."""
    local = torch.tensor(list(values), dtype=torch.int64)
    local = local.to(comm_device(local, group))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [t.cpu().tolist() for t in gathered]


def all_gather_varying(flat: Tensor, lengths: Sequence[int], group: Group = None) -> list[Tensor]:
    """Every rank's 1-D ``flat`` of length ``lengths[rank]`` (known on every rank), in group-rank order.

    The tensors are padded to the longest for one all-gather; ``flat`` must live on :func:`comm_device`.
    """
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded, group=group)
    return [t[:n] for t, n in zip(gathered, lengths)]


def free_device_memory(device: torch.device) -> float:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); ``inf`` elsewhere (no known limit)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float("inf")


def broadcast(tensors: Sequence[Tensor], src_group_rank: int, group: Group = None) -> list:
    """Start broadcasting ``tensors`` from ``src_group_rank``; returns the pending works to ``wait()``.

    The tensors must already live on :func:`comm_device`; receivers pass buffers of the same shapes
    and dtypes.
    """
    src = global_rank(group, src_group_rank)
    return [dist.broadcast(t, src=src, group=group, async_op=True) for t in tensors]


# --------------------------------------------------------------------------- work assignment
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
