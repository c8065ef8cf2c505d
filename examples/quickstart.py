"""The README's usage example, runnable as is (tests check that the two stay identical)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4))
def batch(seed):  # stand-in for your data: dicts with input_ids / attention_mask / labels
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"], gamma=0.9))
projector.collect([batch(s) for s in range(8)], progress=False)   # capability data, once
optimizer = CrispOptimizer(torch.optim.AdamW(projector.projected_parameters(), lr=1e-3), projector)

for step in range(5):                                             # your loop, unchanged
    loss = model(**batch(100 + step)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(projector.kept_fraction())
