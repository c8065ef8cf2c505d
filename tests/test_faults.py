"""Faults: hostile or corrupted projector folders, bad command-line arguments, unbounded computations.

* Manifest fuzzing (Hypothesis): a saved ``crisp_config.json`` with one field replaced by a bad value
  (negative, huge, NaN, a string, a boolean, nested JSON), removed, or joined by an unknown field,
  and tensor files with flipped bytes. Loading either gives a projector equivalent to the saved one
  or raises ``ValueError`` / ``FileNotFoundError``: never another exception, never a hang, never a
  projector that keeps more directions than the saved state.
* Command-line fuzzing: ``collect``, ``inspect`` and ``edit`` with one bad numeric value or path
  exit with code 2 and one line on stderr, without a traceback, before any work, writing nothing.
* Bounded computations: the sort-free threshold of arbitrary curvature equals the literal
  definition, EK-FAC's row-blocked sum equals the chunked one, and LoRA's Householder complement
  spans what the SVD spans.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import lm_batch, tiny_gpt2, tiny_llama

from torch_crisp import CrispConfig, CrispProjector, functional
from torch_crisp import curvature as curvature_models
from torch_crisp.cli import main
from torch_crisp.lora import rectangle_bases
from torch_crisp.persistence import CONFIG_NAME

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (a pathological regular expression, a runaway loop)."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, folder, true projector): a GPT-2 projector saved with its bases."""
    model = tiny_gpt2()
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj", "attn.c_attn"], gamma=0.8))
    projector.collect([lm_batch(0), lm_batch(1)], progress=False)
    folder = projector.save_pretrained(tmp_path_factory.mktemp("saved") / "p", include_basis=True)
    return model, folder, projector


BAD_VALUES = [-1, -7, 0, 2**80, 1e300, -1e-3, float("nan"), float("inf"), "", "abc", "12", True, False, None,
              [], {}, [1, "a"], {"nested": {"deeper": [1.5]}}, 2.0]


def manifest_paths(value, prefix=()):
    """Every key path of a JSON document (the places a mutation can hit)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from manifest_paths(item, (*prefix, key))


def mutate(manifest: dict, path: tuple, action: str, value) -> dict:
    changed = copy.deepcopy(manifest)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):  # "add": an unknown field next to the known ones
        parent[path[-1]]["unexpected_field"] = value
    else:
        parent["unexpected_field"] = value
    return changed


def assert_loads_equivalent_or_refuses(folder: Path, model, true: CrispProjector) -> None:
    try:
        with time_limit(20), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a changed weight dtype or hash only warns
            loaded = CrispProjector.from_pretrained(folder, model)
    except (ValueError, FileNotFoundError):
        return
    assert loaded.target_names == true.target_names
    for name, layer in loaded.layers.items():
        assert torch.equal(layer.basis.mask, true.layers[name].basis.mask), name
        assert torch.equal(layer.A_sum, true.layers[name].A_sum) and layer.token_count == true.layers[name].token_count
    assert loaded.kept_fraction() == true.kept_fraction()  # never silently weaker


@FUZZ
@given(data=st.data())
def test_mutated_manifests_load_equivalently_or_raise_value_errors(saved, tmp_path_factory, data):
    model, folder, true = saved
    manifest = json.loads((folder / CONFIG_NAME).read_text())
    path = data.draw(st.sampled_from(sorted(manifest_paths(manifest), key=str)), label="path")
    action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    value = data.draw(st.sampled_from(BAD_VALUES), label="value")
    work = tmp_path_factory.mktemp("mutated") / "p"
    shutil.copytree(folder, work)
    (work / CONFIG_NAME).write_text(json.dumps(mutate(manifest, path, action, value)))  # NaN written as NaN
    assert_loads_equivalent_or_refuses(work, model, true)


@FUZZ
@given(data=st.data())
def test_flipped_tensor_bytes_are_refused(saved, tmp_path_factory, data):
    model, folder, true = saved
    work = tmp_path_factory.mktemp("flipped") / "p"
    shutil.copytree(folder, work)
    tensors = next(work.glob("crisp_tensors-*.safetensors"))
    content = bytearray(tensors.read_bytes())
    for offset in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=3, unique=True)):
        content[offset] ^= data.draw(st.integers(1, 255), label="mask")
    tensors.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="SHA-256|safetensors"), time_limit(20):
        CrispProjector.from_pretrained(work, model)


@pytest.mark.parametrize("layout", ["truncated", "empty", "missing"])
def test_broken_tensor_files_name_the_file(saved, tmp_path, layout):
    model, folder, _ = saved
    shutil.copytree(folder, tmp_path / "p")
    tensors = next((tmp_path / "p").glob("crisp_tensors-*.safetensors"))
    if layout == "missing":
        tensors.unlink()
        expected: type[Exception] = FileNotFoundError
    else:
        tensors.write_bytes(tensors.read_bytes()[: 0 if layout == "empty" else 200])
        expected = ValueError
    with pytest.raises(expected, match=tensors.name):
        CrispProjector.from_pretrained(tmp_path / "p", model)


# ----------------------------------------------------------------------------- command line
WORDS = "the cat dog sat on a mat ran fast slow big small red blue green house tree car sun moon".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, saved):
    """A tiny model folder with a tokenizer, data and edit files, and a saved projector, all valid."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tiny_llama(seed=3).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data.txt").write_text("the cat sat on a mat\nthe dog ran fast\n")
    (root / "edits.json").write_text(json.dumps([{"prompt": "the cat sat on", "target_new": "mat"}]))
    (root / "plain.file").write_text("not a folder")
    (root / "empty_dir").mkdir()
    shutil.copytree(saved[1], root / "factors")
    return root


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def bad_paths(root: Path, kind: str) -> list[str]:
    below_a_file = str(root / "plain.file" / "below")
    if kind == "input":  # a file to read
        return [str(root / "missing" / "x.txt"), below_a_file, str(root / "empty_dir"), str(root / "plain.file")]
    return [below_a_file, str(root / "plain.file"), str(root / "model")]  # a folder to write (not the model's)


def as_options(args: dict[str, str]) -> list[str]:
    # --flag=value: argparse would take a value such as "-1e+300" or "-inf" for another option
    return [f"{flag}={value}" for flag, value in args.items()]


NEGATIVE_OR_ZERO = st.integers(-(2**70), 0)
NOT_A_FRACTION = st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda g: not 0 < g < 1))
NOT_POSITIVE = st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf]))


def collect_case(root: Path, data: st.DataObject) -> list[str]:
    args = {"--model": str(root / "model"), "--data": str(root / "data.txt"), "--out": str(root / "new_out"),
            "--seq-len": "8", "--batch-size": "2", "--max-tokens": "20", "--gamma": "0.9", "--device": "cpu"}
    flag = data.draw(st.sampled_from(sorted(args) + ["--seed"]), label="flag")
    bad = {
        "--seq-len": st.integers(-(2**70), 1), "--batch-size": NEGATIVE_OR_ZERO, "--max-tokens": st.integers(-5, 1),
        "--gamma": NOT_A_FRACTION, "--seed": st.sampled_from([2**64, -(2**63) - 1, 10**30]),
        "--device": st.sampled_from(["meta", "nonsense", "cuda:7" if torch.cuda.is_available() else "cuda"]),
        "--model": st.sampled_from([*bad_paths(root, "input"), str(root / "empty_dir")]),
        "--data": st.sampled_from([*bad_paths(root, "input"), str(root / "edits.json")]),
        "--out": st.sampled_from(bad_paths(root, "output")),
    }[flag]
    args[flag] = str(data.draw(bad, label="value"))
    return ["collect", "--quiet", *as_options(args)]


def inspect_case(root: Path, data: st.DataObject) -> list[str]:
    flag = data.draw(st.sampled_from(["folder", "--gamma", "--plot"]), label="flag")
    folder = str(root / "factors")
    if flag == "folder":
        folder = data.draw(st.sampled_from([*bad_paths(root, "input"), str(root / "model")]), label="value")
        return ["inspect", folder]
    if flag == "--gamma":
        return ["inspect", folder, f"--gamma={data.draw(NOT_A_FRACTION, label='value')}"]
    plot = data.draw(st.sampled_from([str(root / "new_plot.txt"), str(root / "plain.file" / "p.png"),
                                      str(root / "empty_dir")]), label="value")
    return ["inspect", folder, "--plot", plot]


def edit_case(root: Path, data: st.DataObject) -> list[str]:
    args = {"--model": str(root / "model"), "--edits": str(root / "edits.json"), "--out": str(root / "new_out"),
            "--factors": str(root / "factors"), "--epochs": "2", "--lr": "1e-3", "--batch-size": "2",
            "--max-new-tokens": "4", "--device": "cpu"}
    flag = data.draw(st.sampled_from(sorted(args) + ["--gamma", "--stop-at", "--limit", "--seed"]), label="flag")
    bad = {
        "--epochs": NEGATIVE_OR_ZERO, "--batch-size": NEGATIVE_OR_ZERO, "--max-new-tokens": NEGATIVE_OR_ZERO,
        "--limit": NEGATIVE_OR_ZERO, "--lr": NOT_POSITIVE, "--gamma": NOT_A_FRACTION,
        "--stop-at": st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0 < v <= 1),
        "--seed": st.sampled_from([2**64, 10**30]), "--device": st.sampled_from(["meta", "nonsense"]),
        "--model": st.sampled_from(bad_paths(root, "input")),
        "--edits": st.sampled_from([*bad_paths(root, "input"), str(root / "data.txt")]),
        "--out": st.sampled_from(bad_paths(root, "output")),
        "--factors": st.sampled_from([str(root / "plain.file"), str(root / "empty_dir"), str(root / "model"),
                                      str(root / "new_factors")]),  # the last: missing without --capability-data
    }[flag]
    args[flag] = str(data.draw(bad, label="value"))
    return ["edit", "--quiet", *as_options(args)]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bad_arguments_exit_2_with_one_line_before_any_work(workspace, data):
    case = data.draw(st.sampled_from([collect_case, inspect_case, edit_case]), label="command")
    argv = case(workspace, data)
    before = snapshot(workspace)
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout), time_limit(20):
        code = main(argv)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert code == 2, (argv, stderr.getvalue())
    assert len(lines) == 1 and "Traceback" not in stderr.getvalue(), lines
    assert lines[0].startswith(f"torch-crisp {argv[0]}: error: ")
    assert snapshot(workspace) == before  # nothing written, no output folder created


# ----------------------------------------------------------------------------- bounded computations
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.lists(st.one_of(st.floats(0.0, 1.0, width=64), st.integers(0, 3).map(float),
                       st.sampled_from([0.0, -0.0, 1e-300, 1e-12, 0.5, 2.0])), min_size=1, max_size=40),
    st.floats(0.01, 0.99),
    st.integers(3, 16),
)
def test_sort_free_threshold_equals_the_definition_on_arbitrary_curvature(values, gamma, chunk):
    curvature = torch.tensor(values, dtype=torch.float64)
    expected = functional.threshold_from_curvature(curvature, gamma)
    saved_chunk = curvature_models._CHUNK
    curvature_models._CHUNK = chunk  # chunk boundaries inside the data
    try:
        found = curvature_models._threshold_by_radix_search(curvature, gamma)
    finally:
        curvature_models._CHUNK = saved_chunk
    assert found == expected or (math.isinf(found) and math.isinf(expected))


def test_corrected_mask_of_a_large_grid_needs_no_sort(monkeypatch):
    grid = torch.rand(300, 500, generator=torch.Generator().manual_seed(0)).pow(4).float()  # > 2^17 entries
    grid[:5] = 0.25  # ties
    expected_tau = functional.threshold_from_curvature(grid, 0.9)

    def no_sort(*args, **kwargs):
        raise AssertionError("the grid was sorted")

    monkeypatch.setattr(torch, "sort", no_sort)
    mask, tau = curvature_models.corrected_mask(grid, 0.9)
    monkeypatch.undo()
    assert tau == expected_tau
    assert torch.equal(mask, grid.double() < expected_tau)


def test_ekfac_sum_of_a_layer_above_the_budget_never_holds_a_whole_rotated_gradient():
    g = torch.Generator().manual_seed(1)
    inputs, grads = torch.randn(3, 5, 7, generator=g, dtype=torch.float64), torch.randn(3, 5, 6, generator=g,
                                                                                          dtype=torch.float64)
    U_in = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))[0]
    U_out = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    reference = curvature_models.ekfac_curvature_sum(inputs, grads, U_in, U_out)
    largest = []
    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        result = real_matmul(a, b)
        largest.append(result.numel())
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "__matmul__", recording_matmul)
        blocked = curvature_models.ekfac_curvature_sum(inputs, grads, U_in, U_out, max_elements=14)
    torch.testing.assert_close(blocked, reference, rtol=1e-12, atol=1e-12)
    assert max(largest) <= 5 * 7  # per-position rotations and 2 × 7 blocks; never 6 × 7 or (3, 6, 7)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(0, 10_000), st.data())
def test_householder_complement_spans_what_the_svd_spans(d_in, seed, data):
    g = torch.Generator().manual_seed(seed)
    U_in = torch.linalg.qr(torch.randn(d_in + 1, d_in + 1, generator=g, dtype=torch.float64))[0]
    k = data.draw(st.integers(1, d_in + 1), label="columns")
    cols = torch.randperm(d_in + 1, generator=g)[:k].sort().values
    _, basis = rectangle_bases(torch.eye(2, dtype=torch.float64), U_in, torch.tensor([0]), cols, d_in)
    selected = U_in[:, cols]
    _, _, Vh = torch.linalg.svd(selected[d_in:], full_matrices=True)  # the former O(|C|³) construction
    reference = (selected @ Vh[1:].mT)[:d_in]
    assert basis.shape == reference.shape == (d_in, k - 1)
    torch.testing.assert_close(basis.mT @ basis, torch.eye(k - 1, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(basis @ basis.mT, reference @ reference.mT, atol=1e-10, rtol=0)
