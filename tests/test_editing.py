"""Edit requests I/O, batching, evaluation, the edit loop and ``torch-crisp edit``."""

from __future__ import annotations

import json

import pytest
import torch

from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector
from torch_crisp.editing import (
    EditDataError,
    EditRequest,
    EditSettings,
    apply_edits,
    edit_batches,
    encode_example,
    evaluate_requests,
    exact_match,
    generate_answers,
    load_requests,
    locality_reference,
    normalize_answer,
    parse_record,
    save_requests,
    teacher_forced,
    train_only,
)
from torch_crisp.editing.batching import collate
from torch_crisp.editing.evaluation import cut_at_stop
from torch_crisp.losses import IGNORE_INDEX

torch.set_num_threads(1)

EASYEDIT = {
    "prompt": "The capital of Norway is",
    "target_new": "Rome",
    "subject": "Norway",
    "ground_truth": "Oslo",
    "rephrase_prompt": "Norway's capital city is",
    "locality": {"neighborhood": {"prompt": ["The capital of Sweden is"], "ground_truth": ["Stockholm"]}},
    "portability": {"ignored": True},
}
COUNTERFACT = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
}
ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "answers": ["Illinois Institute of Technology"],
    "alt": "University of Michigan",
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}


# ----------------------------------------------------------------------------- requests
def test_parse_the_three_formats() -> None:
    easy = parse_record(EASYEDIT)
    assert (easy.prompt, easy.target_new, easy.subject, easy.target_true) == (
        "The capital of Norway is",
        "Rome",
        "Norway",
        "Oslo",
    )
    assert easy.paraphrases == ["Norway's capital city is"]
    assert easy.locality_prompts == ["The capital of Sweden is"] and easy.locality_answers == ["Stockholm"]

    cf = parse_record(COUNTERFACT)
    assert cf.prompt == "The mother tongue of Danielle Darrieux is"
    assert (cf.target_new, cf.target_true) == ("English", "French")
    assert cf.paraphrases == COUNTERFACT["paraphrase_prompts"]
    assert cf.locality_prompts == COUNTERFACT["neighborhood_prompts"]

    zsre = parse_record(ZSRE)
    assert zsre.prompt == ZSRE["src"] and zsre.target_new == "University of Michigan"
    assert zsre.target_true == "Illinois Institute of Technology"
    assert zsre.paraphrases == [ZSRE["rephrase"]] and zsre.locality_prompts == [ZSRE["loc"]]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"prompt": "x is"}, "'target_new'"),
        ({"target_new": "y"}, "'prompt'"),
        ({"prompt": "x is", "target_new": 3}, "'target_new'"),
        ({"prompt": "", "target_new": "y"}, "'prompt' is empty"),
        ({"prompt": "x", "target_new": "y", "rephrase_prompt": 5}, "'rephrase_prompt'"),
        ({"prompt": "x", "target_new": "y", "locality": {"n": {"ground_truth": "a"}}}, "locality.n"),
        ({"requested_rewrite": {"prompt": "{} is", "subject": "S"}}, "'target_new'"),
        (
            {"requested_rewrite": {"prompt": "no placeholder", "subject": "S", "target_new": {"str": "a"}}},
            "placeholder",
        ),
        ({"src": "q?", "answers": ["a"]}, "'alt'"),
        ({"question": "q"}, "unrecognised"),
    ],
)
def test_malformed_records_name_the_field(record: dict, fragment: str) -> None:
    with pytest.raises(EditDataError, match="record 7") as info:
        parse_record(record, "record 7")
    assert fragment in str(info.value)


def test_load_json_and_jsonl_with_positions(tmp_path) -> None:
    good = tmp_path / "edits.json"
    good.write_text(json.dumps([EASYEDIT, COUNTERFACT, ZSRE]))
    assert [r.target_new for r in load_requests(good)] == ["Rome", "English", "University of Michigan"]
    assert len(load_requests(good, limit=2)) == 2

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"requests": [EASYEDIT]}))
    assert load_requests(wrapped)[0].target_new == "Rome"

    lines = tmp_path / "edits.jsonl"
    lines.write_text(json.dumps(EASYEDIT) + "\n\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(EditDataError, match=r"edits\.jsonl:3: missing required field 'target_new'"):
        load_requests(lines)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([EASYEDIT, {"prompt": "p", "target_new": ""}]))
    with pytest.raises(EditDataError, match=r"bad\.json, record 1: .*'target_new'"):
        load_requests(bad)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(EASYEDIT) + "\n{not json\n")
    with pytest.raises(EditDataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_requests(broken)

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(EditDataError, match="no edit records"):
        load_requests(empty)
    with pytest.raises(FileNotFoundError):
        load_requests(tmp_path / "missing.json")


def test_save_and_load_round_trip(tmp_path) -> None:
    requests = [parse_record(EASYEDIT), parse_record(COUNTERFACT), parse_record(ZSRE)]
    save_requests(requests, tmp_path / "out.json")
    again = load_requests(tmp_path / "out.json")
    for a, b in zip(requests, again):
        assert (a.prompt, a.target_new, a.subject, a.paraphrases, a.locality_prompts) == (
            b.prompt,
            b.target_new,
            b.subject,
            b.paraphrases,
            b.locality_prompts,
        )


# ----------------------------------------------------------------------------- text helpers
def test_stop_and_normalisation() -> None:
    assert cut_at_stop("rome . and more") == "rome "
    assert cut_at_stop("3.5 apples.") == "3.5 apples"
    assert cut_at_stop("first line\nsecond") == "first line"
    assert normalize_answer("  The  Rome!! ") == "the rome"
    assert exact_match("Rome.", "rome") and not exact_match("rome and paris", "rome")
    assert not exact_match("", "")


# ----------------------------------------------------------------------------- tiny model
WORDS = "alpha beta gamma delta lives in works as a the . is of x y z one two three four".split()


@pytest.fixture(scope="module")
def tokenizer():
    from torch_crisp.editing.demo.tokenizer import build_tokenizer

    return build_tokenizer(sorted(set(WORDS)))


def tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


# Targets end with the period so that generation learns to stop (greedy exact match needs it).
REQUESTS = [
    EditRequest("alpha lives in", "x .", "alpha", paraphrases=["the alpha is"], locality_prompts=["gamma lives in"]),
    EditRequest("beta works as a", "two three .", "beta", locality_prompts=["delta works as a", "gamma is"]),
]


def test_batches_score_only_the_target(tokenizer) -> None:
    example = encode_example(tokenizer, "beta works as a", "two three .")
    assert example.prompt_length == 5  # <bos> beta works as a
    assert example.labels[: example.prompt_length] == [IGNORE_INDEX] * 5
    assert tokenizer.decode(example.labels[5:]) == "two three ."
    (batch,) = edit_batches(tokenizer, REQUESTS, batch_size=4)
    assert batch["input_ids"].shape == (2, 8)
    # right padding: row 0 is shorter, padded at the end with mask 0 and label -100
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert (
        batch["labels"][0].tolist()[-4:]
        == [tokenizer.convert_tokens_to_ids(t) for t in ("x", ".")] + [IGNORE_INDEX] * 2
    )
    left = collate([[5, 6], [7, 8, 9]], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]] and left["attention_mask"][0].tolist() == [0, 1, 1]
    with_paraphrases = edit_batches(tokenizer, REQUESTS, batch_size=2, include_paraphrases=True)
    assert sum(b["input_ids"].shape[0] for b in with_paraphrases) == 3


def test_greedy_answers_do_not_depend_on_the_batch(tokenizer) -> None:
    model = tiny_model(tokenizer)
    prompts = ["alpha lives in", "the gamma of delta works as a", "x", "beta is"]
    together = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_teacher_forced_agrees_with_greedy_on_first_token(tokenizer) -> None:
    model = tiny_model(tokenizer, seed=1)
    prompts = ["alpha lives in", "beta works as a", "gamma is"]
    firsts = [a.split()[0] if a.split() else "." for a in generate_answers(model, tokenizer, prompts, max_new_tokens=1)]
    scores = teacher_forced(model, tokenizer, prompts, firsts)
    assert all(s.all_correct and s.accuracy == 1.0 for s in scores if s is not None)


def test_edit_loop_learns_and_update_mode_stays_in_kept_subspace(tokenizer) -> None:
    model = tiny_model(tokenizer)
    targets = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    capability = edit_batches(tokenizer, [EditRequest("gamma is", "one"), EditRequest("delta lives in", "z")], 2)
    projector = CrispProjector(model, CrispConfig(target_modules=targets, gamma=0.9)).collect(
        capability, progress=False
    )
    before = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    reference = locality_reference(model, tokenizer, REQUESTS)
    params = train_only(model, targets)
    assert {id(p) for p in params} == {id(model.get_submodule(n).weight) for n in targets}
    assert sum(p.requires_grad for p in model.parameters()) == 2
    optimizer = CrispOptimizer(torch.optim.Adam(params, lr=2e-2), projector, mode="update")
    run = apply_edits(model, tokenizer, REQUESTS, optimizer, EditSettings(max_epochs=150, batch_size=2, progress=False))
    assert run.learnt[-1] == 1.0 and run.epochs < 150
    for name in targets:
        delta = model.get_submodule(name).weight.detach() - before[name]
        assert torch.allclose(projector.project(name, delta), delta, atol=1e-5)
    metrics = evaluate_requests(model, tokenizer, REQUESTS, reference, max_new_tokens=4)
    assert metrics["reliability"] == 1.0 and metrics["reliability_token_accuracy"] == 1.0
    assert 0.0 <= metrics["locality"] <= 1.0 and metrics["num_locality_prompts"] == 3
    assert metrics["num_paraphrases"] == 1


def test_unchanged_model_has_perfect_locality(tokenizer) -> None:
    model = tiny_model(tokenizer)
    reference = locality_reference(model, tokenizer, REQUESTS)
    assert evaluate_requests(model, tokenizer, REQUESTS, reference)["locality"] == 1.0
    with pytest.raises(ValueError, match="locality references"):
        evaluate_requests(model, tokenizer, REQUESTS, reference[:1])


# ----------------------------------------------------------------------------- CLI
@pytest.fixture()
def saved_model(tmp_path, tokenizer):
    folder = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_edit_collects_factors_edits_and_reports(tmp_path, saved_model, capsys) -> None:
    from torch_crisp.cli import main

    edits = tmp_path / "edits.json"
    save_requests(REQUESTS, edits)
    corpus = tmp_path / "capability.txt"
    corpus.write_text("gamma is one .\ndelta lives in z .\nthe x of y is four .\n")
    out, factors = tmp_path / "edited", tmp_path / "factors"
    argv = [
        "edit",
        "--model",
        str(saved_model),
        "--edits",
        str(edits),
        "--capability-data",
        str(corpus),
        "--factors",
        str(factors),
        "--layers",
        "0",
        "1",
        "--lr",
        "2e-2",
        "--epochs",
        "150",
        "--mode",
        "update",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "edit_report.json").read_text())
    assert report["after"]["reliability"] == 1.0 and report["before"]["reliability"] == 0.0
    assert report["before"]["locality"] == 1.0
    assert report["method"]["layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert (factors / "crisp_config.json").is_file()
    assert "edited 2 facts" in capsys.readouterr().out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    edited = AutoModelForCausalLM.from_pretrained(out)
    assert generate_answers(edited, AutoTokenizer.from_pretrained(out), ["alpha lives in"]) == ["x"]  # stops at "."
    # second run reuses the saved factors
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0


def test_cli_edit_errors_are_one_line(tmp_path, saved_model, capsys) -> None:
    from torch_crisp.cli import main

    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        json.dumps({"prompt": "alpha lives in", "target_new": "x"}) + "\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    code = main(
        ["edit", "--model", str(saved_model), "--edits", str(edits), "--out", str(tmp_path / "o"), "--no-crisp"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "edits.jsonl:2" in err and "target_new" in err

    edits.write_text(json.dumps({"prompt": "alpha lives in", "target_new": "x"}))
    code = main(["edit", "--model", str(saved_model), "--edits", str(edits), "--out", str(tmp_path / "o")])
    assert code == 2 and "--capability-data" in capsys.readouterr().err
    code = main(["edit", "--model", str(tmp_path / "nope"), "--edits", str(edits), "--out", str(tmp_path / "o")])
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_tempered_capability_loss_is_the_plain_loss_at_temperature_one(tokenizer) -> None:
    # The demo collects curvature with a softened softmax; at T = 1 it must be exactly the default
    # (sum-reduced next-token cross-entropy on non-padding tokens), and T > 1 must soften it.
    from torch_crisp.editing.batching import collate_texts
    from torch_crisp.editing.demo.compare import tempered_lm_loss

    model = tiny_model(tokenizer)
    batch = collate_texts(tokenizer, ["alpha lives in x .", "beta works as a two three ."])
    terms = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        plain = model(**batch).loss * terms
        assert torch.allclose(tempered_lm_loss(1.0)(model, batch), plain, rtol=1e-5)
        assert not torch.allclose(tempered_lm_loss(3.0)(model, batch), plain, rtol=1e-3)
