"""Accelerate integration: one projector, many processes, identical projections.

An ``accelerate launch`` script needs two extra lines::

    from torch_crisp.integrations import accelerate as crisp_accelerate

    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.99))
    crisp_accelerate.collect(accelerator, projector, capability_batches)    # each rank a shard
    optimizer = CrispOptimizer(torch.optim.AdamW(trainable, lr=1e-4), projector)
    model, optimizer = accelerator.prepare(model, optimizer)
    crisp_accelerate.register(accelerator, projector)    # save_state/load_state include it (as a folder)

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

import os
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed

from torch_crisp import CrispProjector
from torch_crisp.distributed import shard_batches
from torch_crisp.persistence import read_folder
from torch_crisp.user_warnings import warn_user

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as err:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "torch_crisp.integrations.accelerate needs accelerate; install it with `pip install torch-crisp[hf]`"
    ) from err

__all__ = ["PROJECTOR_DIR", "CheckpointedProjector", "check_supported", "collect", "register"]


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


PROJECTOR_DIR = "crisp_projector"
"""Default name of the projector's folder inside an ``accelerator.save_state`` checkpoint."""

# folder names taken per accelerator: two projectors must not write into the same folder
_FOLDERS_IN_USE: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


class CheckpointedProjector:
    """A projector that ``accelerator.save_state`` saves and ``load_state`` restores, as a folder.

    The projector is written to ``<checkpoint>/<folder_name>`` by :meth:`CrispProjector.save_pretrained`
    (a JSON manifest and safetensors, factor sums *and* eigenbases, so that after ``load_state``
    every process holds the very bases the run had). Reading that folder cannot run code, unlike
    Accelerate's custom objects, which it unpickles from ``custom_checkpoint_<i>.pkl`` with
    ``torch.load(weights_only=False)``: whoever can replace that file in a checkpoint could run
    any command on ``load_state``. The main process writes the folder (each node's main process
    with ``ProjectConfiguration(save_on_each_node=True)``); every process reads it. As with
    Accelerate's own files, let the other processes wait (``accelerator.wait_for_everyone()``)
    before they load a checkpoint that was just saved.
    """

    def __init__(self, accelerator: Accelerator, projector: CrispProjector, folder_name: str = PROJECTOR_DIR) -> None:
        self.accelerator = accelerator
        self.projector = projector
        self.folder_name = folder_name
        self._hooks: list[Any] = []

    def _writes_here(self) -> bool:
        on_each_node = getattr(self.accelerator.project_configuration, "save_on_each_node", False)
        return self.accelerator.is_local_main_process if on_each_node else self.accelerator.is_main_process

    def save(self, checkpoint: str | os.PathLike[str]) -> Path | None:
        """Write the projector into ``checkpoint`` on the writing process; ``None`` on the others."""
        if not self._writes_here():
            return None
        folder = Path(checkpoint) / self.folder_name
        # the weights change during training, so a hash would only make resuming warn; sharded bases are not
        # all here: the restored run recomputes them (sharded again) from the saved sums
        include_basis = not self.projector.bases_sharded
        return self.projector.save_pretrained(folder, include_basis=include_basis, hash_weights=False)

    def load(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore the projector from ``checkpoint`` (validated; ``FileNotFoundError`` without its folder)."""
        folder = Path(checkpoint) / self.folder_name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"checkpoint {checkpoint} holds no {self.folder_name} folder, so the projector cannot be restored: "
                "save checkpoints with accelerator.save_state after crisp_accelerate.register (earlier torch_crisp "
                "versions stored the projector as custom_checkpoint_<i>.pkl, a pickle, which is not loaded because "
                "it can run code)"
            )
        state_dict, _ = read_folder(folder)
        try:
            self.projector.load_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None

    def remove(self) -> None:
        """Stop saving and restoring the projector with the accelerator's checkpoints."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        _FOLDERS_IN_USE.get(self.accelerator, set()).discard(self.folder_name)


def register(
    accelerator: Accelerator, projector: CrispProjector, *, folder_name: str = PROJECTOR_DIR
) -> CheckpointedProjector:
    """Check the setup is supported and have ``save_state`` / ``load_state`` include the projector.

    ``save_state`` writes it to ``<checkpoint>/<folder_name>`` and ``load_state`` restores it in
    place, through Accelerate's save/load pre-hooks (see :class:`CheckpointedProjector`; the
    projector is not pickled). Register each projector of a run once, with its own
    ``folder_name``. Returns the :class:`CheckpointedProjector` (``.remove()`` undoes this).
    """
    check_supported(accelerator)
    if not isinstance(projector, CrispProjector):
        raise TypeError(f"expected a CrispProjector, got {type(projector).__name__}")
    if not folder_name or Path(folder_name).name != folder_name:
        raise ValueError(f"folder_name must be a plain folder name, got {folder_name!r}")
    in_use = _FOLDERS_IN_USE.setdefault(accelerator, set())
    if folder_name in in_use:
        raise ValueError(
            f"a projector is already registered with folder_name={folder_name!r} on this accelerator; "
            "register each projector with its own folder_name"
        )
    checkpointed = CheckpointedProjector(accelerator, projector, folder_name)
    # Accelerate calls save hooks as hook(models, weights, output_dir) and load hooks as
    # hook(models, input_dir), on every process, before its own files are written or read.
    checkpointed._hooks = [
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: checkpointed.save(output_dir)),
        accelerator.register_load_state_pre_hook(lambda models, input_dir: checkpointed.load(input_dir)),
    ]
    in_use.add(folder_name)
    return checkpointed


def _warn_if_accelerate_sees_one_process(accelerator: Accelerator) -> None:
    """Accelerate without ``cpu=True`` on a machine without GPUs reports one process under a 2-rank launch."""
    if accelerator.distributed_type != DistributedType.NO or not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    if world > 1:
        warn_user(
            f"Accelerate reports a single process (DistributedType.NO) but torch.distributed runs {world} ranks: "
            "the projector reduces its curvature over all of them while Accelerate neither shards your data nor "
            "synchronises your gradients. On a machine without GPUs launch with ACCELERATE_USE_CPU=1 (or build "
            "Accelerator(cpu=True))"
        )


def collect(
    accelerator: Accelerator,
    projector: CrispProjector,
    batches: Iterable[Any],
    *,
    shard: bool = True,
    resume_from: str | os.PathLike[str] | None = None,
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
        resume_from: the checkpoint folder a resumed run will ``load_state`` from. When it holds a
            saved projector (``crisp_projector``), the projector is restored from it and nothing is
            collected (the checkpoint's curvature is the run's; collecting again would only be
            overwritten by ``load_state``).
        **collect_kwargs: ``loss_fn``, ``max_batches`` (per process), ``weight``, ``progress``
            (default: only on the local main process).

    Every process must call this (it is a collective), also one whose shard is empty.
    """
    check_supported(accelerator)
    _warn_if_accelerate_sees_one_process(accelerator)
    if resume_from is not None and (Path(resume_from) / PROJECTOR_DIR).is_dir():
        CheckpointedProjector(accelerator, projector).load(resume_from)
        return projector
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
