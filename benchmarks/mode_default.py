"""Which projection mode should be the default under the Trainer's default optimizer (AdamW)?

    python benchmarks/mode_default.py          # a few minutes on 2 CPU cores
    python benchmarks/mode_default.py --smoke

The scenario of ``examples/trainer_edit.py`` (a tiny Llama that learnt arithmetic sequences is
fine-tuned on unrelated sequences with the Trainer's AdamW until the edit is learnt), run with
``CrispCallback(mode="grad")`` and ``CrispCallback(mode="update")`` side by side at two learning
rates, plus plain fine-tuning. Per run: held-out capability loss, steps to learn the edit, final
edit loss, the leak ``‖D − P(D)‖ / ‖D‖`` of the total weight change and its curvature-weighted
part ``½ Σ_blocked c Ũ²`` (what would damage the capability), and ``L̂`` of the whole change.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import trainer_edit as example  # noqa: E402
from common import change_in_blocked_directions, print_table, run_from_command_line, write_result  # noqa: E402
from torch_crisp.integrations.hf_trainer import CrispCallback  # noqa: E402

from torch_crisp import CrispConfig, CrispProjector  # noqa: E402
from torch_crisp.monitor import mean_token_loss  # noqa: E402


def run(smoke: bool = False, rounds: int | None = None, out_dir: Path | None = None) -> dict:
    pretrain_steps, n_eval, n_collect = (8, 64, 128) if smoke else (400, 256, 512)
    settings = argparse.Namespace(target_loss=0.05, max_steps=4 if smoke else 400, lr=None)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = example.pretrain(pretrain_steps, tmp)
        capability = example.batches(example.arithmetic_sequences(n_eval, seed=1), 32)
        edit = example.edit_sequences(8, seed=2)
        collect_on = example.batches(example.arithmetic_sequences(n_collect, seed=3), 32)
        results, rows = {"capability_loss_before": mean_token_loss(base, capability)}, []
        for lr in ((1e-3,) if smoke else (1e-3, 1e-2)):
            settings.lr = lr
            for mode in ("plain", "grad", "update"):
                model = copy.deepcopy(base)
                before = {}
                callbacks = []
                if mode != "plain":
                    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.99))
                    projector.collect(collect_on, progress=False)
                    before = {n: s.geometry.weight.detach().double().clone() for n, s in projector.layers.items()}
                    callbacks = [CrispCallback(projector, mode=mode)]
                steps = example.fine_tune(model, edit, settings, tmp, callbacks=callbacks)
                row = {"steps": steps, "capability_loss": mean_token_loss(model, capability),
                       "edit_loss": mean_token_loss(model, example.batches(edit, 8))}
                if mode != "plain":
                    row.update(change_in_blocked_directions(projector, before))
                results[f"{mode}@lr={lr:g}"] = row
                extra = (f"  leak {row['leak']:.2e}  blocked L̂ {row['blocked_predicted_increase']:.2e}"
                         if mode != "plain" else "")
                rows.append((f"{mode:>6} lr {lr:g}", f"capability {row['capability_loss']:.3f}  edit "
                             f"{row['edit_loss']:.3f}  steps {steps:>3}{extra}"))
    print_table(f"AdamW fine-tune to edit loss < 0.05 (capability before {results['capability_loss_before']:.3f})",
                rows)
    payload = {"gamma": 0.99, "targets": ["mlp.down_proj"], "results": results}
    write_result("mode_default", payload, out_dir)
    return payload


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(run, __doc__, argv)


if __name__ == "__main__":
    main()
