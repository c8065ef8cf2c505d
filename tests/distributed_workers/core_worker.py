"""Two-process worker for tests/test_distributed.py (launched with torchrun, gloo on CPU).

Each rank runs every scenario and writes ``rank{r}.json`` into the output folder; the test
asserts on the numbers. Scenarios: factor reduction over uneven shards (one rank with no data),
repeated collection and update_basis() without new data (no double counting), bit-identical
bases and the split of the eigendecompositions, EK-FAC and activation-only curvature, DDP
training with CrispOptimizer in both modes, FSDP2 (fully_shard) training for nn.Linear and
Hugging Face Conv1D, collection on an FSDP2-sharded model, sharded bases and the low-rank step under
DDP (placement_scenarios.py). Every multi-process result is
compared with a single-process reference computed on each rank (``sync_across_ranks=False``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # placement_scenarios

from placement_scenarios import scenario_placement  # noqa: E402
from tiny_models import lm_batch, tiny_gpt2  # noqa: E402

from torch_crisp import (  # noqa: E402
    CrispConfig,
    CrispOptimizer,
    CrispProjector,
    functional,  # noqa: E402
)
from torch_crisp.distributed import shard_batches  # noqa: E402
from torch_crisp.editing.loop import train_only  # noqa: E402

GPT2_TARGETS = ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                          else t.numpy().tobytes()).hexdigest()[:16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def local_projector(model, batches, config, **collect_kwargs) -> CrispProjector:
    projector = CrispProjector(model, config)
    projector.sync_across_ranks = False  # the single-process reference, computed on every rank
    for round_batches, kwargs in batches:
        projector.collect(round_batches, progress=False, **kwargs)
    return projector


def compare_factors(dist_proj: CrispProjector, ref: CrispProjector) -> dict:
    out = {}
    for name in dist_proj.target_names:
        A, S = dist_proj.factors(name)
        A_ref, S_ref = ref.factors(name)
        out[name] = {
            "A_rel": rel(A, A_ref), "S_rel": rel(S, S_ref),
            "tokens": float(dist_proj.num_tokens(name)), "tokens_ref": float(ref.num_tokens(name)),
        }
    return out


def basis_digests(projector: CrispProjector) -> dict:
    return {
        name: [digest(s.basis.U_in), digest(s.basis.U_out), digest(s.basis.eig_in), digest(s.basis.eig_out),
               digest(s.basis.mask), repr(s.basis.tau)]
        for name, s in projector.layers.items()
    }


def projection_gap(dist_proj: CrispProjector, ref: CrispProjector, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, state in dist_proj.layers.items():
        shape = (state.geometry.d_out, state.geometry.d_in_augmented)
        Q = torch.randn(shape, generator=g)
        out[name] = rel(dist_proj.project(name, Q), ref.project(name, Q))
    return out


class CountingEigh:
    """Counts eigendecompositions done on this rank (each must happen on exactly one rank)."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = functional.symmetric_eigh

    def __call__(self, matrix):
        self.calls += 1
        return self.original(matrix)


def scenario_factors(rank: int, world: int, result: dict) -> None:
    config = CrispConfig(target_modules=GPT2_TARGETS, gamma=0.9)
    round1 = [lm_batch(seed, batch=3, seq=10, pad_rows=1 + seed % 2) for seed in range(5)]
    round2 = [lm_batch(100 + seed, batch=2, seq=8) for seed in range(3)]
    model = tiny_gpt2(seed=0)

    counter = CountingEigh()
    functional.symmetric_eigh = counter
    try:
        projector = CrispProjector(model, config)
        projector.collect(list(shard_batches(round1, rank, world)), progress=False)  # 3 vs 2 batches
    finally:
        functional.symmetric_eigh = counter.original
    ref1 = local_projector(model, [(round1, {})], config)
    result["uneven"] = {
        "factors": compare_factors(projector, ref1),
        "bases": basis_digests(projector),
        "projection_gap": projection_gap(projector, ref1, seed=7),
        "owners": projector.eigendecomposition_owners,
        "eigh_calls": counter.calls,
        "num_layers": len(projector.layers),
        "kept": projector.kept_fraction(),
        "kept_ref": ref1.kept_fraction(),
    }

    # Second round on top (sequential editing): every rank adds new data; rank 1 gets none of it.
    shard2 = round2 if rank == 0 else []
    projector.collect(shard2, progress=False, weight=2.0)
    ref2 = local_projector(model, [(round1, {}), (round2, {"weight": 2.0})], config)
    result["second_round"] = {"factors": compare_factors(projector, ref2), "bases": basis_digests(projector)}

    # update_basis() again without new data (e.g. another gamma): nothing may be summed twice.
    projector.config.gamma = 0.95
    projector.update_basis()
    result["gamma_change"] = {"factors": compare_factors(projector, ref2), "bases": basis_digests(projector)}

    # Only rank 0 captures new data; rank 1 just joins update_basis().
    if rank == 0:
        with projector.capture() as session:
            batch = round2[0]
            session.position_mask = batch["attention_mask"]
            model.eval()
            (model(**batch).loss * int((batch["labels"][:, 1:] != -100).sum())).backward()
            model.zero_grad(set_to_none=True)
    projector.update_basis()
    ref4 = local_projector(model, [(round1, {}), (round2, {"weight": 2.0}), (round2[:1], {})], config)
    result["one_rank_captures"] = {"factors": compare_factors(projector, ref4), "bases": basis_digests(projector)}

    # A rank with no batches at all, from scratch.
    empty_rank = CrispProjector(model, config)
    empty_rank.collect(round1 if rank == 0 else [], progress=False)
    result["empty_rank"] = {"factors": compare_factors(empty_rank, ref1), "bases": basis_digests(empty_rank)}

    # Manual capture() + update_basis() path, twice before reducing (no data may be dropped).
    manual = CrispProjector(model, config)
    model.eval()  # as collect() does: no dropout
    for shard in (round1[rank::world], round2[rank::world]):
        with manual.capture() as session:
            for batch in shard:
                session.position_mask = batch["attention_mask"]
                out = model(**batch)
                (out.loss * int((batch["labels"][:, 1:] != -100).sum())).backward()
    model.zero_grad(set_to_none=True)
    manual.update_basis()
    ref3 = local_projector(model, [(round1, {}), (round2, {})], config)
    result["manual_capture"] = {"factors": compare_factors(manual, ref3)}


def scenario_variants(rank: int, world: int, result: dict) -> None:
    """EK-FAC (second pass reduced too) and activation-only masks on uneven shards."""
    batches = [lm_batch(200 + seed, batch=2, seq=8, pad_rows=seed % 2) for seed in range(5)]
    model = tiny_gpt2(seed=2)
    for curvature in ("ekfac", "activations"):
        config = CrispConfig(target_modules=["mlp.c_proj", "attn.c_attn"], gamma=0.9, curvature=curvature)
        projector = CrispProjector(model, config)
        projector.collect(shard_batches(batches, rank, world), progress=False)
        ref = local_projector(model, [(batches, {})], config)
        entry = {
            "factors": compare_factors(projector, ref),
            "bases": basis_digests(projector),
            "curvature": sorted({s.basis.curvature for s in projector.layers.values()}),
            "kept": projector.kept_fraction(),
            "kept_ref": ref.kept_fraction(),
            "projection_gap": projection_gap(projector, ref, seed=3),
        }
        if curvature == "ekfac":
            entry["correction"] = {
                name: {"rel": rel(s.corrected_curvature(), ref.layers[name].corrected_curvature()),
                       "examples": float(s.example_count), "examples_ref": float(ref.layers[name].example_count)}
                for name, s in projector.layers.items()
            }
            # a second correction pass on the same basis must not count the first one twice
            projector.correct_curvature(shard_batches(batches, rank, world), progress=False)
            ref.correct_curvature(batches, progress=False)
            entry["correction_twice"] = {
                name: {"rel": rel(s.corrected_curvature(), ref.layers[name].corrected_curvature()),
                       "examples": float(s.example_count), "examples_ref": float(ref.layers[name].example_count)}
                for name, s in projector.layers.items()
            }
        result[f"variant_{curvature}"] = entry


def kept_residual(projector: CrispProjector, before: dict, after: dict) -> dict:
    out = {}
    for name in projector.layers:
        delta = after[name] - before[name]
        # ‖Δ − P(Δ)‖ / ‖Δ‖: zero when the change lies in the kept subspace
        out[name] = {"residual": rel(projector.project(name, delta), delta), "norm": float(delta.norm())}
    return out


def layer_matrices(projector: CrispProjector, full=lambda t: t) -> dict:
    return {
        name: s.geometry.as_matrix(full(s.geometry.weight.detach()),
                                   full(s.geometry.bias.detach()) if s.geometry.has_bias else None).clone()
        for name, s in projector.layers.items()
    }


def scenario_ddp(rank: int, world: int, result: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    config = CrispConfig(target_modules=["mlp.c_proj", "attn.c_attn"], gamma=0.9)
    capability = [lm_batch(seed, batch=2, seq=10) for seed in range(4)]
    edits = [lm_batch(50 + step, batch=4, seq=8, pad_rows=0) for step in range(4)]
    for mode, make_inner in (("grad", lambda ps: torch.optim.SGD(ps, lr=0.5)),
                             ("update", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))):
        model = tiny_gpt2(seed=1).eval()  # no dropout, so one process can reproduce the run
        ddp = DistributedDataParallel(model)
        projector = CrispProjector(ddp, config)  # unwraps .module
        trainable = [p for s in projector.layers.values() for p in s.geometry.parameters()]
        ids = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        ddp = DistributedDataParallel(model)  # re-wrap: DDP only reduces parameters that require grad at construction
        projector.collect(capability[rank::world], progress=False)
        optimizer = CrispOptimizer(make_inner(trainable), projector, mode=mode)
        before = layer_matrices(projector)
        for batch in edits:
            local = {k: v[rank::world] for k, v in batch.items()}  # each rank half of the global batch
            ddp(**local).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = layer_matrices(projector)
        # single process on the whole global batches (no padding: DDP's mean of the per-rank
        # token means equals the global token mean)
        ref_model = tiny_gpt2(seed=1).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        ref = local_projector(ref_model, [(capability, {})], config)
        ref_params = [p for s in ref.layers.values() for p in s.geometry.parameters()]
        for p in ref_params:
            p.requires_grad_(True)
        ref_optimizer = CrispOptimizer(make_inner(ref_params), ref, mode=mode)
        for batch in edits:
            ref_model(**batch).loss.backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
        ref_after = layer_matrices(ref)
        result[f"ddp_{mode}"] = {
            "vs_single_process": {n: rel(after[n], ref_after[n]) for n in after},
            "names": projector.target_names,
            "params": {n: digest(p) for n, p in model.named_parameters()},
            "kept_residual": kept_residual(projector, before, after),
            "removed_fraction": projector.last_removed_fraction,
        }


def scenario_budget(rank: int, world: int, result: dict) -> None:
    """DDP with a capability budget that binds: every rank must find the same μ at every step."""
    from torch.nn.parallel import DistributedDataParallel

    config = CrispConfig(target_modules=["mlp.c_proj"], gamma=0.9, capability_budget=1e-5)
    model = tiny_gpt2(seed=1).eval()
    projector = CrispProjector(model, config)
    trainable = train_only(model, projector.target_names)
    ddp = DistributedDataParallel(model)
    projector.collect([lm_batch(seed, batch=2, seq=10) for seed in range(4)][rank::world], progress=False)
    optimizer = CrispOptimizer(torch.optim.AdamW(trainable, lr=5e-2), projector, mode="update")
    mus, predicted = [], []
    for step in range(3):
        batch = {k: v[rank::world] for k, v in lm_batch(60 + step, batch=4, seq=8, pad_rows=0).items()}
        ddp(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mus.append(projector.budget_mu)
        predicted.append(projector.predicted_capability_increase)
    params = {n: digest(p) for n, p in model.named_parameters()}
    result["budget"] = {"mu": mus, "predicted": predicted, "params": params}


def scenario_fsdp2(rank: int, world: int, result: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from torch_crisp.dtensor import full_tensor

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3))

    def sharded():
        model = make()
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def loss_fn(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum()

    g = torch.Generator().manual_seed(11)
    capability = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(4)]
    edits = [(torch.randn(6, 6, generator=g), torch.randn(6, 3, generator=g)) for _ in range(3)]
    config = CrispConfig(target_modules=["0", "2"], gamma=0.8)
    mesh = init_device_mesh("cpu", (world,))

    for mode in ("grad", "update"):
        entry: dict = {}
        result[f"fsdp2_{mode}"] = entry
        try:
            model, ref_model = make(), make()
            model[4].requires_grad_(False)
            ref_model[4].requires_grad_(False)
            projector = CrispProjector(model, config)
            projector.collect(capability[rank::world], loss_fn=loss_fn, progress=False)  # before sharding
            ref = local_projector(ref_model, [(capability, {"loss_fn": loss_fn})], config)
            for i in (0, 2, 4):
                fully_shard(model[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            entry["grad_is_dtensor_weight"] = type(model[2].weight).__name__
            before = layer_matrices(projector, full_tensor)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = CrispOptimizer(torch.optim.SGD(params, lr=0.05), projector, mode=mode)
            ref_optimizer = CrispOptimizer(torch.optim.SGD([p for p in ref_model.parameters() if p.requires_grad],
                                                           lr=0.05), ref, mode=mode)
            for x, y in edits:
                # mean over the local half; FSDP2 averages over ranks = mean over the global batch
                ((model(x[rank::world]) - y[rank::world]) ** 2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                ((ref_model(x) - y) ** 2).mean().backward()
                ref_optimizer.step()
                ref_optimizer.zero_grad()
            after = layer_matrices(projector, full_tensor)
            ref_after = layer_matrices(ref)
            entry["vs_single_process"] = {n: rel(after[n], ref_after[n]) for n in after}
            entry["kept_residual"] = kept_residual(projector, before, after)
            entry["params"] = {n: digest(full_tensor(p)) for n, p in model.named_parameters()}
            entry["factors_vs_ref"] = compare_factors(projector, ref)
        except Exception as err:  # recorded so the test can show what happened
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-3000:]

    # Hugging Face Conv1D (weight stored as Wᵀ, so sharded along d_in) with biases: GPT-2.
    capability_lm = [lm_batch(300 + seed, batch=2, seq=8) for seed in range(4)]
    edits_lm = [lm_batch(400 + step, batch=4, seq=8, pad_rows=0) for step in range(3)]
    gpt2_config = CrispConfig(target_modules=["mlp.c_proj", "attn.c_attn"], gamma=0.9)
    for mode in ("grad", "update"):
        entry = result[f"fsdp2_conv1d_{mode}"] = {}
        try:
            model, ref_model = tiny_gpt2(seed=4).eval(), tiny_gpt2(seed=4).eval()
            projector = CrispProjector(model, gpt2_config)
            ref = CrispProjector(ref_model, gpt2_config)
            ref.sync_across_ranks = False
            for proj, mdl in ((projector, model), (ref, ref_model)):  # train the projected layers only
                ids = {id(p) for s in proj.layers.values() for p in s.geometry.parameters()}
                for p in mdl.parameters():
                    p.requires_grad_(id(p) in ids)
            projector.collect(capability_lm[rank::world], progress=False)
            ref.collect(capability_lm, progress=False)
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            trainable = [p for p in model.parameters() if p.requires_grad]
            ref_trainable = [p for p in ref_model.parameters() if p.requires_grad]
            before = layer_matrices(projector, full_tensor)
            optimizer = CrispOptimizer(torch.optim.SGD(trainable, lr=0.5), projector, mode=mode)
            ref_optimizer = CrispOptimizer(torch.optim.SGD(ref_trainable, lr=0.5), ref, mode=mode)
            for batch in edits_lm:
                model(**{k: v[rank::world] for k, v in batch.items()}).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                ref_model(**batch).loss.backward()
                ref_optimizer.step()
                ref_optimizer.zero_grad()
            after = layer_matrices(projector, full_tensor)
            ref_after = layer_matrices(ref)
            entry["vs_single_process"] = {
                n: rel(after[n] - before[n], ref_after[n] - before[n]) for n in after
            }
            entry["kept_residual"] = kept_residual(projector, before, after)
            entry["params"] = {n: digest(full_tensor(p)) for n, p in model.named_parameters()}
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc()[-3000:]

    # Uneven shards of a sharded model: 3 batches on 2 ranks (every forward is a collective).
    entry = result["fsdp2_uneven_collect"] = {}
    try:
        model = sharded()
        projector = CrispProjector(model, config)
        projector.collect(capability[:3][rank::world], loss_fn=loss_fn, progress=False)
        ref = local_projector(make(), [(capability[:3], {"loss_fn": loss_fn})], config)
        entry["factors_vs_ref"] = compare_factors(projector, ref)
        entry["padding_passes"] = projector.last_collection.padding_passes
    except Exception as err:
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc()[-3000:]

    # Collecting on an already sharded (FSDP2) model.
    entry = result["fsdp2_collect_sharded"] = {}
    try:
        model = sharded()
        projector = CrispProjector(model, config)
        projector.collect(capability[rank::world], loss_fn=loss_fn, progress=False)
        ref = local_projector(make(), [(capability, {"loss_fn": loss_fn})], config)
        entry["factors_vs_ref"] = compare_factors(projector, ref)
    except Exception as err:
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc()[-3000:]


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"rank": rank, "world": world}
    scenarios = sys.argv[2].split(",") if len(sys.argv) > 2 else ["factors", "variants", "ddp", "budget", "fsdp2",
                                                                  "placement"]
    try:
        for name in scenarios:
            if name == "placement":  # sharded bases and the low-rank step (placement_scenarios.py)
                scenario_placement(rank, world, result, out_dir)
                continue
            {"factors": scenario_factors, "variants": scenario_variants, "ddp": scenario_ddp,
             "budget": scenario_budget, "fsdp2": scenario_fsdp2}[name](rank, world, result)
    finally:
        partial = out_dir / f"rank{rank}.json.partial"
        partial.write_text(json.dumps(result, indent=1, default=str))
        partial.rename(out_dir / f"rank{rank}.json")  # atomic: the test never reads half a file
        dist.barrier()  # ranks reach teardown together
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
