"""How much of the cumulative change of bf16 weights lands in blocked directions, before and after ``W₀``.

    python benchmarks/bf16_drift.py            # 200 AdamW steps at three learning rates, ~1 minute
    python benchmarks/bf16_drift.py --smoke

Three runs of the same update-mode training from the same collected projector, side by side:

* ``per_step_bf16`` — the previous update mode: each step's change ``Δ`` is projected and added to
  the bf16 weights, ``W ← round(W_before + P(Δ))``; every step's rounding error has a part in
  blocked directions, and those parts add up over the steps;
* ``anchored_bf16`` — ``CrispOptimizer(mode="update")`` now: ``W ← round(W₀ + P(W − W₀))`` with ``W₀``
  kept in float32, so only the last rounding remains;
* ``anchored_fp32`` — the same in float32 (rounding ~1e-7).

Reported per run: the leak ``‖D − P(D)‖ / ‖D‖`` of the cumulative change ``D = W_final − W_start``
(largest over the projected layers), and the curvature-weighted prediction ``½ Σ c Ũ²`` of ``D``
and of its blocked part, which is what would damage the capability.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    benchmark_llama,
    change_in_blocked_directions,
    lm_batches,
    print_table,
    run_from_command_line,
    write_result,
)

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector, functional  # noqa: E402

TARGETS = ["mlp.down_proj"]


def _setup(dtype: torch.dtype, smoke: bool):
    model = benchmark_llama(hidden=64 if smoke else 128, intermediate=128 if smoke else 512, layers=2, vocab=256)
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.99))
    projector.collect(lm_batches(4 if smoke else 16, 8, 32, 256, seed=0), progress=False)  # in float32
    model.to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in TARGETS))
    return model, projector


def run_one(kind: str, lr: float, steps: int, smoke: bool) -> dict[str, float]:
    dtype = torch.float32 if kind.endswith("fp32") else torch.bfloat16
    model, projector = _setup(dtype, smoke)
    start = {n: s.geometry.weight.detach().double().clone() for n, s in projector.layers.items()}
    params = projector.projected_parameters()
    inner = torch.optim.AdamW(params, lr=lr)
    optimizer = CrispOptimizer(inner, projector, mode="update") if kind.startswith("anchored") else inner
    batches = lm_batches(steps, 4, 32, 256, seed=1)
    for batch in batches:
        model(**batch).loss.backward()
        if kind == "per_step_bf16":
            before = [p.detach().clone() for p in params]
            inner.step()
            with torch.no_grad():
                for state, old in zip(projector.layers.values(), before):
                    basis = state.basis
                    step = (state.geometry.weight.detach().float() - old.float())
                    projected = functional.project(step, basis.U_out, basis.U_in, basis.mask)
                    state.geometry.weight.copy_(old.float() + projected)
        else:
            optimizer.step()
        optimizer.zero_grad()
    return change_in_blocked_directions(projector, start)


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict:
    steps = rounds or (10 if smoke else 200)
    rows, results = [], {}
    for lr in ((1e-3,) if smoke else (1e-4, 1e-3, 1e-2)):
        for kind in ("per_step_bf16", "anchored_bf16", "anchored_fp32"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                measured = run_one(kind, lr, steps, smoke)
            results[f"{kind}@lr={lr:g}"] = measured
            summary = (f"leak {measured['leak']:.2e}   predicted {measured['predicted_increase']:.3e}   "
                       f"of it blocked {measured['blocked_predicted_increase']:.3e}")
            rows.append((f"{kind:>14} lr {lr:g}", summary))
    print_table(f"cumulative change after {steps} AdamW steps (update mode)", rows)
    payload = {"steps": steps, "targets": TARGETS, "gamma": 0.99, "results": results}
    write_result("bf16_drift", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
