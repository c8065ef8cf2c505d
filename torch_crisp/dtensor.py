"""Sharded parameters: gather FSDP2 ``DTensor`` gradients, write back local shards, refuse the rest.

FSDP2 (``fully_shard``) shards a projected weight and its gradient as ``DTensor`` s. The
projection needs the whole matrix, so callers gather it (:func:`full_tensor`, a collective),
project it identically on every rank (the bases are bit-identical) and keep their own shard
(:func:`copy_from_full_`, local). DeepSpeed ZeRO and FSDP1 flat parameters hide the per-layer
gradients and are refused by :func:`check_supported_parameter` with an error naming the
alternative.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_supported_parameter",
    "copy_from_full_",
    "full_from_local",
    "full_tensor",
    "is_dtensor",
    "local_part",
    "local_tensor",
]


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


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a ``DTensor`` (a plain tensor), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def full_from_local(local: Tensor, like: Tensor) -> Tensor:
    """The whole tensor from this rank's part ``local``, sharded like ``like`` (collective if sharded)."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    # the global shape and stride must be given: FSDP2 shards unevenly when dim 0 does not divide
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    ).full_tensor()


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of the global value ``full`` for a tensor sharded like ``like`` (no communication)."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


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
