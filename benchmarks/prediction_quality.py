"""Does K-FAC's predicted capability increase ``L̂ = ½ Σ c Ũ²`` follow the real one? Measured along a run.

    python benchmarks/prediction_quality.py          # a few minutes on 2 CPU cores
    python benchmarks/prediction_quality.py --smoke

The model of ``examples/trainer_edit.py`` (a tiny Llama that learnt arithmetic sequences, capability
loss ≈ 0.12) is fine-tuned on unrelated sequences without any constraint (AdamW on the MLP output
projections). At checkpoints along the run, the real increase of the held-out capability loss is
measured and set beside ``L̂`` of the same weight change under several curvature estimates: the
empirical Fisher collected at softmax temperature 1, 2 and 3 (``CrispConfig(temperature=...)``),
and the Monte-Carlo (true) Fisher. The ratio ``L̂ / measured`` says where the quadratic model (and
so a capability budget in nats) can be trusted: near 1 for small changes, and how fast it departs.
A second table follows the real loss along the straight line ``W₀ + t·D`` for the change ``D`` of the
final step: a quadratic grows like ``t²``; the ratio to the ``t²`` extrapolation from ``t = 0.05`` shows
how much faster the real loss grows.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import trainer_edit as example  # noqa: E402
from common import print_table, run_from_command_line, write_result  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402
from torch_crisp.monitor import mean_token_loss  # noqa: E402

TARGETS = ["mlp.down_proj"]
ESTIMATES = {"empirical T=1": dict(), "empirical T=2": dict(temperature=2.0), "empirical T=3": dict(temperature=3.0),
             "mc (true Fisher)": dict(fisher="mc")}


def predicted(projector: CrispProjector, start: dict[str, torch.Tensor], model) -> float:
    total = 0.0
    for name, state in projector.layers.items():
        basis = state.basis
        weight = dict(model.named_modules())[name].weight.detach().double()
        rotated = basis.U_out.double().mT @ (weight - start[name]) @ basis.U_in.double()
        total += 0.5 * float((state.curvature_grid().double() * rotated.square()).sum())
    return total


@torch.no_grad()
def _along_the_line(model, start: dict[str, torch.Tensor], capability, before: float) -> list[tuple]:
    modules = dict(model.named_modules())
    end = {name: modules[name].weight.detach().clone() for name in start}

    def increase(t: float) -> float:
        for name, w0 in start.items():
            modules[name].weight.copy_((w0 + t * (end[name].double() - w0)).to(end[name].dtype))
        return mean_token_loss(model, capability) - before

    reference = increase(0.05)
    rows = [(t, increase(t)) for t in (0.05, 0.1, 0.2, 0.5, 0.7, 1.0)]
    return [(t, value, value / (reference * (t / 0.05) ** 2)) for t, value in rows]


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict:
    pretrain_steps, steps, checkpoints = (8, 4, (1, 2, 4)) if smoke else (400, 150, (1, 2, 5, 10, 20, 40, 80, 150))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = example.pretrain(pretrain_steps, tmp)
    capability = example.batches(example.arithmetic_sequences(64 if smoke else 256, seed=1), 32)
    collect_on = example.batches(example.arithmetic_sequences(128 if smoke else 512, seed=3), 32)
    projectors = {}
    for label, options in ESTIMATES.items():
        torch.manual_seed(0)
        projectors[label] = CrispProjector(base, CrispConfig(target_modules=TARGETS, **options)).collect(
            collect_on, progress=False
        )
    model = copy.deepcopy(base)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in TARGETS))
    modules = dict(base.named_modules())
    start = {n: modules[n].weight.detach().double().clone() for n in next(iter(projectors.values())).layers}
    before = mean_token_loss(model, capability)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    edit = example.batches(example.edit_sequences(8, seed=2), 8)[0]
    points, rows = [], []
    for step in range(1, steps + 1):
        model.train()
        model(**edit).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in checkpoints:
            measured = mean_token_loss(model, capability) - before
            point = {"step": step, "measured_increase": measured,
                     **{label: predicted(p, start, model) for label, p in projectors.items()}}
            points.append(point)
            ratios = "  ".join(f"{label} {point[label] / measured:6.3f}" for label in ESTIMATES)
            rows.append((f"step {step:>3}  measured {measured:8.4f}", f"L̂/measured: {ratios}"))
    print_table(f"capability loss {before:.3f} before; predicted vs measured increase", rows)
    line = _along_the_line(model, start, capability, before)
    print_table(f"along W0 + t·D (D: the change after {steps} steps)",
                [(f"t = {t:4.2f}", f"increase {v:.6f}  vs t² from t=0.05: {r:.2f}×") for t, v, r in line])
    payload = {"capability_loss_before": before, "targets": TARGETS, "points": points,
               "along_the_line": [{"t": t, "measured_increase": v, "ratio_to_quadratic": r} for t, v, r in line]}
    write_result("prediction_quality", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
