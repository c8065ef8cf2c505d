"""The demo world (determinism, honest splits), its tokenizer, the plot, and ``demo --quick``."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from torch_crisp.editing.demo.plot import write_tradeoff_svg
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


def test_plot_is_an_svg_with_one_point_per_method(tmp_path) -> None:
    results = {
        "base": {"capability": 0.8},
        "methods": {"ft": {"reliability": 1.0, "capability": 0.4}, "crisp": {"reliability": 0.9, "capability": 0.8}},
    }
    text = write_tradeoff_svg(results, tmp_path / "p.svg").read_text()
    assert text.startswith("<svg") and text.count("<circle") == 2 and ">crisp<" in text


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from torch_crisp.cli import main

    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    code = main(["demo", "--quick", "--out", str(root / "out"), "--cache-dir", str(root / "cache"), "--quiet"])
    return code, root, time.perf_counter() - start


def test_quick_demo_writes_results_in_the_documented_shape(quick_run, capsys) -> None:
    code, root, seconds = quick_run
    assert code == 0
    results = json.loads((root / "out" / "results.json").read_text())
    assert (root / "out" / "tradeoff.svg").read_text().startswith("<svg")
    base = results["base"]
    assert base["locality"] == 1.0 and base["locality_subject"] == 1.0
    assert 0.0 <= base["capability"] <= 1.0 and base["perplexity"] > 1.0
    expected = {"ft", "crisp", "crisp-update", "crisp-ekfac", "activations", "lora", "lora-crisp"}
    assert set(results["methods"]) | set(results["skipped"]) == expected
    # results.json records the settings the run used
    from torch_crisp.editing.demo.compare import DemoSettings

    assert results["settings"]["capability_temperature"] == DemoSettings(quick=True).capability_temperature
    for name, metrics in results["methods"].items():
        for key in ("reliability", "generalization", "locality", "capability"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        assert metrics["seconds"] > 0.0
        assert metrics["edit"]["steps"] > 0
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
