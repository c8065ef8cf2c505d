"""Capability-preserving fine-tuning with TRL's ``SFTTrainer`` (and ``DPOTrainer``, ``--dpo``).

TRL's trainers are ``transformers.Trainer`` subclasses, so the callback is the same two lines
(marked ``# torch_crisp``). Everything is tiny and local — a word-level tokenizer and a small Llama
built from configs, text generated in the script — so it runs on a CPU in seconds without downloads.

    pip install trl
    python examples/trl_sft.py          # supervised fine-tuning on text
    python examples/trl_sft.py --dpo    # preference optimisation on (prompt, chosen, rejected)
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile

import torch
from datasets import Dataset
from torch_crisp.integrations.hf_trainer import CrispCallback  # torch_crisp
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from torch_crisp import CrispConfig, CrispProjector  # torch_crisp
from torch_crisp.editing.demo.tokenizer import build_tokenizer

WORDS = [f"w{i}" for i in range(40)] + ["."]


def sentences(n: int, seed: int, words: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + " ." for _ in range(n)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps")
    parser.add_argument("--dpo", action="store_true", help="DPOTrainer on preference pairs instead of SFTTrainer")
    parser.add_argument("--output-dir", default=None, help="trainer output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    capability = Dataset.from_dict({"text": sentences(32, seed=1, words=WORDS[:20] + ["."])})

    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))  # torch_crisp
    tokenised = capability.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])       # torch_crisp
    projector.collect(tokenised, batch_size=8, progress=False)                                   # torch_crisp
    for name, p in model.named_parameters():
        p.requires_grad_("mlp.down_proj" in name)
    before = {n: s.geometry.weight.detach().clone() for n, s in projector.layers.items()}

    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=4,
            learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, seed=0,
        )
        if args.dpo:
            pairs = Dataset.from_dict({"prompt": sentences(16, seed=2, words=WORDS[20:30]),
                                       "chosen": sentences(16, seed=3, words=WORDS[30:40]),
                                       "rejected": sentences(16, seed=4, words=WORDS[:10])})
            # a model built from a config has no path to load the reference from: pass a frozen copy
            trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**common),
                                 train_dataset=pairs, processing_class=tokenizer,
                                 callbacks=[CrispCallback(projector)])                           # torch_crisp
        else:
            edits = Dataset.from_dict({"text": sentences(16, seed=2, words=WORDS[20:])})
            trainer = SFTTrainer(model=model, args=SFTConfig(**common, dataset_text_field="text"),
                                 train_dataset=edits, processing_class=tokenizer,
                                 callbacks=[CrispCallback(projector)])                           # torch_crisp
        trainer.train()

    leaks, sizes = [], []
    for name, state in projector.layers.items():
        delta = state.geometry.weight.detach() - before[name]
        sizes.append(float(delta.norm()))
        leaks.append(float((delta - projector.project(name, delta)).norm() / delta.norm().clamp_min(1e-30)))
    result = {"max_relative_leak": max(leaks), "min_change_norm": min(sizes),
              "final_loss": trainer.state.log_history[-2]["loss"]}
    print(f"{type(trainer).__name__} + CrispCallback: {args.steps} steps, relative leak of the weight change into "
          f"blocked directions {result['max_relative_leak']:.1e}")
    return result


if __name__ == "__main__":
    main()
