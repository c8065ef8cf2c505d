"""The demo world (determinism, honest splits), its tokenizer, the plot, and ``demo --quick``."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest
import torch

from torch_crisp.editing.demo.world import WorldSpec, build_world

torch.set_num_threads(1)


def test_world_is_deterministic_and_seeded() -> None:
    a, b = build_world(WorldSpec.quick()), build_world(WorldSpec.quick())
    assert a.pretraining_texts() == b.pretraining_texts()
    assert [r.to_dict() for r in a.edit_requests()] == [r.to_dict() for r in b.edit_requests()]
    c = build_world(WorldSpec.quick(seed=1))
    assert c.pretraining_texts() != a.pretraining_texts()


def test_world_does_not_depend_on_the_process_hash_seed() -> None:
    # The cached base model is keyed by the world spec: the same spec must give the same world in
    # every process (string hashing is randomised per process).
    import os
    import subprocess
    import sys

    code = (
        "import hashlib; from torch_crisp.editing.demo.world import WorldSpec, build_world; "
        "w = build_world(WorldSpec.quick()); "
        "blob = repr((w.pretraining_texts(), [r.to_dict() for r in w.edit_requests()])); "
        "print(hashlib.sha256(blob.encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_splits_do_not_flatter_any_metric() -> None:
    world = build_world(WorldSpec())
    edit, loc, anchor = set(world.edit_entities), set(world.locality_entities), set(world.anchor_entities)
    assert not (edit & loc or edit & anchor or loc & anchor)
    assert len(edit) == 100
    # curvature never sees the edited subjects or the locality neighbours (their name words, shared
    # with other entities, do occur)
    capability = "\n".join(f" {text} " for text in world.capability_texts())
    assert not any(f" {name} " in capability for name in edit | loc)
    assert any(f" {name} " in capability for name in anchor)
    # skill test problems are never trained on
    train = {p.prompt for p in world.skill_train}
    assert not any(p.prompt in train for p in world.skill_test)
    assert {p.skill for p in world.skill_test} == {"addition", "reverse"}
    requests = world.edit_requests()
    for request in requests:
        assert request.target_new != request.target_true
        assert world.facts[request.subject, world.edited_relation[request.subject]] == request.target_true
        assert request.prompt not in request.paraphrases and len(request.paraphrases) == 2
        assert all(" ".join(p.split()[:2]) in loc for p in request.locality_prompts)
    assert len(world.subject_probes()) == 2 * len(requests)


def test_entity_names_are_two_shared_words() -> None:
    # No single token may identify an entity, or the embeddings store its facts (docs/editing.md).
    world = build_world(WorldSpec())
    names = world.entities
    assert len(set(names)) == len(names) == 200
    assert all(len(name.split()) == 2 for name in names)
    first = Counter(name.split()[0] for name in names)
    last = Counter(name.split()[1] for name in names)
    assert not set(first) & set(last)
    assert min(first.values()) >= 2 and min(last.values()) >= 2
    assert len(first) <= 15 and len(last) <= 15
    one_word = build_world(WorldSpec(two_word_names=False))
    assert all(len(name.split()) == 1 for name in one_word.entities)


def test_tokenizer_covers_the_world_one_word_per_token() -> None:
    from torch_crisp.editing.demo.tokenizer import build_tokenizer

    world = build_world(WorldSpec.quick())
    tokenizer = build_tokenizer(world.vocabulary())
    for text in world.pretraining_texts() + world.heldout_texts():
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert len(ids) == len(text.split()) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def _synthetic_results() -> dict:
    """A one-seed results dict of seven methods, several of them at the same point (as in real runs)."""
    rows = {
        "ft": (1.0, 0.85, 0.93), "crisp": (1.0, 0.98, 0.965), "crisp-update": (1.0, 0.97, 0.937),
        "crisp-ekfac": (1.0, 0.98, 0.965), "activations": (1.0, 0.895, 0.958), "lora": (1.0, 0.46, 0.303),
        "lora-crisp": (0.9, 0.76, 0.88),
    }
    return {
        "base": {"capability": 0.972},
        "methods": {n: {"reliability": r, "locality": loc, "capability": c} for n, (r, loc, c) in rows.items()},
    }


def test_plot_puts_locality_on_an_axis_and_names_every_method_in_the_legend(tmp_path) -> None:
    from torch_crisp.editing.demo.plot import points_from_results, tradeoff_figure, write_tradeoff_png

    results = _synthetic_results()
    points = points_from_results(results)
    assert [p.name for p in points] == list(results["methods"])
    crisp = next(p for p in points if p.name == "crisp")
    assert crisp.locality == 0.98 and crisp.capability_retained == pytest.approx(0.965 / 0.972)
    full, zoom = tradeoff_figure(points, "t").axes  # LoRA lies far off: a second panel zooms on the rest
    assert "locality" in full.get_xlabel() and "capability" in full.get_ylabel()
    legend = [t.get_text() for t in zoom.get_legend().get_texts()]
    assert len(legend) == len(points) + 1  # the base model, then one entry per method (no overlapping labels)
    assert "lora-crisp: reliability 0.90" in legend
    low, high = full.get_xlim()
    assert low < 0.46 and 1.0 < high < 1.1  # every method in view, the axis not wasted on [0, 0.4]
    low, high = zoom.get_xlim()
    assert 0.75 < low < 0.85 and zoom.get_ylim()[0] > 0.9  # ft (0.85) to the base model, LoRA (0.46) cut off
    assert len(tradeoff_figure(points[:2], "t").axes) == 1  # nothing far off: one panel
    path = write_tradeoff_png(points, tmp_path / "p.png", "t")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_of_several_seeds_has_the_range_as_error_bars(tmp_path) -> None:
    from torch_crisp.editing.demo.plot import points_from_summary, tradeoff_figure
    from torch_crisp.editing.demo.report import summarize_runs

    first, second = _synthetic_results(), _synthetic_results()
    second["methods"]["ft"]["locality"] = 0.65
    for run in (first, second):
        for metrics in run["methods"].values():
            metrics["capability_retained"] = metrics["capability"] / run["base"]["capability"]
    summary = summarize_runs({"0": first, "1": second})
    assert summary["methods"]["ft"]["locality"] == {"mean": 0.75, "min": 0.65, "max": 0.85, "values": [0.85, 0.65]}
    points = points_from_summary(summary)
    ft = next(p for p in points if p.name == "ft")
    assert ft.locality == 0.75 and ft.locality_range == (0.65, 0.85)
    axes = tradeoff_figure(points, "t").axes[0]
    assert len(axes.containers) == len(points)  # one errorbar container per method, on each panel
    ft_bars = axes.containers[0]
    assert ft_bars.has_xerr and ft_bars.has_yerr


def test_without_matplotlib_there_is_no_picture(tmp_path, monkeypatch) -> None:
    import sys

    from torch_crisp.editing.demo.plot import points_from_results, write_tradeoff_png

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert write_tradeoff_png(points_from_results(_synthetic_results()), tmp_path / "p.png", "t") is None
    assert not (tmp_path / "p.png").exists()


def test_summary_table_shows_mean_and_range_of_every_column() -> None:
    from torch_crisp.editing.demo.report import COLUMNS, format_summary_table, summarize_runs

    runs = {"0": _synthetic_results(), "3": _synthetic_results()}
    runs["3"]["methods"]["lora"]["locality"] = 0.26
    for run in runs.values():
        run["base"].update(reliability=0.0, locality=1.0)
    lines = format_summary_table(summarize_runs(runs), [0, 3]).splitlines()
    assert "0, 3" in lines[0] and all(label in lines[1] for _, label in COLUMNS)
    lora = lines.index(next(line for line in lines if line.startswith("lora ")))
    assert lines[lora].split()[:5] == ["lora", "mean", "1.000", "-", "0.360"]
    assert lines[lora + 1].split()[:3] == ["range", "1.000-1.000", "-"] and "0.260-0.460" in lines[lora + 1]


def test_library_warnings_are_captured_not_printed(capsys) -> None:
    import logging
    import warnings

    from torch_crisp.editing.demo.environment import captured_library_warnings, summarize_warnings

    with captured_library_warnings() as messages:
        warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
        warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a logged warning")
    err = capsys.readouterr().err
    assert "deprecated thing" not in err and "a logged warning" not in err
    summary = summarize_warnings(messages)
    assert {"message": "FutureWarning: deprecated thing", "count": 2} in summary
    assert any("a logged warning" in item["message"] for item in summary)
    assert logging.getLogger("transformers").handlers is not None  # handlers restored afterwards


def test_progress_text_names_the_targets_that_stop_pretraining() -> None:
    from torch_crisp.editing.demo.pretrain import TrainSpec, _progress_text

    text = _progress_text({"fact_accuracy": 0.5, "skill_accuracy": 0.25}, TrainSpec(), 1.0)
    assert "facts 0.50/0.99" in text and "skills 0.25/0.97" in text and "16000" in text


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, demo_cache):
    """The quick demo, run once; ``root / "cache"`` is the session's shared demo cache."""
    from torch_crisp.cli import main

    root = tmp_path_factory.mktemp("demo")
    (root / "cache").symlink_to(demo_cache, target_is_directory=True)
    start = time.perf_counter()
    code = main(["demo", "--quick", "--out", str(root / "out"), "--cache-dir", str(root / "cache"), "--quiet"])
    return code, root, time.perf_counter() - start


def test_quick_demo_writes_results_in_the_documented_shape(quick_run, capsys) -> None:
    code, root, seconds = quick_run
    assert code == 0
    results = json.loads((root / "out" / "results.json").read_text())
    assert (root / "out" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    base = results["base"]
    assert base["locality"] == 1.0 and base["locality_subject"] == 1.0
    assert 0.0 <= base["capability"] <= 1.0 and base["perplexity"] > 1.0
    from torch_crisp.editing.demo.settings import ALL_METHODS

    assert set(results["methods"]) | set(results["skipped"]) == set(ALL_METHODS)
    assert (root / "out" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    # results.json records the settings the run used
    from torch_crisp.editing.demo.compare import DemoSettings

    assert results["settings"]["capability_temperature"] == DemoSettings(quick=True).capability_temperature
    for name, metrics in results["methods"].items():
        for key in ("reliability", "generalization", "locality", "capability"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert metrics["seconds"] > 0.0
        assert metrics["edit"]["steps"] > 0
        assert metrics["capability_retained"] == pytest.approx(metrics["capability"] / base["capability"])
        # every row sets K-FAC's prediction beside the measured capability loss increases
        assert metrics["predicted_increase"] >= 0.0 and metrics["predicted_heldout_increase"] >= 0.0
        for key in ("heldout_loss", "heldout_tempered_loss", "corpus_tempered_loss"):
            assert metrics[f"{key}_increase"] == pytest.approx(metrics[key] - base[key])
        assert metrics["heldout_loss"] == pytest.approx(math.log(metrics["perplexity"]))
    # what the timings and the rounding come from
    environment = results["environment"]
    assert environment["threads"] == 1 and environment["cpu"] and environment["python"]
    assert {"torch", "transformers", "peft", "torch_crisp"} <= {k for k, v in environment["versions"].items() if v}
    assert results["pretraining"]["threads"] == 1
    assert isinstance(results["warnings"], list)
    assert results["files"][0] == "results.json" and "base-model" in results["files"]
    print(f"quick demo took {seconds:.1f} s")  # visible with -s; the issue asks for < 60 s


def test_quick_demo_reuses_its_cached_base_model(quick_run) -> None:
    from torch_crisp.editing.demo.compare import DemoSettings, run_demo

    _, root, _ = quick_run
    results = run_demo(
        DemoSettings(quick=True, methods=("crisp",), cache_dir=str(root / "cache"), progress=False, log=lambda _: None)
    )
    assert results["pretraining"]["cached"] is True
    # same world, same base model: the base row is reproduced exactly
    first = json.loads((root / "out" / "results.json").read_text())
    assert results["base"]["capability"] == first["base"]["capability"]
    assert results["methods"]["crisp"]["reliability"] == first["methods"]["crisp"]["reliability"]


def test_demo_settings_choose_the_anchor_count(capsys) -> None:
    from torch_crisp.cli import main
    from torch_crisp.editing.demo.compare import DemoSettings

    default, _, _ = DemoSettings().resolved_specs()
    anchors = default.num_anchor_entities + 7
    world, _, _ = DemoSettings(num_anchors=anchors, seed=2).resolved_specs()
    assert (world.num_anchor_entities, world.num_edits, world.seed) == (anchors, default.num_edits, 2)
    assert DemoSettings(quick=True, num_anchors=9).resolved_specs()[0].num_anchor_entities == 9
    assert main(["demo", "--anchors", "0", "--out", "unused"]) == 2
    assert "--anchors must be a positive integer" in capsys.readouterr().err


def test_demo_warns_when_the_base_model_did_not_learn_the_world(tmp_path) -> None:
    from torch_crisp.editing.demo.compare import DemoSettings, run_demo
    from torch_crisp.editing.demo.pretrain import TrainSpec

    settings = DemoSettings(
        quick=True, methods=("ft",), max_epochs=1, cache_dir=str(tmp_path), progress=False, log=lambda _: None,
        train_spec=TrainSpec(max_steps=2, check_every=1),
    )
    with pytest.warns(UserWarning, match="below its pretraining targets"):
        results = run_demo(settings)
    assert results["pretraining"]["final"]["fact_accuracy"] < 0.5


def test_quick_demo_leaves_files_the_other_commands_read(quick_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch_crisp.corpus import read_documents
    from torch_crisp.editing.requests import load_requests

    _, root, _ = quick_run
    out = root / "out"
    world = build_world(WorldSpec.quick())
    # a normal Hugging Face model folder holding the *base* weights (the cached model, not an edited one)
    model = AutoModelForCausalLM.from_pretrained(out / "base-model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "base-model", local_files_only=True)
    assert (out / "base-model" / "model.safetensors").is_file()
    from torch_crisp.editing.demo.pretrain import cache_path
    from torch_crisp.editing.demo.settings import DemoSettings

    folder = cache_path(world, *DemoSettings(quick=True).resolved_specs()[1:], root / "cache")
    cached = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    cached_state = cached.state_dict()
    assert all(torch.equal(t, cached_state[k]) for k, t in model.state_dict().items())
    ids = tokenizer(world.capability_texts()[0])["input_ids"]
    assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.bos_token_id
    # one document per line, read back as such by collect / edit
    assert read_documents(out / "capability.txt") == world.capability_texts()
    assert read_documents(out / "heldout.txt") == world.heldout_texts()
    requests = load_requests(out / "edits.json")
    expected = world.edit_requests()
    assert [(r.prompt, r.target_new, r.target_true, r.paraphrases, r.locality_prompts) for r in requests] == [
        (r.prompt, r.target_new, r.target_true, r.paraphrases, r.locality_prompts) for r in expected
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gamma", "1.5"], "--gamma must be in (0, 1), got 1.5"),
        (["--gamma", "0"], "--gamma must be in (0, 1)"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lora-lr", "0"], "--lora-lr must be a positive number"),
        (["--temperature", "nan"], "--temperature must be a positive number"),
        (["--layers", "99"], "--layers must be block indices 0-3 (the model has 4), got 99"),
        (["--quick", "--layers", "0", "0"], "--layers must not repeat a block"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--edits", "-2"], "--edits must be a positive integer"),
        (["--seed", "-3"], "--seed must be a non-negative integer"),
        (["--seeds", "1", "1"], "--seeds must not repeat a seed"),
        (["--seeds", "2", "-1"], "--seeds must be non-negative integers"),
        (["--methods", "ft", "ft"], "--methods must not repeat a method"),
        (["--methods", "ewc:100", "ewc:1e2"], "--methods must not repeat a method"),
        (["--methods", "ewc:-1"], "--methods need lambda a positive number after ewc:, got ewc:-1"),
        (["--methods", "ft:3"], "--methods take a setting (NAME:VALUE) only for"),
        (["--methods", "sgd"], "--methods must be among"),
        (["--budget", "0"], "--budget must be a positive number"),
        (["--ewc-lambda", "-1"], "--ewc-lambda must be a positive number"),
        (["--sweep", "--grid"], "--grid cannot be combined with --sweep"),
        (["--sweep", "--budgets", "0.1", "-2"], "--budgets must be a positive number, got -2.0"),
        (["--sweep", "--gammas", "1"], "--gammas must be in (0, 1), got 1.0"),
    ],
)
def test_demo_arguments_are_checked_before_any_work(tmp_path, capsys, flags, message) -> None:
    from torch_crisp.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["demo", *flags, "--out", str(out), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torch-crisp demo: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not cache.exists()  # nothing was built, pretrained or written


def test_demo_refuses_an_output_path_that_is_a_file(tmp_path, capsys) -> None:
    from torch_crisp.cli import main

    (tmp_path / "taken").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "taken"), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "cache").exists()


def test_several_seeds_are_summarised_with_mean_and_range(tmp_path) -> None:
    from torch_crisp.editing.demo.compare import DemoSettings
    from torch_crisp.editing.demo.pretrain import TrainSpec
    from torch_crisp.editing.demo.report import TABLE_LEGEND, table_header
    from torch_crisp.editing.demo.seeds import run_seeds

    # Two-step pretraining keeps this fast; the base models then miss their targets (a warning).
    lines: list[str] = []
    settings = DemoSettings(
        quick=True, methods=("ft", "crisp"), max_epochs=1, cache_dir=str(tmp_path / "cache"), progress=False,
        log=lambda _: None, table=lines.append, train_spec=TrainSpec(max_steps=2, check_every=1),
    )
    torch.set_num_threads(2)
    try:
        with pytest.warns(UserWarning, match="below its pretraining targets"):
            results = run_seeds(settings, [3, 1], tmp_path / "out")
        assert torch.get_num_threads() == 2  # the run's one thread was restored
    finally:
        torch.set_num_threads(1)
    assert results["seeds"] == [3, 1] and list(results["runs"]) == ["3", "1"]
    assert [r["settings"]["world"]["seed"] for r in results["runs"].values()] == [3, 1]
    assert [r["environment"]["threads"] for r in [results, *results["runs"].values()]] == [1, 1, 1]
    for name in ("ft", "crisp"):
        for key in ("reliability", "locality", "capability", "perplexity", "seconds"):
            cell = results["summary"]["methods"][name][key]
            values = [r["methods"][name][key] for r in results["runs"].values()]
            assert cell["values"] == values and cell["min"] == min(values) and cell["max"] == max(values)
            assert cell["mean"] == pytest.approx(sum(values) / 2)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["summary"]["methods"]["ft"]["locality"]["values"] == results["summary"]["methods"]["ft"][
        "locality"]["values"]
    assert (tmp_path / "out" / "tradeoff.png").is_file()
    for seed in (3, 1):
        assert (tmp_path / "out" / f"seed-{seed}" / "results.json").is_file()
        assert (tmp_path / "out" / f"seed-{seed}" / "edits.json").is_file()
    # each seed's table: legend and header before its first row
    first = lines.index("seed 3:")
    assert lines[first + 1] == TABLE_LEGEND and lines[first + 2] == table_header()
    assert lines[first + 3].startswith("base ") and lines[first + 4].startswith("ft ")


def test_quick_demo_runs_the_budget_and_the_peers(quick_run) -> None:
    _, root, _ = quick_run
    results = json.loads((root / "out" / "results.json").read_text())
    methods = results["methods"]
    budget = methods["crisp-budget"]
    assert budget["budget"] == results["settings"]["budget"] == 0.02
    # the library's own report of the last step and the demo's L̂ of the final weights agree, within ε
    assert budget["budget_predicted_increase"] <= 0.02 * (1 + 1e-6)
    assert budget["predicted_increase"] == pytest.approx(budget["budget_predicted_increase"], rel=1e-4, abs=1e-7)
    assert methods["ewc"]["ewc_lambda"] == 1000.0 and methods["ewc"]["penalty"] > 0.0
    assert methods["l2sp"]["l2sp_alpha"] == 0.01 and methods["l2sp"]["penalty"] > 0.0
    # peft's CorDA needs the attrs package, which the hf extra installs: the row must have run
    assert "corda" not in results["skipped"]
    assert methods["corda"]["lr"] == 1e-3 and methods["corda"]["edit"]["steps"] > 0


def test_method_names_carry_one_setting() -> None:
    from torch_crisp.editing.demo.grid import canonical, grid_methods, method_name, parse_method, sweep_methods
    from torch_crisp.editing.demo.settings import ALL_METHODS, DemoSettings

    assert parse_method("ewc:1e2", ALL_METHODS) == ("ewc", 100.0) and canonical("ewc:1e2", ALL_METHODS) == "ewc:100"
    assert parse_method("crisp", ALL_METHODS) == ("crisp", None)
    assert method_name("crisp-budget", 0.003) == "crisp-budget:0.003"
    for bad in ("nope", "ft:1", "ewc:x", "ewc:-1", "crisp:1.5", "crisp-budget:0"):
        with pytest.raises(ValueError):
            parse_method(bad, ALL_METHODS)
    grids = {"ewc": (1.0, 10.0)}
    assert grid_methods(["ft", "ewc", "crisp"], grids) == ["ft", "ewc:1", "ewc:10", "crisp"]
    assert grid_methods(["ewc:5"], grids) == ["ewc:5"]  # a peer with its setting is run as named
    assert sweep_methods([0.01], [0.9]) == ["crisp-budget:0.01", "crisp-update:0.9"]
    settings = DemoSettings(methods=("ft", "ewc"), grid=True)
    assert settings.resolved_methods()[:2] == ["ft", "ewc:1"] and "ewc" not in settings.resolved_methods()
    sweep = DemoSettings(sweep=True, sweep_budgets=(0.1,), sweep_gammas=())
    assert sweep.resolved_methods() == ["crisp-budget:0.1"]


def test_grid_rule_picks_the_most_capability_at_the_reference_reliability() -> None:
    from torch_crisp.editing.demo.grid import choose_settings

    def row(rel: float, cap: float, loc: float) -> dict[str, float]:
        return {"reliability": rel, "capability_retained": cap, "locality": loc}

    rows = {
        "crisp": row(1.0, 0.99, 0.95),
        "ewc:1": row(1.0, 0.90, 0.80), "ewc:10": row(1.0, 0.95, 0.70), "ewc:100": row(0.98, 1.0, 0.99),
        "l2sp:0.1": row(1.0, 0.95, 0.70), "l2sp:1": row(1.0, 0.9502, 0.80),  # a tie on capability: locality
        "corda:0.001": row(0.5, 1.0, 1.0), "corda:0.01": row(0.8, 0.9, 0.9),  # none reaches crisp
    }
    assert choose_settings(rows) == {"ewc": "ewc:10", "l2sp": "l2sp:1", "corda": "corda:0.01"}


def test_quadratic_penalty_adds_the_gradient_of_loss_plus_penalty() -> None:
    from torch_crisp.editing.demo.peers import QuadraticPenalty, add_quadratic_penalty

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    x, weights = torch.randn(5, 4), torch.rand(3, 4)
    start = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    penalty = QuadraticPenalty([layer.weight], [weights])
    handle = add_quadratic_penalty(optimizer, penalty)
    with torch.no_grad():
        layer.weight.add_(0.3)  # away from the anchor, so the penalty has a gradient
    moved = layer.weight.detach().clone().requires_grad_(True)
    expected_loss = (x @ moved.T).square().sum() + 0.5 * (weights * (moved - start).square()).sum()
    (expected_grad,) = torch.autograd.grad(expected_loss, moved)
    (x @ layer.weight.T).square().sum().backward()
    optimizer.step()
    assert torch.allclose(layer.weight, moved - 0.1 * expected_grad, atol=1e-6)
    assert penalty.value() == pytest.approx(0.5 * float((weights * (layer.weight.detach() - start).square()).sum()))
    handle.remove()  # the plain optimizer again
    optimizer.zero_grad()
    before = layer.weight.detach().clone()
    (x @ layer.weight.T).square().sum().backward()
    plain = layer.weight.grad.clone()
    optimizer.step()
    assert torch.allclose(layer.weight, before - 0.1 * plain)


def test_diagonal_fisher_is_the_mean_squared_per_position_gradient() -> None:
    from tiny_models import lm_batch, tiny_llama

    from torch_crisp.editing.demo.peers import diagonal_fisher

    model, name = tiny_llama(), "model.layers.1.mlp.down_proj"
    batch = lm_batch(0)
    fisher = diagonal_fisher(model, [name], [batch], temperature=2.0)[name]
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # left as found
    # brute force: each position's weight gradient g_t a_tᵀ from autograd, squared, averaged
    layer, seen = model.get_submodule(name), {}
    handle = layer.register_forward_hook(lambda _m, args, out: seen.update(a=args[0], z=out))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 2.0
    handle.remove()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss, seen["z"])
    mask = batch["attention_mask"].bool()
    per_position = [torch.outer(g, a).square() for g, a in zip(grad[mask], seen["a"][mask].detach())]
    assert torch.allclose(fisher, torch.stack(per_position).mean(0), rtol=1e-4, atol=1e-12)


def test_demo_collects_curvature_through_the_config_temperature(quick_run) -> None:
    # The demo used its own tempered loss_fn before CrispConfig(temperature=...) existed; the
    # factors must be the same ones.
    from torch_crisp import CrispConfig, CrispProjector
    from torch_crisp.editing.demo.methods import MethodBuilder
    from torch_crisp.editing.demo.pretrain import load_or_pretrain
    from torch_crisp.editing.demo.settings import DemoSettings

    _, root, _ = quick_run
    settings = DemoSettings(quick=True, cache_dir=str(root / "cache"), progress=False, log=lambda _: None)
    world_spec, model_spec, train_spec = settings.resolved_specs()
    world = build_world(world_spec)
    base = load_or_pretrain(world, model_spec, train_spec, cache_dir=settings.cache_dir, progress=False)
    targets = [f"model.layers.{i}.mlp.down_proj" for i in range(model_spec.num_hidden_layers)]
    builder = MethodBuilder(base.model, base.tokenizer, targets, world.capability_texts(), settings)
    projector, _ = builder.projector()
    assert projector.config.temperature == settings.capability_temperature == 3.0

    def tempered_sum(model, batch):  # the demo's former loss_fn
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 3.0
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum",
        )

    reference = CrispProjector(base.model, CrispConfig(target_modules=targets, gamma=settings.gamma))
    reference.collect(builder.batches, progress=False, loss_fn=tempered_sum)
    for name in targets:
        assert all(torch.equal(x, y) for x, y in zip(projector.factors(name), reference.factors(name)))


def test_quick_sweep_writes_both_series(quick_run, tmp_path) -> None:
    from torch_crisp.editing.demo.compare import DemoSettings, run_demo

    _, root, _ = quick_run
    settings = DemoSettings(
        quick=True, sweep=True, sweep_budgets=(0.01, 0.3), sweep_gammas=(0.99,), max_epochs=3,
        cache_dir=str(root / "cache"), progress=False, log=lambda _: None,
    )
    results = run_demo(settings, tmp_path)
    assert list(results["methods"]) == ["crisp-budget:0.01", "crisp-budget:0.3", "crisp-update:0.99"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["value"] for p in sweep["budget"]] == [0.01, 0.3] and [p["value"] for p in sweep["gamma"]] == [0.99]
    for point in sweep["budget"]:
        assert point["predicted_increase"]["mean"] <= point["value"] * (1 + 1e-6)
        for key in ("heldout_loss_increase", "corpus_tempered_loss_increase", "capability", "reliability", "locality"):
            assert point[key]["min"] <= point[key]["mean"] <= point[key]["max"]
    assert sweep["gamma"][0]["reliability"]["mean"] == results["methods"]["crisp-update:0.99"]["reliability"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert results["files"][:2] == ["results.json", "sweep.json"]


def test_reliability_plot_draws_a_line_through_each_methods_settings(tmp_path) -> None:
    from torch_crisp.editing.demo.plot import points_from_results, reliability_figure, write_reliability_png

    results = _synthetic_results()
    for name, (rel, cap) in {"ewc:1": (1.0, 0.90), "ewc:10": (1.0, 0.90), "ewc:100": (0.8, 0.97)}.items():
        results["methods"][name] = {"reliability": rel, "locality": 0.9, "capability": cap * 0.972}
    axes, equal = reliability_figure(points_from_results(results), "t").axes
    legend = [t.get_text() for t in equal.get_legend().get_texts()]
    assert "ewc (settings)" in legend and "crisp" in legend and not any(t.startswith("ewc:") for t in legend)
    assert sorted(t.get_text() for t in axes.texts if t.get_text()[:1].isdigit()) == ["1, 10", "100"]
    assert axes.get_xlim()[0] > 0.25 and "reliability" in axes.get_xlabel()  # lora-crisp 0.9, ewc:100 0.8
    # the second panel: only what reaches reliability 0.99, locality against capability
    assert "locality" in equal.get_xlabel()
    assert sorted(t.get_text() for t in equal.texts if t.get_text()[:1].isdigit()) == ["1, 10"]
    path = write_reliability_png(points_from_results(results), tmp_path / "r.png", "t")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
