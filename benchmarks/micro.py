"""Micro-benchmarks behind two design choices: how the mask is applied, and the bias column.

    python benchmarks/micro.py            # 256×1024 and 1024×1024
    python benchmarks/micro.py --smoke    # tiny sizes

* **mask**: zeroing the blocked entries of a rotated gradient ``C`` — ``masked_fill_(~mask)`` (the
  library), ``mul_`` by the boolean mask, ``mul_`` by a stored float32 copy of the mask — for a
  random mask and for the staircase mask K-FAC produces (eigenvalues ascending), beside a plain
  ``clone`` of ``C`` (every variant clones, so that they all start from the same values).
* **bias**: ``projector.project_()`` on a 256×1024 ``nn.Linear`` with and without a bias, each
  against the bare products of its own shape: the bias costs one ``torch.cat`` of the gradient
  matrix per step, and this shows whether that is visible.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleave, run_from_command_line, write_result  # noqa: E402

from torch_crisp import (  # noqa: E402
    CrispConfig,
    CrispProjector,
    functional,  # noqa: E402
)


def mask_variants(d_out: int, d_in: int, rounds: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    eig_out = torch.sort(torch.rand(d_out, generator=g, dtype=torch.float64) ** 6).values
    eig_in = torch.sort(torch.rand(d_in, generator=g, dtype=torch.float64) ** 6).values
    rows = []
    for kind, mask in (("random", torch.rand(d_out, d_in, generator=g) < 0.5),
                       ("kfac_staircase", functional.low_curvature_mask(eig_out, eig_in, 0.99))):
        C = torch.randn(d_out, d_in, generator=g)
        float_mask = mask.float()
        timings = interleave(
            {
                "masked_fill_not_mask": lambda C=C, m=mask: C.clone().masked_fill_(~m, 0),
                "mul_bool": lambda C=C, m=mask: C.clone().mul_(m),
                "mul_float": lambda C=C, f=float_mask: C.clone().mul_(f),
                "clone": lambda C=C: C.clone(),
            },
            rounds=rounds, warmup=2, inner=20,
        )
        rows.append({"d_out": d_out, "d_in": d_in, "mask": kind, "kept_fraction": float(mask.float().mean()),
                     "timings": timings.summary()})
        medians = {k: f"{timings.median(k) * 1e6:.0f} µs" for k in timings.samples}
        print(f"mask {d_out}×{d_in} {kind:<15} {medians}")
    return rows


def bias_column(d_out: int, d_in: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for bias in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias), nn.Tanh(), nn.Linear(d_out, 8))
        data = [(torch.randn(512, d_in), torch.randint(0, 8, (512,)))]
        projector = CrispProjector(model, CrispConfig(target_modules=["0"]))
        projector.collect(
            data, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"), progress=False
        )
        model(data[0][0]).sum().backward()
        state = projector.layers["0"]
        basis = state.basis
        Q = state.geometry.as_matrix(model[0].weight.grad, model[0].bias.grad if bias else None).clone()

        def floor(basis=basis, Q=Q) -> None:
            C = basis.U_out.mT @ Q @ basis.U_in
            basis.U_out @ C @ basis.U_in.mT

        timings = interleave({"project_": projector.project_, "floor": floor}, rounds=rounds, warmup=2)
        ratio = timings.paired_median_ratio("project_", "floor")
        rows.append({"d_out": d_out, "d_in": d_in, "bias": bias, "timings": timings.summary(),
                     "ratio_project_over_floor": ratio})
        print(f"bias={bias!s:<5} {d_out}×{d_in}: project_ / bare products = {ratio:.3f}")
    return rows


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    shapes = [(16, 48)] if smoke else [(256, 1024), (1024, 1024)]
    rounds = rounds or (2 if smoke else 15)
    masks = [row for d_out, d_in in shapes for row in mask_variants(d_out, d_in, rounds)]
    bias = bias_column(*((16, 48) if smoke else (256, 1024)), rounds=rounds if smoke else 21)
    result = {"mask": masks, "bias": bias}
    write_result("micro_smoke" if smoke else "micro", result, out_dir)
    return result


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
