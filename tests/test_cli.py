"""`torch-crisp collect` / `inspect` end to end on a tiny local model, plus the corpus reader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import lm_batch, tiny_llama

from torch_crisp import CrispConfig, CrispProjector
from torch_crisp.cli import COMMANDS, build_parser, main
from torch_crisp.corpus import lm_batches, read_documents, token_windows

WORDS = "the cat dog sat on a mat ran fast slow big small red blue green house tree car sun moon".split()
DOCS = [
    "the cat sat on a mat and the dog ran fast",
    "big red car",
    "small blue house near the green tree the sun and the moon",
    "a slow dog",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer built here, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "capability.txt"
    path.write_text("\n\n".join(doc.replace(" and ", "\nand ") for doc in DOCS) + "\n")  # blank-line separated
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ end to end
def test_collect_then_inspect_then_load_in_python(model_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "projector"
    code, stdout, err = run_cli(
        capsys, "collect", "--model", model_dir, "--data", data_txt, "--out", out, "--target-modules",
        "mlp.down_proj", "o_proj", "--gamma", "0.95", "--max-tokens", 28, "--seq-len", 8,
        "--batch-size", 3, "--device", "cpu", "--dtype", "float32",
    )
    assert code == 0, err
    assert "collected 28 tokens" in stdout and str(out) in stdout

    # the folder loads onto the model and holds exactly the factors of the same batches collected
    # in Python: the CLI adds nothing of its own to the mathematics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = CrispProjector.from_pretrained(out, model)
    assert loaded.config.gamma == 0.95 and loaded.config.target_modules == ["mlp.down_proj", "o_proj"]
    assert len(loaded.layers) == 4
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = list(token_windows(tokenizer, read_documents(data_txt), seq_len=8, max_tokens=28))
    assert sum(map(len, windows)) == 28
    reference = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj", "o_proj"], gamma=0.95))
    reference.collect(lm_batches(windows, batch_size=3, pad_id=tokenizer.pad_token_id), progress=False)
    for name, layer in reference.layers.items():
        assert loaded.num_tokens(name) == 28
        torch.testing.assert_close(loaded.layers[name].A_sum, layer.A_sum)
        torch.testing.assert_close(loaded.layers[name].S_sum, layer.S_sum)
    manifest = json.loads((out / "crisp_config.json").read_text())
    assert manifest["metadata"]["tokens"] == 28 and manifest["metadata"]["documents"] == 4

    # inspect: a table for people ...
    code, table, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    assert "model.layers.1.self_attn.o_proj" in table and "kept directions" in table and "N = 28" in table
    # ... and JSON whose numbers agree with the masks the loaded projector applies
    code, text, err = run_cli(capsys, "inspect", out, "--gamma", "0.95", "0.5", "--json")
    assert code == 0, err
    report = json.loads(text)
    kept = loaded.kept_fraction()
    for layer in report["layers"]:
        by_gamma = {p["gamma"]: p for p in layer["gammas"]}
        assert set(by_gamma) == {0.5, 0.95}
        assert by_gamma[0.95]["kept_fraction"] == pytest.approx(kept[layer["name"]], abs=1e-6)
        assert by_gamma[0.95]["tau"] == loaded.layers[layer["name"]].basis.tau
        assert by_gamma[0.5]["kept_fraction"] >= by_gamma[0.95]["kept_fraction"]
        assert layer["num_tokens"] == 28
        # the projection plan at each γ: its blocked fraction is what the mask does not keep
        plan = by_gamma[0.95]["plan"]
        assert plan["path"] in ("full", "complement") and 0 < plan["relative_time"] <= 1.0
        assert plan["blocked_fraction"] == pytest.approx(1 - kept[layer["name"]], abs=1e-6)
    assert "J(0)" in table and "path" in table


def test_inspect_plot_writes_an_image(model_dir, data_txt, tmp_path, capsys):
    out = tmp_path / "p"
    assert run_cli(capsys, "collect", "--model", model_dir, "--data", data_txt, "--out", out, "--quiet",
                   "--seq-len", 16, "--device", "cpu")[0] == 0
    code, _, err = run_cli(capsys, "inspect", out, "--plot", tmp_path / "plots" / "spectrum.png")
    assert code == 0, err
    image = (tmp_path / "plots" / "spectrum.png").read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 10_000


def test_collect_reads_jsonl(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    out = tmp_path / "p"
    code, _, err = run_cli(capsys, "collect", "--model", model_dir, "--data", data, "--text-field", "body",
                           "--out", out, "--quiet", "--device", "cpu", "--save-basis")
    assert code == 0, err
    assert json.loads((out / "crisp_config.json").read_text())["metadata"]["documents"] == 4


# ------------------------------------------------------------------ one-line errors
def test_user_mistakes_are_one_line_errors(model_dir, data_txt, tmp_path, capsys):
    def collect(*extra, data=data_txt, model=model_dir):
        return run_cli(capsys, "collect", "--model", model, "--data", data, "--out", tmp_path / "o", "--quiet", *extra)

    assert_one_line_error(*collect(data=tmp_path / "missing.txt")[::2], "missing.txt", "does not exist")
    assert_one_line_error(*collect(model=tmp_path)[::2], "not a Hugging Face model folder")
    assert_one_line_error(*collect(model=tmp_path / "nope")[::2], "no such folder")
    assert_one_line_error(*collect("--target-modules", "mlp.nothing")[::2], "'mlp.nothing' matches no linear module")
    assert_one_line_error(*collect("--seq-len", "1")[::2], "--seq-len must be an integer of at least 2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{oops\n')
    assert_one_line_error(*collect(data=bad)[::2], "bad.jsonl:2", "invalid JSON")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    assert_one_line_error(*collect(data=odd)[::2], "unsupported data format")

    assert_one_line_error(*run_cli(capsys, "inspect", tmp_path)[::2], "no crisp_config.json")
    assert_one_line_error(*run_cli(capsys, "inspect", tmp_path / "nope")[::2], "does not exist")
    assert_one_line_error(*run_cli(capsys, "inspect", tmp_path, "--gamma", "1.5")[::2], "strictly between 0 and 1")


def test_console_entry_point_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch_crisp.cli", "inspect", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    expected = f"torch-crisp inspect: error: projector folder {tmp_path / 'nowhere'} does not exist"
    assert result.stderr.strip() == expected


def test_subcommands_register_through_functions():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"collect", "inspect"} <= set(subparsers.choices)

    def register_hello(sub):
        p = sub.add_parser("hello")
        p.set_defaults(func=lambda args: 7)

    custom = build_parser([*COMMANDS, register_hello])
    args = custom.parse_args(["hello"])
    assert args.func(args) == 7
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["collect"])  # argparse: missing required flags, exit code 2
    assert info.value.code == 2


# ------------------------------------------------------------------ corpus reader
def test_txt_split_modes(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one doc\n  \nsecond doc\nthird\n")
    assert read_documents(lines, split="line") == ["one doc", "second doc", "third"]
    assert read_documents(lines) == ["one doc", "second doc\nthird"]  # a blank line inside: paragraphs
    plain = tmp_path / "plain.txt"
    plain.write_text("\nfirst\nsecond\n\n")
    assert read_documents(plain) == ["first", "second"]  # only outer blank lines: one per line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        read_documents(empty)


def test_token_windows_respect_documents_and_budget():
    class Splitter:  # any callable returning {"input_ids": [...]} works
        def __call__(self, texts):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    docs = ["a bb ccc dddd eeeee", "x", "yy zz"]
    assert list(token_windows(Splitter(), docs, seq_len=2)) == [[1, 2], [3, 4], [2, 2]]  # [5], [1] dropped
    assert list(token_windows(Splitter(), docs, seq_len=3, max_tokens=5)) == [[1, 2, 3], [4, 5]]
    assert list(token_windows(Splitter(), docs, seq_len=3, max_tokens=4)) == [[1, 2, 3]]  # 1 left: no target
    batches = lm_batches([[5, 6, 7], [8, 9]], batch_size=4, pad_id=0)
    assert batches[0]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batches[0]["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]


@pytest.mark.parametrize("curvature", ["ekfac", "activations"])
def test_inspect_reports_the_curvature_model_the_projector_uses(model_dir, data_txt, tmp_path, capsys, curvature):
    out = tmp_path / curvature
    code, _, err = run_cli(capsys, "collect", "--model", model_dir, "--data", data_txt, "--out", out, "--quiet",
                           "--curvature", curvature, "--seq-len", 8, "--device", "cpu")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    loaded = CrispProjector.from_pretrained(out, AutoModelForCausalLM.from_pretrained(model_dir))
    kept = loaded.kept_fraction()
    code, text, err = run_cli(capsys, "inspect", out, "--json", "--gamma", "0.9")
    assert code == 0, err
    for layer in json.loads(text)["layers"]:
        assert layer["curvature"].startswith(curvature)
        assert layer["gammas"][0]["kept_fraction"] == pytest.approx(kept[layer["name"]], abs=1e-6)
        assert layer["gammas"][0]["tau"] == loaded.layers[layer["name"]].basis.tau


# ------------------------------------------------------------------ checked before any work
@pytest.fixture()
def no_model_loading(monkeypatch):
    """Make loading a model fail loudly: the errors below must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("torch_crisp.commands.collect.load_hf_model", refuse)
    monkeypatch.setattr("torch_crisp.commands.common.load_hf_model", refuse)


def test_output_paths_are_checked_before_any_work(model_dir, data_txt, tmp_path, capsys, no_model_loading):
    (tmp_path / "a_file").write_text("x")
    edits = tmp_path / "edits.json"
    edits.write_text('[{"prompt": "the cat sat on", "target_new": "mat"}]')
    model_files = sorted(p.name for p in model_dir.iterdir())

    def collect(out, *extra, data=data_txt):
        return run_cli(capsys, "collect", "--model", model_dir, "--data", data, "--out", out, "--quiet", *extra)[::2]

    def edit(out, *extra):
        return run_cli(capsys, "edit", "--model", model_dir, "--edits", edits, "--out", out, "--quiet", *extra)[::2]

    assert_one_line_error(*collect(tmp_path / "a_file"), "--out", "is a file")
    assert_one_line_error(*collect(tmp_path / "a_file" / "below"), "cannot be created", "a_file is a file")
    assert_one_line_error(*collect(model_dir), "is the --model folder")
    assert_one_line_error(*edit(model_dir, "--no-crisp"), "is the --model folder")  # used to overwrite the model
    assert_one_line_error(*edit(str(model_dir) + "/", "--no-crisp"), "is the --model folder")
    assert_one_line_error(*edit(tmp_path / "o", "--no-crisp", "--limit", "0"), "--limit must be a positive integer")
    assert_one_line_error(*edit(tmp_path / "o", "--no-crisp", "--lr", "nan"), "--lr must be a finite number")
    assert_one_line_error(*edit(tmp_path / "o", "--gamma", "1.5", "--capability-data", data_txt), "--gamma")
    assert_one_line_error(*edit(tmp_path / "o"), "--capability-data")  # neither factors nor data
    assert_one_line_error(*edit(tmp_path / "o", "--factors", tmp_path), "holds no crisp_config.json")
    assert_one_line_error(*collect(tmp_path / "o", "--device", "meta"), "--device meta cannot run a model")
    assert_one_line_error(*collect(tmp_path / "o", "--gamma", "1"), "--gamma must lie strictly between")
    assert_one_line_error(*collect(tmp_path / "o", data=tmp_path), "--data", "is a folder")  # not "does not exist"
    assert sorted(p.name for p in model_dir.iterdir()) == model_files
    assert not (tmp_path / "o").exists()


def test_a_model_folder_with_a_bad_config_is_a_one_line_error(model_dir, data_txt, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))  # a TypeError inside
    code, _, err = run_cli(capsys, "collect", "--model", broken, "--data", data_txt, "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"--model {broken}: cannot load")
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def saved_factors(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"]))
    projector.collect([lm_batch(0)], progress=False)
    return projector.save_pretrained(tmp_path / "factors")


def test_corrupt_factor_folders_are_one_line_errors(model_dir, saved_factors, tmp_path, capsys):
    edits = tmp_path / "edits.json"
    edits.write_text('[{"prompt": "the cat sat on", "target_new": "mat"}]')
    tensors = next(saved_factors.glob("crisp_tensors-*"))
    tensors.write_bytes(tensors.read_bytes()[:-64])  # truncated
    assert_one_line_error(*run_cli(capsys, "inspect", saved_factors)[::2], tensors.name, "SHA-256")
    code, _, err = run_cli(capsys, "edit", "--model", model_dir, "--edits", edits, "--factors", saved_factors,
                           "--out", tmp_path / "o", "--quiet", "--device", "cpu")
    assert_one_line_error(code, err, tensors.name)
    assert not (tmp_path / "o").exists()

    manifest_path = saved_factors / "crisp_config.json"
    manifest = json.loads(manifest_path.read_text())
    del next(iter(manifest["layers"].values()))["fingerprint"]  # a KeyError before
    manifest_path.write_text(json.dumps(manifest))
    assert_one_line_error(*run_cli(capsys, "inspect", saved_factors)[::2], "crisp_config.json", "fingerprint")


def test_inspect_keeps_no_curvature_grid(saved_factors):
    from torch_crisp.cli import inspect_folder

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, list):
            for item in value:
                yield from tensors(item)

    for plot in (False, True):
        report = inspect_folder(saved_factors, plot=plot)
        assert all(t.dim() <= 1 for t in tensors(report)), [tuple(t.shape) for t in tensors(report)]
    assert all(len(layer["_kept"]) == 60 for layer in report["layers"])  # what the plot draws, per layer


def test_max_tokens_bounds_the_text_handed_to_the_tokenizer():
    class CountingTokenizer:  # one token per word, like a word-level vocabulary
        characters = 0

        def __call__(self, texts):
            self.characters += sum(map(len, texts))
            return {"input_ids": [[len(word) for word in text.split()] for text in texts]}

    line = " ".join(["word"] * 200_000)  # one 1 MB line: one document
    tokenizer = CountingTokenizer()
    windows = list(token_windows(tokenizer, [line, "more text"], seq_len=8, max_tokens=50))
    assert sum(map(len, windows)) == 50 and all(w == [4] * len(w) for w in windows)
    assert tokenizer.characters < 20_000  # the whole line is 1 MB
    # a budget larger than the first prefix yields: the prefix grows until it yields enough
    many = list(token_windows(CountingTokenizer(), [line], seq_len=512, max_tokens=5_000))
    assert sum(map(len, many)) == 5_000


def test_edit_and_collect_take_a_budget_a_temperature_and_threads(model_dir, data_txt, tmp_path, capsys):
    from torch_crisp.cli import build_parser

    args = build_parser().parse_args(["collect", "--model", str(model_dir), "--data", str(data_txt), "--out",
                                      str(tmp_path / "f"), "--temperature", "3", "--threads", "1"])
    assert (args.temperature, args.threads) == (3.0, 1)
    edit = build_parser().parse_args(["edit", "--model", "m", "--edits", "e.json", "--out", "o",
                                      "--capability-budget", "0.01", "--threads", "1"])
    assert edit.capability_budget == 0.01
    assert main(["collect", "--model", str(model_dir), "--data", str(data_txt), "--out", str(tmp_path / "g"),
                 "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["collect", "--model", str(model_dir), "--data", str(data_txt), "--out", str(tmp_path / "h"),
                 "--temperature", "3", "--quiet"]) == 0
    from transformers import AutoModelForCausalLM

    loaded = CrispProjector.from_pretrained(tmp_path / "h", AutoModelForCausalLM.from_pretrained(model_dir))
    assert loaded.config.temperature == 3.0
