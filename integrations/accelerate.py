"""Accelerate integration: one projector, many processes, identical projections.

An ``accelerate launch`` script needs two extra lines::

    from torch_crisp.integrations import accelerate as crisp_accelerate

    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.99))
    crisp_accelerate.collect(accelerator, projector, capability_batches)    # each rank a shard
    optimizer = CrispOptimizer(torch.optim.AdamW(trainable, lr=1e-4), projector)
    model, optimizer = accelerator.prepare(model, optimizer)
    crisp_accelerate.register(accelerator, projector)                       # save_state/load_state

What happens underneath (:mod:`torch_crisp.distributed`): every process collects the factor sums
of its own shard of the capability data; ``update_basis`` all-reduces sums and token counts over
Accelerate's process group (the default ``torch.distributed`` group), assigns each layer's
eigendecomposition to one process (greedy by ``d_in³ + d_out³``) and broadcasts the results, so
every process holds bit-identical bases and masks. The projection itself runs in
``optimizer.step()``, i.e. after DDP's gradient all-reduce, so replicas stay identical.

Supported: single process, DDP (``--multi_gpu``, also gloo on CPU) and FSDP2 (Accelerate's FSDP
plugin with ``fsdp_version: 2``; sharded gradients are gathered, projected and re-sharded).
Refused with an error: DeepSpeed (gradients live in DeepSpeed's partitioned buffers) and FSDP1
(flat parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed

from torch_crisp import CrispProjector
from torch_crisp.distributed import shard_batches

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "torch_crisp.integrations.accelerate needs accelerate; install it with `pip install torch-crisp[hf]`"
    ) from err

__all__ = ["CheckpointedProjector", "check_supported", "collect", "register"]


def check_supported(accelerator: Accelerator) -> None:
    """Raise ``RuntimeError`` for Accelerate setups whose gradients the projector cannot reach.

    DeepSpeed keeps (ZeRO-partitioned) gradients in its own buffers and steps its own optimizer;
    FSDP1 flattens parameters. DDP and FSDP2 are supported.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise RuntimeError(
            "torch_crisp does not support DeepSpeed: DeepSpeed holds the gradients in partitioned buffers "
            "and steps its own optimizer, so the projection would be skipped. Launch with DDP "
            "(`accelerate launch --multi_gpu ...`) or FSDP2 (FSDP plugin with fsdp_version: 2)"
        )
    if kind == DistributedType.FSDP:
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise RuntimeError(
                f"torch_crisp supports FSDP2 only (this run uses FSDP{version}, whose flat parameters hide the "
                "per-layer gradients); set `fsdp_version: 2` in the accelerate config or use DDP (--multi_gpu)"
            )


class CheckpointedProjector:
    """What :meth:`Accelerator.register_for_checkpointing` stores for a projector.

    Saves the factor sums *and* the eigenbases (``include_basis=True``), so that after
    ``accelerator.load_state`` every process holds the very same bases the run had, instead of
    recomputing them. Accelerate writes it from the main process only; every process loads it.
    """

    def __init__(self, projector: CrispProjector) -> None:
        self.projector = projector

    def state_dict(self) -> dict[str, Any]:
        return self.projector.state_dict(include_basis=True)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.projector.load_state_dict(state_dict)


def register(accelerator: Accelerator, projector: CrispProjector) -> CheckpointedProjector:
    """Check the setup is supported and register the projector for ``save_state``/``load_state``.

    Returns the registered :class:`CheckpointedProjector`. Call it once per projector (Accelerate
    restores registered objects by position, so register in the same order when resuming).
    """
    check_supported(accelerator)
    if not isinstance(projector, CrispProjector):
        raise TypeError(f"expected a CrispProjector, got {type(projector).__name__}")
    checkpointed = CheckpointedProjector(projector)
    accelerator.register_for_checkpointing(checkpointed)
    return checkpointed


def collect(
    accelerator: Accelerator,
    projector: CrispProjector,
    batches: Iterable[Any],
    *,
    shard: bool = True,
    **collect_kwargs: Any,
) -> CrispProjector:
    """:meth:`CrispProjector.collect` on every process, each on its own part of ``batches``.

    Args:
        accelerator: the run's ``Accelerator`` (its process group must be initialised, which
            constructing it does under ``accelerate launch``).
        projector: built from the *unwrapped* model (a DDP-wrapped one is unwrapped for you).
        batches: the whole capability data set, identical on every process. With ``shard=True``
            process ``i`` of ``n`` takes batches ``i, i+n, i+2n, …``: disjoint shards whose union
            is the data, so the reduced factors equal one process's factors over all of it. Pass
            ``shard=False`` for data that is already split per process (e.g. a DataLoader from
            ``accelerator.prepare``; note its default ``even_batches=True`` repeats a few samples
            to even out the last batch, which then count twice).
        **collect_kwargs: ``loss_fn``, ``max_batches`` (per process), ``weight``, ``progress``
            (default: only on the local main process).

    Every process must call this (it is a collective), also one whose shard is empty.
    """
    check_supported(accelerator)
    # Shard by the group the factors are reduced over (not accelerator.num_processes): on a machine
    # without GPUs, ``accelerate launch --multi_gpu`` initialises a 2-rank gloo group while an
    # ``Accelerator()`` without ``cpu=True`` reports a single process.
    if projector.is_distributed:
        rank = torch.distributed.get_rank(projector.process_group)
        world = torch.distributed.get_world_size(projector.process_group)
    else:
        rank, world = 0, 1
    local = shard_batches(batches, rank, world) if shard else batches
    collect_kwargs.setdefault("progress", accelerator.is_local_main_process)
    return projector.collect(local, **collect_kwargs)
