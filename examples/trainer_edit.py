"""Capability-preserving fine-tuning in an ordinary Hugging Face Trainer script.

What a user adds to an existing script is marked ``# torch_crisp``: build a projector on the model,
collect the curvature of a capability corpus, and pass ``callbacks=[CrispCallback(projector)]``.

Everything here is synthetic and tiny so that it runs on a CPU in well under a minute without
downloading anything: a small Llama-architecture model (built from a config) first learns a
*capability* — continuing arithmetic sequences ``a, a+d, a+2d, …`` (mod the vocabulary) — and is
then fine-tuned on a handful of unrelated *edit* sequences. The script reports the capability
loss before and after the edit for the protected run and for the same fine-tune without the
callback, and checks that the total weight change of every projected layer lies in its kept
subspace.

    python examples/trainer_edit.py                 # full demo (about 30 s on 2 CPU cores)
    python examples/trainer_edit.py --quick         # smoke run used by the tests
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch_crisp.integrations.hf_trainer import CrispCallback  # torch_crisp
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from torch_crisp import CrispConfig, CrispProjector  # torch_crisp

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


@torch.no_grad()
def mean_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    losses = [model(**b).loss.item() for b in batches(ids, 32)]
    return sum(losses) / len(losses)


def training_args(output_dir: str, steps: int, lr: float, batch_size: int, optim: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        optim=optim, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(steps // 4, 1),
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )


def pretrain(steps: int, output_dir: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    data = LMExamples(arithmetic_sequences(2048, seed=0))
    Trainer(model=model, args=training_args(output_dir, steps, 3e-3, 32, "adamw_torch"), train_dataset=data).train()
    return model


def fine_tune(model, edit: torch.Tensor, steps: int, output_dir: str, callbacks=()) -> None:
    """The user's unchanged fine-tuning script: only ``callbacks`` differs between the two runs."""
    for name, p in model.named_parameters():  # fine-tune the MLP output projections only
        p.requires_grad_("mlp.down_proj" in name)
    args = training_args(output_dir, steps, 0.5, len(edit), "sgd")
    Trainer(model=model, args=args, train_dataset=LMExamples(edit), callbacks=list(callbacks)).train()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    parser.add_argument("--gamma", type=float, default=0.99, help="curvature energy to block")
    parser.add_argument("--mode", choices=["grad", "update"], default="grad")
    parser.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    # --quick only shrinks the run so the tests can execute the script in a few seconds
    pretrain_steps, edit_steps, n_eval, n_collect = (8, 3, 64, 128) if args.quick else (400, 60, 256, 512)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp
        base = pretrain(pretrain_steps, out)
        capability = arithmetic_sequences(n_eval, seed=1)  # held-out capability data
        edit = edit_sequences(8, seed=2)
        results = {"capability_loss_before": mean_loss(base, capability), "edit_loss_before": mean_loss(base, edit)}

        # plain fine-tune, for comparison
        plain = copy.deepcopy(base)
        fine_tune(plain, edit, edit_steps, out)
        results["plain_capability_loss"] = mean_loss(plain, capability)
        results["plain_edit_loss"] = mean_loss(plain, edit)

        # the same fine-tune, protected                                                  # torch_crisp
        model = copy.deepcopy(base)
        projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=args.gamma))
        projector.collect(batches(arithmetic_sequences(n_collect, seed=3), 32), progress=False)
        before = {n: s.geometry.weight.detach().clone() for n, s in projector.layers.items()}
        callback = CrispCallback(projector, mode=args.mode)
        fine_tune(model, edit, edit_steps, out, callbacks=[callback])
        results["crisp_capability_loss"] = mean_loss(model, capability)
        results["crisp_edit_loss"] = mean_loss(model, edit)

    leaks = []
    for name, state in projector.layers.items():
        delta = state.geometry.weight.detach() - before[name]
        leaks.append(float((delta - projector.project(name, delta)).norm() / delta.norm().clamp_min(1e-30)))
    results["max_relative_leak"] = max(leaks)
    results["mean_removed_fraction"] = sum(f for _, f in callback.removed_fractions) / len(callback.removed_fractions)

    print("capability loss: before {capability_loss_before:.3f} | plain fine-tune {plain_capability_loss:.3f} | "
          "with CrispCallback {crisp_capability_loss:.3f}".format(**results))
    print("edit loss:       before {edit_loss_before:.3f} | plain fine-tune {plain_edit_loss:.3f} | "
          "with CrispCallback {crisp_edit_loss:.3f}".format(**results))
    print(f"relative leak of the weight change into blocked directions: {results['max_relative_leak']:.2e}; "
          f"mean fraction of gradient removed per step: {results['mean_removed_fraction']:.3f}")
    return results


if __name__ == "__main__":
    main()
