"""Capability-preserving fine-tuning in an ordinary Hugging Face Trainer script.

What a user adds to an existing script is marked ``# torch_crisp``: build a projector on the model,
collect the curvature of a capability corpus, and pass ``callbacks=[CrispCallback(projector)]``.

Everything here is synthetic and tiny so that it runs on a CPU without downloading anything: a
small Llama-architecture model (built from a config) first learns a *capability* — continuing
arithmetic sequences ``a, a+d, a+2d, …`` (mod the vocabulary) — and is then fine-tuned on a handful
of unrelated *edit* sequences with the Trainer's default optimizer (AdamW). Every fine-tune runs
until the edit is learnt (training loss below ``--target-loss``), so the rows compare the damage
at equal edit success: plain fine-tuning, CrispCallback with the energy threshold ``γ``, and
CrispCallback with a capability budget ``ε`` in nats instead of ``γ``. For each it reports the
held-out capability loss, the steps taken, the predicted capability increase ``L̂`` and the leak of
the weight change into blocked directions.

    python examples/trainer_edit.py                 # about a minute on 2 CPU cores
    python examples/trainer_edit.py --quick         # smoke run used by the tests
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings

import torch
from torch_crisp.integrations.hf_trainer import CrispCallback  # torch_crisp
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from torch_crisp import CrispConfig, CrispProjector  # torch_crisp
from torch_crisp.monitor import mean_token_loss

VOCAB, SEQ = 48, 12


def arithmetic_sequences(n: int, seed: int) -> torch.Tensor:
    """The capability: ``a, a+d, a+2d, …`` mod ``VOCAB`` for random starts ``a`` and steps ``d``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def edit_sequences(n: int, seed: int) -> torch.Tensor:
    """The edit: fixed random sequences the model must memorise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


class LMExamples(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}


def batches(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids.split(batch_size)
    ]


class StopWhenLearnt(TrainerCallback):
    """Stop once the logged training loss is below ``target`` (equal edit success for every run)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and logs.get("loss", float("inf")) < self.target:
            control.should_training_stop = True


def training_args(output_dir: str, steps: int, lr: float, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0,
    )


def quiet_trainer(**kwargs) -> Trainer:
    """A Trainer that logs every step (for StopWhenLearnt) without printing every step."""
    trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def pretrain(steps: int, output_dir: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    data = LMExamples(arithmetic_sequences(2048, seed=0))
    quiet_trainer(model=model, args=training_args(output_dir, steps, 3e-3, 32), train_dataset=data).train()
    return model


def fine_tune(model, edit: torch.Tensor, args: argparse.Namespace, output_dir: str, callbacks=()) -> int:
    """The user's unchanged fine-tuning script (Trainer defaults: AdamW); only ``callbacks`` differ."""
    for name, p in model.named_parameters():  # fine-tune the MLP output projections only
        p.requires_grad_("mlp.down_proj" in name)
    stop = StopWhenLearnt(args.target_loss)
    training = training_args(output_dir, args.max_steps, args.lr, len(edit))
    trainer = quiet_trainer(model=model, args=training, train_dataset=LMExamples(edit), callbacks=[stop, *callbacks])
    trainer.train()
    return trainer.state.global_step


def protected(base, edit, capability_batches, args, out, config: CrispConfig) -> tuple[dict, CrispCallback]:
    model = copy.deepcopy(base)                                                      # torch_crisp
    projector = CrispProjector(model, config)                                        # torch_crisp
    projector.collect(capability_batches, progress=False)                            # torch_crisp
    callback = CrispCallback(projector, mode="update")                               # torch_crisp
    before = {n: s.geometry.weight.detach().clone() for n, s in projector.layers.items()}
    steps = fine_tune(model, edit, args, out, callbacks=[callback])
    leaks = []
    for name, state in projector.layers.items():
        delta = state.geometry.weight.detach() - before[name]
        leaks.append(float((delta - projector.project(name, delta)).norm() / delta.norm().clamp_min(1e-30)))
    row = {"model": model, "steps": steps, "max_relative_leak": max(leaks),
           "predicted_increase": callback.constraint.current_predicted_increase(), "budget_mu": projector.budget_mu}
    return row, callback


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    parser.add_argument("--gamma", type=float, default=0.99, help="curvature energy to block")
    parser.add_argument("--budget", type=float, default=0.002, help="capability budget in nats (the third row)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the fine-tune")
    parser.add_argument("--target-loss", type=float, default=0.05, help="train until the edit loss is below this")
    parser.add_argument("--max-steps", type=int, default=600, help="give up after this many steps")
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    # --quick only shrinks the run so the tests can execute the script in a few seconds
    pretrain_steps, n_eval, n_collect = (8, 64, 128) if args.quick else (400, 256, 512)
    if args.quick:
        args.max_steps = 4

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="transformers.*")
        out = args.output_dir or tmp
        base = pretrain(pretrain_steps, out)
        capability = batches(arithmetic_sequences(n_eval, seed=1), 32)  # held-out capability data
        edit = edit_sequences(8, seed=2)
        collect_on = batches(arithmetic_sequences(n_collect, seed=3), 32)
        base_capability = mean_token_loss(base, capability)
        results: dict[str, float] = {"capability_loss_before": base_capability,
                                     "edit_loss_before": mean_token_loss(base, batches(edit, 8))}

        plain = copy.deepcopy(base)
        results["plain_steps"] = fine_tune(plain, edit, args, out)
        results["plain_capability_loss"] = mean_token_loss(plain, capability)
        results["plain_edit_loss"] = mean_token_loss(plain, batches(edit, 8))

        rows = {
            "crisp": CrispConfig(target_modules=["mlp.down_proj"], gamma=args.gamma),
            "budget": CrispConfig(target_modules=["mlp.down_proj"], gamma=None, capability_budget=args.budget),
        }
        for label, config in rows.items():
            row, callback = protected(base, edit, collect_on, args, out, config)
            results[f"{label}_steps"] = row["steps"]
            results[f"{label}_capability_loss"] = mean_token_loss(row["model"], capability)
            results[f"{label}_edit_loss"] = mean_token_loss(row["model"], batches(edit, 8))
            results[f"{label}_max_relative_leak"] = row["max_relative_leak"]
            results[f"{label}_predicted_increase"] = row["predicted_increase"]
            results[f"{label}_budget_mu"] = row["budget_mu"]
            fractions = [f for _, f in callback.removed_fractions]
            results[f"{label}_mean_removed_fraction"] = sum(fractions) / max(len(fractions), 1)

    print(f"{'':22} {'capability loss':>16} {'edit loss':>10} {'steps':>6} {'predicted L̂':>12} {'leak':>9}")
    print(f"{'before':22} {results['capability_loss_before']:>16.3f} {results['edit_loss_before']:>10.3f}")
    print(f"{'plain fine-tune':22} {results['plain_capability_loss']:>16.3f} {results['plain_edit_loss']:>10.3f} "
          f"{results['plain_steps']:>6}")
    for label, title in (("crisp", f"CrispCallback γ={args.gamma}"), ("budget", f"CrispCallback ε={args.budget}")):
        print(f"{title:22} {results[f'{label}_capability_loss']:>16.3f} {results[f'{label}_edit_loss']:>10.3f} "
              f"{results[f'{label}_steps']:>6} {results[f'{label}_predicted_increase']:>12.4f} "
              f"{results[f'{label}_max_relative_leak']:>9.1e}")
    return results


if __name__ == "__main__":
    main()
