"""Sharded bases at a step (kfac-pytorch's MEM-OPT): the owner of a layer's basis projects it and broadcasts.

With ``CrispConfig(basis_placement="sharded")`` in a process group, each rank keeps only the bases it
computed (:mod:`torch_crisp.sync`). At every optimizer step the ranks hold the same gradients (DDP's
all-reduce) or the same stepped weights (update mode), so the owner of a layer projects it alone
and broadcasts the projected tensors — ``.grad`` in grad mode, the weight and bias in update mode,
in their own dtype — into the other ranks' tensors, in place. Every rank issues the broadcasts in
layer order; an owner issues its layer's after projecting it, the others issue it at once, so
the projections of different owners run in parallel with the transfers. What travels per step is
every projected matrix once: ``Σ_layers d_out·(d_in[+1])`` elements of the gradient's dtype.

FSDP2 parameters are refused: their tensors are shards, different on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.distributed as dist
from torch import Tensor

from . import distributed
from .dtensor import is_dtensor

__all__ = ["OwnerBroadcasts"]


class OwnerBroadcasts:
    """The broadcasts of one step from each layer's owner (see the module docstring).

    Args:
        owners: ``{layer: group rank}`` that holds each layer's basis.
        group: the projector's process group.
    """

    def __init__(self, owners: Mapping[str, int], group: distributed.Group) -> None:
        self.owners = owners
        self.group = group
        self.rank = dist.get_rank(group)
        self.bytes = 0  # bytes this step broadcast (each tensor counted once, on every rank)
        self._pending: list = []
        self._copies: list[tuple[Tensor, Tensor]] = []  # (communication copy, home tensor)

    def owns(self, name: str) -> bool:
        return self.owners[name] == self.rank

    def share(self, name: str, tensors: Sequence[Tensor | None]) -> None:
        """Owner: send ``tensors`` (already projected); others: receive into them, after :meth:`wait`."""
        for home in tensors:
            if home is None:
                continue
            if is_dtensor(home):
                raise ValueError(
                    f"layer {name!r} is sharded by FSDP2, whose ranks hold different shards of it: "
                    "basis_placement='sharded' needs DDP's replicated tensors; use basis_placement='replicated' "
                    "with FSDP2"
                )
            comm = home.to(distributed.comm_device(home, self.group))
            if comm is not home:
                self._copies.append((comm, home))
            self.bytes += home.numel() * home.element_size()
            self._pending.extend(distributed.broadcast([comm], self.owners[name], self.group))

    def wait(self) -> None:
        """Wait for every broadcast issued; received values are then in place."""
        for work in self._pending:
            work.wait()
        for comm, home in self._copies:
            if comm.data_ptr() != home.data_ptr():
                home.copy_(comm)
        self._pending, self._copies = [], []
