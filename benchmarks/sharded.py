"""Sharded bases (MEM-OPT) against replicated ones on two gloo ranks: bytes and time per step, side by side.

    python benchmarks/sharded.py            # 4 layers of 512×2048 and 2 of 1024×4096, power-law spectra
    python benchmarks/sharded.py --smoke    # tiny layers (the tests run this)

Two processes (``torch.multiprocessing``, gloo on the CPU, one thread each) hold the same layers,
the same bases (power laws ``λ_k = k^-1.5``, γ = 0.9, random orthonormal eigenvectors; ``spectra.py``)
and the same gradients, as DDP leaves them after its all-reduce. Per round, interleaved in a
rotating order, each rank times (the reported time of a candidate is the slower rank's):

* ``replicated``: ``projector.project_()`` with every basis on every rank (each rank projects every
  layer; no communication);
* ``sharded``: the same with ``basis_placement="sharded"`` (each rank projects the layers whose
  basis it holds and broadcasts the projected gradients; the others receive them);
* ``broadcast``: the sharded step's broadcasts alone (the same tensors from the same owners);
* ``all-reduce``: one all-reduce of all the gradients, what DDP already spends per step, for scale.

Both projection paths are measured: ``projection="auto"`` (the complement path on these spectra)
and ``projection="full"`` (four dense products per layer, the most compute to split). Reported per
step: bytes broadcast and all-reduced, medians of the times and of the per-round ratios to the
replicated step, the bases each rank holds, and whether both placements gave bit-identical
gradients.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, set_threads, write_result  # noqa: E402
from spectra import power_law_basis  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402
from torch_crisp.memory import held_bytes  # noqa: E402

SHAPES = [(512, 2048)] * 4 + [(1024, 4096)] * 2
SMOKE_SHAPES = [(24, 96)] * 3 + [(48, 64)]
CANDIDATES = ("replicated", "sharded", "broadcast", "all-reduce")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _projector(shapes: list[tuple[int, int]], projection: str, placement: str) -> tuple[CrispProjector, nn.Module]:
    """Linear layers (no bias) with power-law bases, identical on every rank, placed as asked."""
    model = nn.Sequential(*[nn.Linear(d_in, d_out, bias=False) for d_out, d_in in shapes])
    projector = CrispProjector(model, CrispConfig(target_modules="all-linear", projection=projection,
                                                  basis_placement=placement))
    for i, (state, (d_out, d_in)) in enumerate(zip(projector.layers.values(), shapes)):
        state.basis = power_law_basis(d_out, d_in, 0.9, seed=i)
    if placement == "sharded":
        projector.sync.place_loaded(projector.layers, "kfac", projection)  # each rank keeps its owners' bases
    return projector, model


def _measure(shapes: list[tuple[int, int]], grads: list[torch.Tensor], projection: str, rounds: int) -> dict:
    """One projection path: the four candidates interleaved, on this rank (a collective throughout)."""
    replicated, model_r = _projector(shapes, projection, "replicated")
    sharded, model_s = _projector(shapes, projection, "sharded")
    owners = list(sharded.sync.owners.values())

    def load(model: nn.Module) -> None:
        for layer, grad in zip(model, grads):
            layer.weight.grad = grad.clone()

    def broadcasts() -> None:
        works = [dist.broadcast(layer.weight.grad, src=owner, async_op=True) for layer, owner in zip(model_s, owners)]
        for work in works:
            work.wait()

    def all_reduce() -> None:
        works = [dist.all_reduce(layer.weight.grad, async_op=True) for layer in model_s]
        for work in works:
            work.wait()

    candidates = {"replicated": (model_r, replicated.project_), "sharded": (model_s, sharded.project_),
                  "broadcast": (model_s, broadcasts), "all-reduce": (model_s, all_reduce)}
    samples: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for r in range(rounds + 1):  # round 0 warms up
        for name in CANDIDATES[r % 4:] + CANDIDATES[: r % 4]:
            model, fn = candidates[name]
            load(model)
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slower rank is done
            if r:
                samples[name].append(float(elapsed))
    load(model_r), load(model_s)
    replicated.project_()
    sharded.project_()
    return {
        "median_s": {name: statistics.median(v) for name, v in samples.items()},
        "ratio_over_replicated": {name: statistics.median(x / y for x, y in zip(v, samples["replicated"]))
                                  for name, v in samples.items()},
        "broadcast_bytes_per_step": sharded.last_projection.broadcast_bytes,
        "all_reduce_bytes_per_step": sum(4 * d_out * d_in for d_out, d_in in shapes),
        "bases_bytes_per_rank": {"replicated": sum(held_bytes(s) for s in replicated.layers.values()),
                                 "sharded": sum(held_bytes(s) for s in sharded.layers.values())},
        "owners": dict(sharded.sync.owners),
        "bit_identical": all(torch.equal(a.weight.grad, b.weight.grad) for a, b in zip(model_r, model_s)),
    }


def _rank(rank: int, world: int, port: int, smoke: bool, rounds: int, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        shapes = SMOKE_SHAPES if smoke else SHAPES
        g = torch.Generator().manual_seed(0)
        grads = [torch.randn(d_out, d_in, generator=g) for d_out, d_in in shapes]
        results = {projection: _measure(shapes, grads, projection, rounds) for projection in ("auto", "full")}
        if rank == 0:
            queue.put(results)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None, threads: int = 1) -> dict:
    rounds = rounds or (2 if smoke else 7)
    # forked, not spawned: the ranks start in a second instead of importing torch again (one thread each,
    # set before any parallel region runs in them)
    context = mp.get_context("fork")
    queue = context.SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    mp.start_processes(_rank, args=(2, _free_port(), smoke, rounds, queue), nprocs=2, join=True,
                       start_method="fork")
    per_projection = queue.get()
    shapes = SMOKE_SHAPES if smoke else SHAPES
    result = {"world_size": 2, "backend": "gloo", "shapes": shapes, "rounds": rounds, "projections": per_projection}
    write_result("sharded_smoke" if smoke else "sharded", result, out_dir)
    for projection, m in per_projection.items():
        t, r, bases = m["median_s"], m["ratio_over_replicated"], m["bases_bytes_per_rank"]
        print(f"projection={projection!r}: per step replicated {t['replicated'] * 1e3:.1f} ms, sharded "
              f"{t['sharded'] * 1e3:.1f} ms ({r['sharded']:.2f}×), broadcast alone {t['broadcast'] * 1e3:.1f} ms "
              f"({m['broadcast_bytes_per_step'] / 2**20:.1f} MiB), all-reduce {t['all-reduce'] * 1e3:.1f} ms "
              f"({m['all_reduce_bytes_per_step'] / 2**20:.1f} MiB); bases per rank "
              f"{bases['replicated'] / 2**20:.1f} → {bases['sharded'] / 2**20:.1f} MiB; "
              f"bit-identical {m['bit_identical']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = benchmark_parser(__doc__).parse_args(argv)
    set_threads(args.threads)
    return run(args.smoke, args.rounds, args.out, args.threads)


if __name__ == "__main__":
    main()
