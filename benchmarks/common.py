"""Shared helpers of the benchmarks: interleaved timing, the benchmark model, JSON output.

Absolute times on a shared CPU are noise; what these scripts report are **ratios of two things
timed side by side in the same process**. :func:`interleave` runs every candidate once per round,
in a rotating order (so no candidate always runs first, right after a cache-cold phase or another
agent's burst), and the medians over rounds are compared. Nothing here downloads anything: models
are built from configs with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on the CPU) so that wall-clock times mean something."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Seconds per call of each candidate, one entry per round (same round = same moment)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def paired_median_difference(self, a: str, b: str) -> float:
        """Median over rounds of ``t_a - t_b``: both ran within the same round, so a slow round
        (another process on the cores) shifts both and cancels, unlike a difference of medians."""
        return statistics.median(x - y for x, y in zip(self.samples[a], self.samples[b]))

    def paired_median_ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``t_a / t_b`` (each ratio taken within one round)."""
        return statistics.median(x / y for x, y in zip(self.samples[a], self.samples[b]))

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "median_s": statistics.median(values),
                "min_s": min(values),
                "max_s": max(values),
                "rounds": len(values),
            }
            for name, values in self.samples.items()
        }


def interleave(
    candidates: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    inner: int = 1,
) -> Timings:
    """Time each candidate ``rounds`` times, one call of each per round, in a rotating order.

    Args:
        candidates: name -> zero-argument callable (the thing being timed, nothing else).
        rounds: number of rounds (the median is taken over them).
        warmup: untimed rounds first (allocator, thread pool and lazy initialisation).
        device: synchronised around each call when it is a CUDA device.
        inner: calls per timed sample (for very short candidates); the sample is their mean.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    sync(device)
    timings = Timings({name: [] for name in names})
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = candidates[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            timings.samples[name].append((time.perf_counter() - start) / inner)
    return timings


def matmul_rate(n: int = 1024, rounds: int = 5, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Measured FLOP/s of one ``n × n`` by ``n × n`` matrix product (``2 n³`` FLOPs), median of rounds."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = interleave({"mm": lambda: torch.mm(a, b, out=out)}, rounds=rounds, warmup=1, device=device)
    return 2.0 * n**3 / t.median("mm")


def benchmark_llama(
    hidden: int = 256,
    intermediate: int = 1024,
    layers: int = 4,
    vocab: int = 1024,
    max_positions: int = 512,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised Llama (Hugging Face ``LlamaForCausalLM``) built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def lm_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random causal-LM batches without padding (labels = input ids, as for a capability corpus)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def environment() -> dict[str, Any]:
    """What a number depends on: library versions, threads and the machine."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` with the payload, the environment and the command line."""
    out_dir = RESULTS if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {
        "benchmark": name,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "environment": environment(),
        **payload,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table on stdout."""
    width = max(len(k) for k, _ in rows) if rows else 0
    print(f"\n{title}")
    print("-" * len(title))
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads and return it.

    The default of the scripts is 1: on a CPU shared with other processes, OpenMP's barriers make
    multi-threaded kernels wait for a descheduled thread, which swamps every ratio with noise
    (measured here: 8 products of 32×64 matrices took 160 ms with 2 threads on 2 busy cores).
    """
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def benchmark_parser(doc: str, *, rounds: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark script shares: ``--smoke``, ``--rounds``, ``--out``, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few rounds")
    if rounds:
        parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, see set_threads)")
    return parser


def run_from_command_line(run: Callable[..., Any], doc: str, argv: list[str] | None) -> None:
    """``main()`` of a script whose ``run(smoke, rounds, out_dir)`` takes only the shared options."""
    args = benchmark_parser(doc).parse_args(argv)
    set_threads(args.threads)
    run(smoke=args.smoke, rounds=args.rounds, out_dir=args.out)


def change_in_blocked_directions(projector: Any, start: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How much of each target weight's change since ``start`` lies in blocked directions.

    ``leak``: the largest ``‖blocked part‖ / ‖Ũ‖`` over the layers (``Ũ = U_outᵀ (W − W_start) U_in``);
    ``predicted_increase``: K-FAC's ``½ Σ c Ũ²`` of the whole change; ``blocked_predicted_increase``:
    the same over the blocked directions only. Computed in float64 from the stored weights.
    """
    leak, predicted, blocked_predicted = 0.0, 0.0, 0.0
    for name, state in projector.layers.items():
        basis = state.basis
        delta = state.geometry.weight.detach().double() - start[name].double()
        rotated = basis.U_out.double().mT @ delta @ basis.U_in.double()
        curvature = state.curvature_grid().double()
        blocked = rotated * (~basis.mask)
        leak = max(leak, float(blocked.norm() / rotated.norm().clamp_min(1e-300)))
        predicted += 0.5 * float((curvature * rotated.square()).sum())
        blocked_predicted += 0.5 * float((curvature * blocked.square()).sum())
    return {"leak": leak, "predicted_increase": predicted, "blocked_predicted_increase": blocked_predicted}
