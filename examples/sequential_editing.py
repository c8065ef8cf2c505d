"""Collect factors once from the command line, load them, and edit in rounds whose constraints grow.

    python examples/sequential_editing.py            # builds a tiny model + corpus in a temp folder

With your own model, replace the first part by
    torch-crisp collect --model ./my-model --data capability.txt --out ./factors
    torch-crisp inspect ./factors --plot spectra.png
and load ./factors as below. Nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from torch_crisp import CrispOptimizer, CrispProjector
from torch_crisp.cli import main as torch_crisp_cli
from torch_crisp.sequential import SequentialEditor

WORDS = "the a cat dog bird sat ran flew on over under mat tree house red blue big small".split()


def build_demo_model(folder: Path) -> None:
    """A tiny Llama and a word-level tokenizer, saved like a hub checkpoint."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def sentences(seed: int, count: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(4, len(WORDS), (count, 6), generator=g)
    return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]


def edit_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def run(workdir: Path) -> list:
    model_dir, factors = workdir / "model", workdir / "factors"
    build_demo_model(model_dir)
    (workdir / "capability.txt").write_text("\n".join(sentences(0, 64)) + "\n")

    # 1. once: capability curvature from the command line, then a look at the spectra
    for argv in (["collect", "--model", model_dir, "--data", workdir / "capability.txt", "--out", factors,
                  "--target-modules", "mlp.down_proj", "--seq-len", "16", "--device", "cpu", "--quiet"],
                 ["inspect", factors, "--gamma", "0.9", "0.99"]):
        if torch_crisp_cli([str(a) for a in argv]) != 0:
            sys.exit("torch-crisp failed")

    # 2. a training script loads the factors onto the same model
    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    projector = CrispProjector.from_pretrained(factors, model, gamma=0.99)
    for p in model.parameters():
        p.requires_grad_(False)
    edited = projector.projected_parameters()
    for p in edited:
        p.requires_grad_(True)
    optimizer = CrispOptimizer(torch.optim.Adam(edited, lr=5e-2), projector, mode="update")

    # 3. rounds of edits; each round's curvature joins the constraint of the next
    editor = SequentialEditor(projector, optimizer, epochs=15, weight=10.0)
    rounds = [[edit_batch(tokenizer, sentences(100 + r, 4))] for r in range(3)]
    for stats in editor.run(rounds):
        print(f"round {stats.round}: loss {stats.mean_loss:.3f} -> {stats.last_loss:.3f}, "
              f"constraint now {stats.total_tokens:.0f} tokens, kept {stats.mean_kept_fraction:.1%}")
    projector.save_pretrained(workdir / "factors-after-edits")  # the grown constraint, for next time
    return editor.history


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp))
