"""Tiny Hugging Face models and batches built from configs (nothing is downloaded).

Import from tests as `from tiny_models import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import torch

VOCAB = 64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_batch(seed: int, batch: int = 3, seq: int = 10, pad_rows: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded causal-LM batch: padding has attention_mask 0 and label -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(min(pad_rows, batch)):
        attention_mask[row, seq - 3 - row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
