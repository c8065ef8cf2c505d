"""Scaling of one projection with the layer shape, against its FLOP count and the machine's matmul rate.

    python benchmarks/scaling.py            # square 256…2048 and LLM shapes at reduced scale
    python benchmarks/scaling.py --smoke    # tiny shapes (exercised by the tests)

For each shape ``(d_out, d_in)``, on random orthonormal bases, a rank-16 random gradient and the
K-FAC mask of decaying random spectra at ``γ = 0.99``, these run interleaved:

* ``project``: :func:`torch_crisp.functional.project` (boolean mask, float32);
* ``floor``: the bare products ``C = U_outᵀ Q U_in; U_out C U_inᵀ``;
* ``float_mask``: the same with the mask stored as a float32 multiplier instead of a boolean;
* ``bf16_grad``: ``project`` of a bfloat16 gradient with float32 bases (the library's mixed path);
* ``bf16_all``: bfloat16 bases and gradient (products in bfloat16);
* ``low_rank_rotation``: when the step's gradient is ``Q = Gᵀ X`` over ``T`` tokens (an edit of
  a few tokens), the first rotation ``U_outᵀ Q U_in = (G U_out)ᵀ (X U_in)`` costs
  ``2T(d_out² + d_in² + d_out·d_in)`` instead of ``2 d_out d_in (d_out + d_in)``; this is that
  rotation followed by the usual back-rotation (a measured possibility, not the library's path).

The FLOP count of a projection is ``4·d_out·d_in·(d_out + d_in)``; the achieved rate is reported
as a fraction of the rate of a square float32 product (1024²) timed in the same rounds (median of
per-round ratios, so load drift cancels).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, run_from_command_line, write_result  # noqa: E402

from torch_crisp import functional  # noqa: E402

# LLM shapes on the CPU: 1024×4096 (a 1B-class model's MLP) itself and halved, and LLaMA-3-8B's
# down_proj 4096×14336 at a quarter of each side.
FULL_SHAPES = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (512, 2048), (1024, 3584), (1024, 4096)]
SMOKE_SHAPES = [(16, 16), (16, 48)]
EDIT_TOKENS = 16


def orthonormal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q.contiguous()


def flops(d_out: int, d_in: int) -> float:
    return 4.0 * d_out * d_in * (d_out + d_in)


def measure_shape(d_out: int, d_in: int, rounds: int, reference_n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(d_out * 7919 + d_in)
    # the machine's rate is measured in the same rounds (a square product), since the load of a
    # shared machine drifts between shapes
    ref_a = torch.randn(reference_n, reference_n, generator=g)
    ref_b = torch.randn(reference_n, reference_n, generator=g)
    U_out, U_in = orthonormal(d_out, g), orthonormal(d_in, g)
    # the kept set of K-FAC in the eigenbases' (ascending) order: a staircase, as in real layers;
    # a random mask of the same density costs more to apply (see docs/performance.md)
    eig_out = torch.sort(torch.rand(d_out, generator=g, dtype=torch.float64) ** 6).values
    eig_in = torch.sort(torch.rand(d_in, generator=g, dtype=torch.float64) ** 6).values
    mask = functional.low_curvature_mask(eig_out, eig_in, 0.99)
    float_mask = mask.float()
    G = torch.randn(EDIT_TOKENS, d_out, generator=g)
    X = torch.randn(EDIT_TOKENS, d_in, generator=g)
    Q = G.mT @ X
    Q_bf16 = Q.bfloat16()
    U_out_bf16, U_in_bf16, mask_bf16 = U_out.bfloat16(), U_in.bfloat16(), float_mask.bfloat16()

    def floor() -> None:
        C = U_out.mT @ Q @ U_in
        U_out @ C @ U_in.mT

    def with_float_mask() -> None:
        C = U_out.mT @ Q @ U_in
        C.mul_(float_mask)
        U_out @ C @ U_in.mT

    def bf16_all() -> None:
        C = U_out_bf16.mT @ Q_bf16 @ U_in_bf16
        C.mul_(mask_bf16)
        U_out_bf16 @ C @ U_in_bf16.mT

    def low_rank_rotation() -> None:
        C = (G @ U_out).mT @ (X @ U_in)
        C.masked_fill_(~mask, 0)
        U_out @ C @ U_in.mT

    timings = interleave(
        {
            "project": lambda: functional.project(Q, U_out, U_in, mask),
            "floor": floor,
            "float_mask": with_float_mask,
            "bf16_grad": lambda: functional.project(Q_bf16, U_out, U_in, mask),
            "bf16_all": bf16_all,
            "low_rank_rotation": low_rank_rotation,
            "square_mm": lambda: ref_a @ ref_b,
        },
        rounds=rounds,
        warmup=1,
        # small shapes: repeat each call so that a sample lasts ~20 ms and timer/scheduler noise
        # fades (at most 100 calls: the smoke shapes would otherwise loop for minutes)
        inner=min(100, max(1, int(0.02 / (flops(d_out, d_in) / 1e11)))),
    )
    reference = functional.project(Q.double(), U_out.double(), U_in.double(), mask)
    bf16_result = (U_out_bf16 @ ((U_out_bf16.mT @ Q_bf16 @ U_in_bf16) * mask_bf16) @ U_in_bf16.mT).double()
    ref_flops = 2.0 * reference_n**3
    return {
        "d_out": d_out,
        "d_in": d_in,
        "flops": flops(d_out, d_in),
        "achieved_fraction_project": flops(d_out, d_in) / ref_flops / timings.paired_median_ratio(
            "project", "square_mm"
        ),
        "achieved_fraction_floor": flops(d_out, d_in) / ref_flops / timings.paired_median_ratio("floor", "square_mm"),
        "matmul_rate_flops": ref_flops / timings.median("square_mm"),
        "timings": timings.summary(),
        "ratio_project_over_floor": timings.paired_median_ratio("project", "floor"),
        "ratio_float_mask_over_floor": timings.paired_median_ratio("float_mask", "floor"),
        "ratio_bf16_grad_over_floor": timings.paired_median_ratio("bf16_grad", "floor"),
        "ratio_bf16_all_over_floor": timings.paired_median_ratio("bf16_all", "floor"),
        "ratio_low_rank_over_floor": timings.paired_median_ratio("low_rank_rotation", "floor"),
        "relative_error_fp32": float(
            (functional.project(Q, U_out, U_in, mask).double() - reference).norm() / reference.norm()
        ),
        "relative_error_bf16_all": float((bf16_result - reference).norm() / reference.norm()),
    }


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    rounds = rounds or (2 if smoke else 5)
    reference_n = 256 if smoke else 1024
    rows = [measure_shape(o, i, rounds, reference_n) for o, i in shapes]
    rate = statistics.median(row["matmul_rate_flops"] for row in rows)
    result = {"matmul_rate_flops": rate, "matmul_reference": f"{reference_n}x{reference_n} float32 product",
              "edit_tokens_for_low_rank": EDIT_TOKENS, "shapes": rows}
    write_result("scaling_smoke" if smoke else "scaling", result, out_dir)
    print(f"\nmatmul rate (float32, {reference_n}² product, median over shapes): {rate / 1e9:.1f} GFLOP/s")
    header = (f"{'d_out×d_in':>11} {'GFLOP':>7} {'project':>9} {'frac':>5} {'P/floor':>7} {'fmask':>6} "
              f"{'bf16g':>6} {'bf16':>6} {'lowrk':>6}")
    print(header)
    for r in rows:
        t = r["timings"]["project"]["median_s"]
        print(f"{r['d_out']:>5}×{r['d_in']:<5} {r['flops'] / 1e9:7.2f} {t * 1e3:7.1f}ms "
              f"{r['achieved_fraction_project']:5.2f} {r['ratio_project_over_floor']:7.2f} "
              f"{r['ratio_float_mask_over_floor']:6.2f} {r['ratio_bf16_grad_over_floor']:6.2f} "
              f"{r['ratio_bf16_all_over_floor']:6.2f} {r['ratio_low_rank_over_floor']:6.2f}")
    return result


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
