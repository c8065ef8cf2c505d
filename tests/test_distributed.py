"""Multi-process behaviour: factor reduction, shared eigendecompositions, DDP, FSDP2.

One ``torchrun --nproc_per_node 2`` launch (gloo on CPU) runs every scenario of
``distributed_workers/core_worker.py``; the tests below assert on what each rank wrote. Pure
helpers (work assignment, sharding) and the refusal of DeepSpeed are tested in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_accelerator import FakeAccelerator
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector
from torch_crisp.distributed import assign_greedy, shard_batches
from torch_crisp.dtensor import check_supported_parameter

WORKERS = Path(__file__).parent / "distributed_workers"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Pids of all processes below ``pid`` (read from /proc), children before their parents."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    for child in children.get(pid, []):
        found.extend(_descendants_of(child, children))
    return found


def _descendants_of(pid: int, children: dict[int, list[int]]) -> list[int]:
    below = [p for child in children.get(pid, []) for p in _descendants_of(child, children)]
    return [*below, pid]


def run_until_outputs(command: list[str], outputs: list[Path], log: Path, timeout: float = 240,
                      grace: float = 20) -> None:
    """Run ``command`` in its own session until it exits or, once all ``outputs`` exist, ``grace`` s.

    Gloo's process-group teardown can deadlock at exit in PyTorch itself when an object such as
    DDP's reducer drops the group's last reference while holding the GIL that gloo's worker thread
    needs (pytorch/pytorch#56297). The scripts avoid that, and write their results before
    teardown anyway; a run that produced them but still hangs is stopped here (launcher and
    ranks, by pid) instead of leaving orphaned ranks behind.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline, done_at = time.monotonic() + timeout, None
        while proc.poll() is None and time.monotonic() < deadline:
            if done_at is None and all(p.exists() for p in outputs):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > grace:
                break
            time.sleep(0.2)
        if proc.poll() is None:
            # The launcher runs the ranks in sessions of their own: stop them by pid.
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    if not all(p.exists() for p in outputs) or (proc.returncode not in (0, -signal.SIGKILL)):
        pytest.fail(f"multi-process run failed (rc={proc.returncode}):\n{log.read_text()[-8000:]}")


def launch_two_ranks(script: Path, out_dir: Path, *args: str) -> list[dict]:
    """Run ``script out_dir *args`` on two gloo ranks; return each rank's JSON."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out_dir), *args,
    ]
    results = [out_dir / f"rank{r}.json" for r in range(2)]
    run_until_outputs(command, results, out_dir / "log.txt")
    return [json.loads(p.read_text()) for p in results]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return launch_two_ranks(WORKERS / "core_worker.py", tmp_path_factory.mktemp("core"))


def assert_factors_match(factors: dict, tol: float = 1e-5) -> None:
    assert factors, "no layers compared"
    for name, f in factors.items():
        assert f["tokens"] == f["tokens_ref"], name
        assert f["A_rel"] < tol and f["S_rel"] < tol, (name, f)


# ----------------------------------------------------------------------------- reduction
@pytest.mark.parametrize(
    "scenario", ["uneven", "second_round", "gamma_change", "one_rank_captures", "empty_rank", "manual_capture"]
)
def test_factors_equal_single_process_over_union(ranks, scenario):
    # uneven: 3 vs 2 batches; second_round: a weighted second collect (no double counting of the
    # first); gamma_change: update_basis() again without new data; one_rank_captures: only rank 0
    # runs capture() before a joint update_basis(); empty_rank: rank 1 has no batches at all;
    # manual_capture: two capture() blocks before one update_basis().
    for result in ranks:
        assert_factors_match(result[scenario]["factors"])


@pytest.mark.parametrize("scenario", ["uneven", "second_round", "gamma_change", "one_rank_captures", "empty_rank"])
def test_bases_and_masks_bit_identical_across_ranks(ranks, scenario):
    assert ranks[0][scenario]["bases"] == ranks[1][scenario]["bases"]


def test_projection_matches_single_process(ranks):
    uneven = ranks[0]["uneven"]
    assert max(uneven["projection_gap"].values()) < 1e-4
    assert uneven["kept"] == pytest.approx(uneven["kept_ref"], abs=0.02)


def test_eigendecompositions_split_across_ranks(ranks):
    owners = [r["uneven"]["owners"] for r in ranks]
    assert owners[0] == owners[1], "ranks disagree on the assignment"
    num_layers = ranks[0]["uneven"]["num_layers"]
    assert set(owners[0].values()) == {0, 1}
    # each layer's two eigendecompositions (A and S) ran on exactly one rank: its owner
    calls = [r["uneven"]["eigh_calls"] for r in ranks]
    assert sum(calls) == 2 * num_layers
    for rank, count in enumerate(calls):
        assert count == 2 * sum(owner == rank for owner in owners[0].values())


@pytest.mark.parametrize("curvature", ["ekfac", "activations"])
def test_curvature_variants_reduce_and_share_masks(ranks, curvature):
    first, second = ranks[0][f"variant_{curvature}"], ranks[1][f"variant_{curvature}"]
    assert first["bases"] == second["bases"]
    assert first["curvature"] == [curvature]
    assert_factors_match(first["factors"])
    assert first["kept"] == pytest.approx(first["kept_ref"], abs=0.02)
    assert max(first["projection_gap"].values()) < 1e-4
    if curvature == "ekfac":
        # the second pass is reduced as well, also when repeated on the same basis
        for key in ("correction", "correction_twice"):
            for name, c in first[key].items():
                assert c["examples"] == c["examples_ref"] and c["rel"] < 1e-4, (key, name, c)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_ddp_steps_identical_across_ranks_and_in_kept_subspace(ranks, mode):
    first, second = ranks[0][f"ddp_{mode}"], ranks[1][f"ddp_{mode}"]
    assert first["params"] == second["params"], "replicas drifted apart"
    assert not any(name.startswith("module.") for name in first["names"]), "DDP wrapper not unwrapped"
    for name, layer in first["kept_residual"].items():
        assert layer["norm"] > 1e-3, f"{name} did not move"
        assert layer["residual"] < 1e-4, (name, layer)
    # the same run in one process on the whole global batches
    assert max(first["vs_single_process"].values()) < 1e-3


# ----------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_fsdp2_fully_shard_projects_sharded_gradients(ranks, mode):
    first, second = ranks[0][f"fsdp2_{mode}"], ranks[1][f"fsdp2_{mode}"]
    assert "error" not in first, first.get("traceback")
    assert first["grad_is_dtensor_weight"] == "DTensor"
    assert first["params"] == second["params"]
    assert_factors_match(first["factors_vs_ref"])
    for name, layer in first["kept_residual"].items():
        assert layer["norm"] > 1e-4 and layer["residual"] < 1e-4, (name, layer)
    assert max(first["vs_single_process"].values()) < 1e-5


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_fsdp2_hf_conv1d_with_bias(ranks, mode):
    # GPT-2's Conv1D stores Wᵀ, so FSDP2 shards the logical W along d_in and the bias along d_out
    first, second = ranks[0][f"fsdp2_conv1d_{mode}"], ranks[1][f"fsdp2_conv1d_{mode}"]
    assert "error" not in first, first.get("traceback")
    assert first["params"] == second["params"]
    for name, layer in first["kept_residual"].items():
        assert layer["norm"] > 1e-3 and layer["residual"] < 1e-4, (name, layer)
    # the change of each layer equals the single-process run's (relative to the change itself)
    assert max(first["vs_single_process"].values()) < 1e-4


def test_fsdp2_collect_on_sharded_model(ranks):
    entry = ranks[0]["fsdp2_collect_sharded"]
    assert "error" not in entry, entry.get("traceback")
    assert_factors_match(entry["factors_vs_ref"])


def test_fsdp2_uneven_batches_do_not_deadlock_and_count_once(ranks):
    # 3 batches on 2 ranks: rank 1 runs one zero-weight pass so every forward has a partner
    for rank, padding in ((0, 0), (1, 1)):
        entry = ranks[rank]["fsdp2_uneven_collect"]
        assert "error" not in entry, entry.get("traceback")
        assert entry["padding_passes"] == padding
    assert_factors_match(ranks[0]["fsdp2_uneven_collect"]["factors_vs_ref"])


def test_capability_budget_finds_the_same_mu_on_every_rank(ranks):
    first, second = ranks[0]["budget"], ranks[1]["budget"]
    assert first["mu"] == second["mu"] and first["params"] == second["params"]
    assert any(mu > 0 for mu in first["mu"]), "the budget never bound"
    assert all(p <= 1e-5 * (1 + 1e-6) for p in first["predicted"])


# ----------------------------------------------------------------------------- sharded bases, low-rank step
def _placement(ranks) -> tuple[dict, dict]:
    first, second = ranks[0]["placement"], ranks[1]["placement"]
    assert "error" not in first and "error" not in second, first.get("traceback") or second.get("traceback")
    return first, second


@pytest.mark.parametrize("run", ["grad_off", "grad_always", "update_off"])
def test_sharded_bases_train_bit_identically_to_replicated_ones(ranks, run):
    first, second = _placement(ranks)
    sharded, replicated = first[f"{run}_sharded"], first[f"{run}_replicated"]
    assert sharded["params"] == second[f"{run}_sharded"]["params"], "replicas drifted apart"
    assert sharded["params"] == replicated["params"], "sharding changed the result"
    assert sharded["sharded"] and not replicated["sharded"]
    # each rank keeps only the bases it computed (the others as numbers), and the kept fractions agree
    remote = [set(first[f"{run}_sharded"]["remote"]), set(second[f"{run}_sharded"]["remote"])]
    assert remote[0] and remote[1] and not remote[0] & remote[1]
    assert remote[0] | remote[1] == set(sharded["kept"])
    assert sharded["held_bytes"] < replicated["held_bytes"]
    assert sharded["kept"] == replicated["kept"]
    # MEM-OPT's price: every projected matrix is broadcast once per step; replicated bases send nothing
    assert sharded["broadcast_bytes"] == [sharded["matrix_bytes"]] * 3
    assert replicated["broadcast_bytes"] == [0, 0, 0]


def test_low_rank_step_under_ddp_equals_the_dense_path(ranks):
    first, second = _placement(ranks)
    layers = set(first["grad_always_replicated"]["kept"])
    # replicated: every rank projects every layer from the all-gathered factors; sharded: each owner its own
    assert all(set(step) == layers for step in first["grad_always_replicated"]["low_rank"])
    for step in range(3):
        mine = [set(ranks[r]["placement"]["grad_always_sharded"]["low_rank"][step]) for r in range(2)]
        assert mine[0] | mine[1] == layers and not mine[0] & mine[1]
    assert all(step == [] for step in first["grad_off_replicated"]["low_rank"])
    for placement in ("replicated", "sharded"):
        assert first[f"low_rank_vs_dense_{placement}"] < 1e-5  # P([∂W|∂b]) of the same step, per layer


def test_sharded_bases_refuse_what_needs_them_everywhere_and_load_sharded(ranks):
    first, _ = _placement(ranks)
    refusals = first["refusals"]
    for what in ("save_with_basis", "state_dict_with_basis", "remote_U_in"):
        assert "basis_placement='replicated'" in refusals[what], (what, refusals[what])
    assert "update_basis()" in refusals["set_gamma"]
    assert refusals["state_dict_without_basis"] == 4  # the sums save as usual
    assert first["auto"] == {"cpu": False, "short_memory": True}
    loaded = first["loaded"]
    for key in ("sums", "bases"):  # recomputed by the owners (a collective), or loaded and then sharded
        assert loaded[key]["sharded"] and loaded[key]["remote"]
        assert loaded[key]["kept"] == pytest.approx(loaded["kept_trained"], abs=1e-6)


# ----------------------------------------------------------------------------- pure helpers
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e9), max_size=40), st.integers(1, 8))
def test_assign_greedy_is_deterministic_and_balanced(costs, world):
    owners = assign_greedy(costs, world)
    assert owners == assign_greedy(list(costs), world)
    assert len(owners) == len(costs) and all(0 <= r < world for r in owners)
    loads = [sum(c for c, r in zip(costs, owners) if r == rank) for rank in range(world)]
    if costs:
        # any least-loaded-first rule: makespan <= mean load + largest task
        assert max(loads) <= sum(costs) / world + max(costs) + 1e-6 * max(1.0, sum(costs))
    positive = [c for c in costs if c > 0]
    if len(positive) >= world:
        assert all(load > 0 for load in loads), "a rank was left idle"


def test_assign_greedy_largest_first():
    # d³ costs of four layers on two ranks: the two big ones go to different ranks
    assert assign_greedy([1.0, 1000.0, 999.0, 2.0], 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="world_size"):
        assign_greedy([1.0], 0)


@given(st.integers(0, 30), st.integers(1, 5))
def test_shard_batches_partitions_the_data(n, world):
    data = list(range(n))
    shards = [shard_batches(data, rank, world) for rank in range(world)]
    assert sorted(x for shard in shards for x in shard) == data
    assert [len(shard) for shard in shards] == [len(list(shard)) for shard in shards]


def test_shard_batches_lengths_and_generators():
    assert [len(shard_batches(range(7), rank, 3)) for rank in range(3)] == [3, 2, 2]
    assert len(shard_batches([], 1, 2)) == 0
    generated = shard_batches((i for i in range(5)), 1, 2)  # unsized input: no len, still iterable
    assert not hasattr(generated, "__len__") and list(generated) == [1, 3]


def test_shard_batches_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard_batches([], 2, 2)


# ----------------------------------------------------------------------------- single process
def _tiny_projector(**config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    projector = CrispProjector(model, CrispConfig(target_modules=["0"], gamma=0.9, **config))
    batches = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(2)]
    projector.collect(batches, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(), progress=False)
    return model, projector


def test_without_process_group_nothing_is_distributed():
    _, projector = _tiny_projector()
    assert not projector.is_distributed
    assert projector.eigendecomposition_owners == {}


def test_data_parallel_wrapper_is_unwrapped():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    wrapped = CrispProjector(nn.DataParallel(model), CrispConfig(target_modules=["0"]))
    assert wrapped.model is model and wrapped.target_names == ["0"]


def test_deepspeed_parameters_are_refused_with_the_alternative():
    model, projector = _tiny_projector()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[0].weight.ds_id = 3  # what DeepSpeed ZeRO-3 attaches to the parameters it partitions
    optimizer = CrispOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), projector)
    with pytest.raises(RuntimeError, match="DeepSpeed.*DDP"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="FSDP2"):
        check_supported_parameter(torch.zeros(2, 2), "plain")  # FSDP1 flat-parameter views


# ----------------------------------------------------------------------------- Accelerate
EXAMPLE = REPO / "examples" / "accelerate_edit.py"
DOCUMENTED_RUNS = 3


def run_example(tmp_path: Path, name: str, command: list[str]) -> dict:
    """Run the example with ``command`` (plus ``--output``) and return the main process's JSON."""
    out = tmp_path / f"{name}.json"
    run_until_outputs([*command, "--output", str(out)], [out], tmp_path / f"log_{name}.txt")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory) -> list[dict]:
    """The README's command, ``accelerate launch --multi_gpu --num_processes 2 examples/accelerate_edit.py``,
    run three times in a row with its default (temporary) checkpoint folder.

    Only a free ``--main_process_port`` is added (the default port may be taken by another run on
    the machine), and ``--output`` to read the result. Rank 0 used to delete its temporary folder
    while rank 1 was still loading the checkpoint from it (3 failures in 6 runs on a busy machine).
    """
    tmp_path = tmp_path_factory.mktemp("accelerate_documented")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    return [
        run_example(tmp_path, f"documented_{i}", [*launch, "--main_process_port", str(free_port()),
                                                  "examples/accelerate_edit.py", "--steps", "6"])
        for i in range(DOCUMENTED_RUNS)
    ]


def test_accelerate_example_documented_command_default_checkpoint(documented_runs):
    import tempfile

    assert len(documented_runs) == DOCUMENTED_RUNS
    for result in documented_runs:
        assert result["num_processes"] == 2 and result["state_restored"] is True
        checkpoint = Path(result["checkpoint_dir"])
        # one temporary folder of the main process, shared by both ranks and removed after both loaded it
        assert checkpoint.parent.parent == Path(tempfile.gettempdir()), checkpoint
        assert not checkpoint.parent.exists(), f"{checkpoint.parent} was left behind"
        assert len(set(result["param_checksums"])) == 1, "DDP replicas differ"
    assert len({r["checkpoint_dir"] for r in documented_runs}) == DOCUMENTED_RUNS


def test_accelerate_example_two_processes_match_one(tmp_path, documented_runs):
    one = run_example(tmp_path, "one", [sys.executable, str(EXAMPLE), "--checkpoint-dir", str(tmp_path / "ckpt"),
                                        "--steps", "6"])
    two = documented_runs[0]
    assert one["checkpoint_dir"] == str(tmp_path / "ckpt") and (tmp_path / "ckpt").is_dir()  # given: kept
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert sorted(set(two["eigendecomposition_owners"].values())) == [0, 1]
    assert two["num_tokens"] == one["num_tokens"], "capability shards overlap or miss data"
    for name, traces in one["factor_traces"].items():
        assert two["factor_traces"][name] == pytest.approx(traces, rel=1e-5)
    assert two["kept_fraction"] == pytest.approx(one["kept_fraction"], abs=1e-3)
    for key in ("capability_loss", "edit_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5)
    assert one["edit_loss"][1] < one["edit_loss"][0] - 0.05, "the edit did not land"
    for result in (one, two):
        assert max(result["outside_kept_subspace"].values()) < 1e-4
        assert result["state_restored"] is True
    assert len(set(two["param_checksums"])) == 1, "DDP replicas differ"
    assert two["param_checksums"][0] == pytest.approx(one["param_checksums"][0], rel=1e-6)


def test_accelerate_refuses_deepspeed_and_fsdp1_naming_alternatives(tmp_path):
    from torch_crisp.integrations import accelerate as crisp_accelerate

    from torch_crisp.persistence import read_folder

    _, projector = _tiny_projector()
    with pytest.raises(RuntimeError, match="DeepSpeed.*--multi_gpu"):
        crisp_accelerate.register(FakeAccelerator("DEEPSPEED"), projector)
    with pytest.raises(RuntimeError, match="fsdp_version: 2"):
        crisp_accelerate.collect(FakeAccelerator("FSDP", fsdp_version=1), projector, [])
    accelerator = FakeAccelerator("FSDP", fsdp_version=2)
    crisp_accelerate.register(accelerator, projector)
    assert len(accelerator.save_hooks) == len(accelerator.load_hooks) == 1
    next(iter(accelerator.save_hooks.values()))([], [], str(tmp_path))  # what save_state calls
    state, _ = read_folder(tmp_path / "crisp_projector")
    assert all(entry["basis"] is not None for entry in state["layers"].values())  # bases travel too
    with pytest.raises(TypeError, match="CrispProjector"):
        crisp_accelerate.register(FakeAccelerator("MULTI_GPU"), object())
