"""Capability-preserving editing with Accelerate: one script for 1 process, DDP or FSDP2.

Launch (the config file in this folder describes two GPUs on one machine)::

    accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_edit.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_edit.py   # same, no file
    python examples/accelerate_edit.py                                            # one process

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` runs two CPU
processes with the gloo backend (``--cpu --num_processes 2`` would start only one).

What it does, with a tiny GPT-2 built from a config (nothing is downloaded):

1. every process collects K-FAC curvature of its shard of the capability data; the factor sums
   are all-reduced and the eigendecompositions split between the processes and broadcast
   (``torch_crisp.integrations.accelerate.collect``);
2. edits the MLP output projections with ``CrispOptimizer`` under DDP: every process takes its
   slice of each global batch, DDP averages the gradients, the projection runs in
   ``optimizer.step()`` — identically on every process;
3. round-trips the projector through ``accelerator.save_state`` / ``load_state``.

The result (losses, the part of each layer's change outside the kept subspace, a checksum of the
factors) is printed by the main process and written to ``--output`` as JSON. Two processes give
the same numbers as one, up to float rounding, because each global batch is split evenly and
the capability batches are sharded without overlap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch_crisp.integrations import accelerate as crisp_accelerate
from transformers import GPT2Config, GPT2LMHeadModel

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

VOCAB, SEQ = 64, 12


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def lm_batch(rows: torch.Tensor, pad_from: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Causal-LM batch; row ``i`` is padded from position ``pad_from[i]`` on (attention_mask 0)."""
    attention_mask = torch.ones_like(rows)
    for i, start in enumerate(pad_from or []):
        attention_mask[i, start:] = 0
    input_ids = rows.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def capability_batches(num: int = 10) -> list[dict[str, torch.Tensor]]:
    """'Skills' to preserve: counting sequences with various steps (some rows padded)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(num):
        start = torch.randint(3, VOCAB, (4, 1), generator=g)
        step = torch.randint(1, 4, (4, 1), generator=g)
        rows = 3 + (start + step * torch.arange(SEQ)) % (VOCAB - 3)
        batches.append(lm_batch(rows, pad_from=[SEQ - 3, SEQ]))
    return batches


def edit_batches(steps: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """'Facts' to insert: a fixed random sequence per row, repeated every step (no padding)."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(3, VOCAB, (batch_size, SEQ), generator=g)
    return [lm_batch(rows) for _ in range(steps)]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    return sum(float(model(**b).loss) for b in batches) / len(batches)


def layer_matrices(projector: CrispProjector) -> dict[str, torch.Tensor]:
    return {name: s.geometry.as_matrix(s.geometry.weight.detach(), s.geometry.bias.detach()
                                       if s.geometry.has_bias else None).clone()
            for name, s in projector.layers.items()}


def checkpoint_folder(accelerator: Accelerator, requested: Path | None) -> tuple[Path, Path | None]:
    """The folder every process saves to and loads from, and the scratch folder to delete after.

    Without ``--checkpoint-dir``, the main process creates a temporary folder and broadcasts its
    path; only the main process deletes it, after every process has loaded from it (a temporary
    folder per process, deleted when each left it, let the main one delete the checkpoint while
    another was still loading it). On several machines, pass a ``--checkpoint-dir`` they share.
    """
    if requested is not None:
        return requested, None
    scratch = tempfile.mkdtemp(prefix="crisp_ckpt_") if accelerator.is_main_process else ""
    scratch = broadcast_object_list([scratch])[0]  # every process uses the main one's folder
    return Path(scratch) / "checkpoint", Path(scratch) if accelerator.is_main_process else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write the results as JSON here (main process)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="where save_state writes (default: a temporary folder of the main process, deleted "
                             "after every process loaded it; on several machines pass a shared folder)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="global edit batch size")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=3e-2)
    args = parser.parse_args()

    # Without GPUs, cpu=True makes Accelerate run DDP over gloo (MULTI_CPU) under --multi_gpu.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    model = make_model().to(accelerator.device)
    capability, edits = capability_batches(), edit_batches(args.steps, args.batch_size)

    # 1. curvature of the capability data: each process a disjoint shard, then all-reduced.
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"], gamma=args.gamma))
    crisp_accelerate.collect(accelerator, projector, capability)

    # 2. edit only the projected layers.
    trainable = projector.projected_parameters()
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    inner = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    optimizer = CrispOptimizer(inner, projector, mode="update")  # the change stays in the kept subspace
    capability_before, edit_before = mean_loss(model, capability), mean_loss(model, edits)
    before = layer_matrices(projector)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    crisp_accelerate.register(accelerator, projector)  # save_state / load_state include it

    ddp_model.eval()  # no dropout; DDP still all-reduces gradients
    for batch in edits:
        local = {k: v[rank::world].to(accelerator.device) for k, v in batch.items()}  # this process's rows
        accelerator.backward(ddp_model(**local).loss)
        optimizer.step()
        optimizer.zero_grad()

    after = layer_matrices(projector)
    outside = {}
    for name, delta in ((n, after[n] - before[n]) for n in after):
        outside[name] = float((delta - projector.project(name, delta)).norm() / delta.norm().clamp_min(1e-30))

    # 3. the projector survives save_state / load_state with bit-identical bases.
    bases = {n: (s.basis.U_in.clone(), s.basis.U_out.clone(), s.basis.mask.clone())
             for n, s in projector.layers.items()}
    checkpoint, scratch = checkpoint_folder(accelerator, args.checkpoint_dir)
    try:
        accelerator.save_state(str(checkpoint))
        accelerator.wait_for_everyone()
        projector.reset()
        accelerator.load_state(str(checkpoint))
        accelerator.wait_for_everyone()  # nobody deletes the checkpoint while another process still reads it
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    restored = all(
        torch.equal(s.basis.U_in, bases[n][0]) and torch.equal(s.basis.U_out, bases[n][1])
        and torch.equal(s.basis.mask, bases[n][2])
        for n, s in projector.layers.items()
    )

    result = {
        "num_processes": world,
        "capability_loss": [capability_before, mean_loss(model, capability)],
        "edit_loss": [edit_before, mean_loss(model, edits)],
        "outside_kept_subspace": outside,
        "kept_fraction": projector.kept_fraction(),
        "num_tokens": {n: float(projector.num_tokens(n)) for n in projector.target_names},
        "factor_traces": {n: [float(f.trace()) for f in projector.factors(n)] for n in projector.target_names},
        "eigendecomposition_owners": projector.eigendecomposition_owners,
        "change_norm": {n: float((after[n] - before[n]).norm()) for n in after},
        "state_restored": restored,
        "checkpoint_dir": str(checkpoint),
    }
    # every process reports its parameter checksum; replicas must agree bit for bit
    checksum = sum(float(p.detach().double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))
    result["param_checksums"] = accelerator.gather_for_metrics([checksum])
    if accelerator.is_main_process:
        print(json.dumps(result, indent=1))
        if args.output:
            partial = args.output.with_name(args.output.name + ".partial")
            partial.write_text(json.dumps(result, indent=1))
            partial.rename(args.output)
    # Drop the DDP wrapper before the process group: otherwise its reducer may hold the group's
    # last reference and destroy it at interpreter exit, which can deadlock with gloo.
    ddp_model, optimizer = accelerator.free_memory(ddp_model, optimizer)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
