"""Step overhead: ``CrispOptimizer(AdamW)`` versus plain ``AdamW``, against the bare projection matmuls.

    python benchmarks/step_overhead.py            # Llama hidden 256 / intermediate 1024 / 4 layers, 8×128 tokens
    python benchmarks/step_overhead.py --smoke    # tiny sizes, seconds (exercised by the tests)

One model, two optimizers over the same trainable parameters (the MLP down-projections, as in an
edit): a plain ``AdamW`` and ``CrispOptimizer(AdamW)``. Per round, each does a full training step
(forward, backward, step, zero_grad), and in the same round three more candidates run:

* ``project_``: ``projector.project_()`` alone on gradients already in place (what the wrapper adds);
* ``floor``: the bare float32 matmuls a projection needs, ``C = U_outᵀ Q U_in`` then
  ``U_out C U_inᵀ`` for every layer, on preallocated tensors;
* the phases of each step (forward+backward, optimizer step) separately, so that the difference of
  the two optimizer-step phases gives the overhead without the forward/backward noise.

Reported ratios (target ≤ 1.25): ``(crisp step − plain step) / floor`` from the full steps (the
issue's definition; noisiest), from the optimizer-step phases, and ``project_ / floor``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    benchmark_llama,
    interleave,
    lm_batches,
    matmul_rate,
    ms,
    print_table,
    run_from_command_line,
    write_result,
)

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector  # noqa: E402

FULL = {"hidden": 256, "intermediate": 1024, "layers": 4, "vocab": 1024, "batch": 8, "seq": 128, "rounds": 15}
SMOKE = {"hidden": 32, "intermediate": 64, "layers": 2, "vocab": 64, "batch": 2, "seq": 16, "rounds": 3}


def projection_flops(shapes: list[tuple[int, int]]) -> float:
    """``4·d_out·d_in·(d_out + d_in)`` per layer: two rotations of two products each."""
    return float(sum(4 * o * i * (o + i) for o, i in shapes))


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    sizes = dict(SMOKE if smoke else FULL)
    rounds = rounds or sizes["rounds"]
    model = benchmark_llama(sizes["hidden"], sizes["intermediate"], sizes["layers"], sizes["vocab"])
    capability = lm_batches(2, sizes["batch"], sizes["seq"], sizes["vocab"], seed=1)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
    projector.collect(capability, progress=False)

    trainable = [p for state in projector.layers.values() for p in state.geometry.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.train()
    plain = torch.optim.AdamW(trainable, lr=1e-6)
    crisp = CrispOptimizer(torch.optim.AdamW(trainable, lr=1e-6), projector)
    batch = lm_batches(1, sizes["batch"], sizes["seq"], sizes["vocab"], seed=2)[0]

    phase: dict[str, float] = {}

    def full_step(opt: torch.optim.Optimizer, tag: str) -> None:
        start = time.perf_counter()
        model(**batch).loss.backward()
        middle = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        phase[f"{tag}_fwd_bwd"] = middle - start
        phase[f"{tag}_opt_step"] = time.perf_counter() - middle

    # project_ alone and the floor run on gradients that stay in place: P is idempotent, so
    # projecting them again costs exactly what the first projection costs.
    model(**batch).loss.backward()
    grads = [p.grad.clone() for p in trainable]
    model.zero_grad(set_to_none=True)
    bases = [(s.basis.U_out, s.basis.U_in) for s in projector.layers.values()]
    shapes = [(s.geometry.d_out, s.geometry.d_in_augmented) for s in projector.layers.values()]
    floor_q = [g.clone() for g in grads]

    def project_only() -> None:
        for p, g in zip(trainable, grads):
            p.grad = g
        projector.project_()

    def floor() -> None:
        for (U_out, U_in), Q in zip(bases, floor_q):
            C = U_out.mT @ Q @ U_in
            U_out @ C @ U_in.mT

    phases = ("plain_fwd_bwd", "plain_opt_step", "crisp_fwd_bwd", "crisp_opt_step")
    samples: dict[str, list[float]] = {k: [] for k in phases}

    def recorded(opt: torch.optim.Optimizer, tag: str):
        def fn() -> None:
            full_step(opt, tag)
            samples[f"{tag}_fwd_bwd"].append(phase[f"{tag}_fwd_bwd"])
            samples[f"{tag}_opt_step"].append(phase[f"{tag}_opt_step"])

        return fn

    timings = interleave(
        {
            "plain_step": recorded(plain, "plain"),
            "crisp_step": recorded(crisp, "crisp"),
            "project_": project_only,
            "floor": floor,
        },
        rounds=rounds,
        warmup=2,
    )
    for key in samples:  # drop the warm-up rounds recorded by the phase timers
        samples[key] = samples[key][-rounds:]
    for p in trainable:
        p.grad = None
    timings.samples.update(samples)

    floor_s = timings.median("floor")
    extra_full = timings.paired_median_difference("crisp_step", "plain_step")
    extra_phase = timings.paired_median_difference("crisp_opt_step", "plain_opt_step")
    rate = matmul_rate(512 if smoke else 1024)
    flops = projection_flops(shapes)
    result = {
        "sizes": sizes,
        "layers": [{"d_out": o, "d_in": i} for o, i in shapes],
        "projection_flops_per_step": flops,
        "matmul_rate_flops": rate,
        "floor_fraction_of_matmul_rate": flops / floor_s / rate,
        "timings": timings.summary(),
        "extra_full_step_s": extra_full,
        "extra_opt_step_phase_s": extra_phase,
        "ratio_full_step_over_floor": extra_full / floor_s,
        "ratio_opt_step_phase_over_floor": extra_phase / floor_s,
        "ratio_project_over_floor": timings.median("project_") / floor_s,
        "overhead_fraction_of_plain_step": extra_full / timings.median("plain_step"),
        "target_ratio": 1.25,
    }
    write_result("step_overhead_smoke" if smoke else "step_overhead", result, out_dir)
    print_table(
        f"step overhead ({len(shapes)} × down_proj {shapes[0][0]}×{shapes[0][1]}, "
        f"{sizes['batch']}×{sizes['seq']} tokens, {rounds} rounds, medians)",
        [
            ("plain AdamW step", ms(timings.median("plain_step"))),
            ("CrispOptimizer(AdamW) step", ms(timings.median("crisp_step"))),
            ("project_() alone", ms(timings.median("project_"))),
            ("floor: bare projection matmuls", ms(floor_s)),
            ("(crisp − plain) / floor, full steps", f"{result['ratio_full_step_over_floor']:.2f}"),
            ("(crisp − plain) / floor, optimizer-step phase", f"{result['ratio_opt_step_phase_over_floor']:.2f}"),
            ("project_ / floor", f"{result['ratio_project_over_floor']:.2f}"),
            ("overhead / plain step", f"{result['overhead_fraction_of_plain_step']:.1%}"),
        ],
    )
    return result


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
