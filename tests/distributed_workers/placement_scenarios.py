"""Scenarios of core_worker.py (same torchrun launch): sharded bases (MEM-OPT) and the low-rank step under DDP.

Every variant trains the same tiny GPT-2 under DDP on the same data, so their parameters can be
compared bit for bit: ``basis_placement="sharded"`` against ``"replicated"`` in grad and update mode,
and grad mode's low-rank step (``low_rank="always"``, factors all-gathered over the ranks) against
the dense path, replicated and sharded. Also: what a sharded projector refuses, the ``"auto"``
decision, and loading a projector in a sharded run.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import lm_batch, tiny_gpt2
from torch.nn.parallel import DistributedDataParallel

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector, distributed
from torch_crisp.basis import RemoteBasis
from torch_crisp.editing.loop import train_only
from torch_crisp.memory import held_bytes

TARGETS = ["mlp.c_proj", "attn.c_attn"]


def _digest(t: torch.Tensor) -> str:
    import hashlib

    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _train(rank: int, world: int, mode: str, placement: str, low_rank: str) -> dict:
    config = CrispConfig(target_modules=TARGETS, gamma=0.9, basis_placement=placement)
    model = tiny_gpt2(seed=1).eval()
    projector = CrispProjector(model, config)
    trainable = train_only(model, projector.target_names)
    ddp = DistributedDataParallel(model)
    projector.collect([lm_batch(seed, batch=2, seq=10) for seed in range(4)][rank::world], progress=False)
    inner = torch.optim.SGD(trainable, lr=0.5) if mode == "grad" else torch.optim.AdamW(trainable, lr=1e-2,
                                                                                       weight_decay=0.1)
    optimizer = CrispOptimizer(inner, projector, mode=mode, low_rank=low_rank)
    low_rank_layers, broadcast, first_projected, first_raw = [], [], {}, {}
    for step in range(3):
        # 2 rows of 6 positions, one padded: each rank holds one row, i.e. fewer tokens than any layer's cap
        batch = {k: v[rank::world] for k, v in lm_batch(70 + step, batch=2, seq=6, pad_rows=1).items()}
        ddp(**batch).loss.backward()
        if step == 0 and mode == "grad":
            first_raw = _grad_matrices(projector)
        optimizer.step()
        low_rank_layers.append(sorted(projector.last_projection.low_rank))
        broadcast.append(projector.last_projection.broadcast_bytes)
        if step == 0 and mode == "grad":  # the projected gradients of the first step: same weights in every run
            first_projected = _grad_matrices(projector)
        optimizer.zero_grad()
    optimizer.close()
    return {
        "projector": projector,
        "params": {n: _digest(p) for n, p in model.named_parameters()},
        "values": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "first_projected": first_projected,
        "first_raw": first_raw,
        "low_rank": low_rank_layers,
        "broadcast_bytes": broadcast,
        "sharded": projector.bases_sharded,
        "remote": sorted(n for n, s in projector.layers.items() if isinstance(s.basis, RemoteBasis)),
        "held_bytes": sum(held_bytes(s) for s in projector.layers.values()),
        "kept": projector.kept_fraction(),
        "matrix_bytes": sum(4 * s.geometry.d_out * s.geometry.d_in_augmented for s in projector.layers.values()),
    }


def _refusals(projector: CrispProjector, out_dir: Path) -> dict:
    found = {}
    for what, call in (
        ("save_with_basis", lambda: projector.save_pretrained(out_dir / "never", include_basis=True)),
        ("state_dict_with_basis", lambda: projector.state_dict(include_basis=True)),
        ("set_gamma", lambda: projector.set_gamma(0.95)),
        ("remote_U_in", lambda: next(s.basis for s in projector.layers.values()
                                     if isinstance(s.basis, RemoteBasis)).U_in),
    ):
        try:
            call()
            found[what] = "no error"
        except ValueError as err:
            found[what] = str(err)
    found["state_dict_without_basis"] = len(projector.state_dict()["layers"])
    return found


def scenario_placement(rank: int, world: int, result: dict, out_dir: Path) -> None:
    entry: dict = {}
    result["placement"] = entry
    try:
        runs = {}
        for mode, low_rank in (("grad", "off"), ("grad", "always"), ("update", "off")):
            for placement in ("replicated", "sharded"):
                runs[f"{mode}_{low_rank}_{placement}"] = _train(rank, world, mode, placement, low_rank)
        for key, run in runs.items():
            entry[key] = {k: v for k, v in run.items()
                          if k not in ("projector", "values", "first_projected", "first_raw")}
        for placement in ("replicated", "sharded"):
            # P([∂W|∂b]) of the first step (same weights in every run), relative to ‖P‖ floored at 10 % of ‖Q‖
            dense, raw = runs[f"grad_off_{placement}"]["first_projected"], runs[f"grad_off_{placement}"]["first_raw"]
            low = runs[f"grad_always_{placement}"]["first_projected"]
            entry[f"low_rank_vs_dense_{placement}"] = max(
                float((low[n] - dense[n]).norm() / max(dense[n].norm(), 0.1 * raw[n].norm())) for n in dense
            )
        entry["refusals"] = _refusals(runs["grad_off_sharded"]["projector"], out_dir)
        entry["auto"] = _auto_decisions(rank, world)
        entry["loaded"] = _load_sharded(rank, world, runs["grad_off_replicated"]["projector"], out_dir)
    except Exception as err:  # recorded so the test can show what happened
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc()[-3000:]


def _auto_decisions(rank: int, world: int) -> dict:
    """``"auto"``: replicated on the CPU (no memory limit known), sharded when the device memory is short."""
    decisions = {}
    original = distributed.free_device_memory
    for label, free in (("cpu", None), ("short_memory", 1.0)):
        if free is not None:
            distributed.free_device_memory = lambda device, free=free: free
        try:
            projector = CrispProjector(tiny_gpt2(seed=1).eval(), CrispConfig(target_modules=TARGETS, gamma=0.9))
            projector.collect([lm_batch(seed, batch=2, seq=10) for seed in range(4)][rank::world], progress=False)
            decisions[label] = projector.bases_sharded
        finally:
            distributed.free_device_memory = original
    return decisions


def _load_sharded(rank: int, world: int, trained: CrispProjector, out_dir: Path) -> dict:
    """A resumed sharded run loads sums only (a collective: each rank computes its own bases) or full bases."""
    folders = {"sums": out_dir / "sums_only", "bases": out_dir / "with_bases"}
    if rank == 0:
        trained.save_pretrained(folders["sums"], hash_weights=False)
        trained.save_pretrained(folders["bases"], include_basis=True, hash_weights=False)
    dist.barrier()
    loaded = {}
    for key, folder in folders.items():
        config = CrispConfig(target_modules=TARGETS, gamma=0.9, basis_placement="sharded")
        projector = CrispProjector(tiny_gpt2(seed=1).eval(), config)
        projector.load_state_dict(CrispProjector.from_pretrained(folder, tiny_gpt2(seed=1).eval()).state_dict(
            include_basis=key == "bases"))
        loaded[key] = {
            "sharded": projector.bases_sharded,
            "remote": sorted(n for n, s in projector.layers.items() if isinstance(s.basis, RemoteBasis)),
            "kept": projector.kept_fraction(),
        }
    loaded["kept_trained"] = trained.kept_fraction()
    return loaded


def _grad_matrices(projector: CrispProjector) -> dict:
    """Every layer's ``[∂W | ∂b]`` (float64 copies)."""
    return {n: s.geometry.as_matrix(s.geometry.weight.grad, s.geometry.bias.grad if s.geometry.has_bias else None)
            .double().clone() for n, s in projector.layers.items()}
