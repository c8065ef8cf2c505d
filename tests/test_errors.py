"""Every bad input of the core API gets an error that says what to do."""

from __future__ import annotations

import pytest
import torch
from tiny_models import lm_batch, tiny_llama
from torch import nn

from torch_crisp import CrispConfig, CrispProjector


@pytest.mark.parametrize("gamma", [0, 1, 1.0, -0.5, 2.0, "0.9", True])
def test_config_rejects_gamma_outside_open_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma"):
        CrispConfig(gamma=gamma)


@pytest.mark.parametrize("targets", [[], "", [""], 3, ["ok", 4]])
def test_config_rejects_malformed_target_modules(targets):
    with pytest.raises(ValueError, match="target_modules"):
        CrispConfig(target_modules=targets)


def test_config_rejects_invalid_regex_and_unknown_options():
    with pytest.raises(ValueError, match="regular"):
        CrispConfig(target_modules="mlp.(down")
    with pytest.raises(ValueError, match="fisher"):
        CrispConfig(fisher="exact")
    with pytest.raises(ValueError, match="factor_dtype"):
        CrispConfig(factor_dtype="bfloat16")


@pytest.mark.parametrize("targets", [["mlp.nowhere"], r".*\.nowhere", ["down_proj", "nowhere"]])
def test_pattern_matching_nothing_names_the_pattern(targets):
    with pytest.raises(ValueError, match="nowhere") as info:
        CrispProjector(tiny_llama(), CrispConfig(target_modules=targets))
    assert "down_proj" in str(info.value)  # lists available modules to pick from


def test_target_matching_suffix_regex_and_all_linear():
    model = tiny_llama()
    by_suffix = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"])).target_names
    assert by_suffix == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    by_regex = CrispProjector(model, CrispConfig(target_modules=r"model\.layers\.1\..*_proj")).target_names
    assert len(by_regex) == 7 and all(n.startswith("model.layers.1.") for n in by_regex)
    everything = CrispProjector(model, CrispConfig(target_modules="all-linear")).target_names
    assert len(everything) == 14 and "lm_head" not in everything
    # a suffix matches whole name components only, never a substring of one
    with pytest.raises(ValueError):
        CrispProjector(model, CrispConfig(target_modules=["own_proj"]))


def test_model_without_linear_layers_is_rejected():
    with pytest.raises(ValueError, match="no nn.Linear"):
        CrispProjector(nn.Sequential(nn.ReLU()), CrispConfig(target_modules="all-linear"))


def test_collect_without_data_or_labels_or_loss_fn():
    projector = CrispProjector(tiny_llama(), CrispConfig())
    with pytest.raises(ValueError, match="no batches"):
        projector.collect([], progress=False)
    batch = lm_batch(0)
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        projector.collect([batch], progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        projector.collect([torch.zeros(2, 3)], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        projector.collect([lm_batch(0)], max_batches=0, progress=False)


def test_max_batches_stops_early():
    projector = CrispProjector(tiny_llama(), CrispConfig())
    batches = [lm_batch(s, pad_rows=0) for s in range(5)]
    projector.collect(batches, max_batches=2, progress=False)
    assert projector.num_tokens(projector.target_names[0]) == 2 * batches[0]["input_ids"].numel()


def test_projection_before_any_basis_is_a_runtime_error():
    projector = CrispProjector(tiny_llama(), CrispConfig())
    projector.model(**lm_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="collect"):
        projector.project_()
    with pytest.raises(RuntimeError, match="collect"):
        projector.project(projector.target_names[0], torch.zeros(32, 64))
    with pytest.raises(RuntimeError, match="collect"):
        projector.factors(projector.target_names[0])


def test_layer_off_the_loss_path_is_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    projector = CrispProjector(model, CrispConfig(target_modules=["0", "1"]))
    with pytest.raises(RuntimeError, match=r"\['0'\]"):
        # the loss only uses the second layer, applied to a fresh input
        projector.collect([torch.randn(4, 3)], loss_fn=lambda m, x: m[1](x).sum(), progress=False)


def test_unknown_layer_and_wrong_shape():
    projector = CrispProjector(tiny_llama(), CrispConfig()).collect([lm_batch(0)], progress=False)
    with pytest.raises(KeyError, match="projected layers"):
        projector.factors("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match=r"\(32, 64\)"):
        projector.project("model.layers.0.mlp.down_proj", torch.zeros(64, 32))


def test_mask_not_matching_the_token_layout_is_explained():
    projector = CrispProjector(tiny_llama(), CrispConfig())
    batch = lm_batch(0)
    batch["attention_mask"] = batch["attention_mask"][:, :5]
    with pytest.raises((ValueError, RuntimeError)):
        projector.collect([batch], progress=False)


def test_a_tied_target_warns_once_naming_both_modules():
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()  # lm_head.weight is transformer.wte.weight
    with pytest.warns(UserWarning, match=r"'lm_head' with 'transformer\.wte'") as record:
        projector = CrispProjector(model, CrispConfig(target_modules=["lm_head", "mlp.c_proj"]))
    assert len([w for w in record if "tied" in str(w.message)]) == 1
    assert "lm_head" in projector.target_names
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # untied targets: silent
        CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"]))


def test_edit_limit_below_one_and_folders_as_files_are_refused(tmp_path):
    from torch_crisp.corpus import read_documents
    from torch_crisp.editing.requests import load_requests

    edits = tmp_path / "edits.json"
    edits.write_text('[{"prompt": "a", "target_new": "b"}, {"prompt": "c", "target_new": "d"}]')
    assert len(load_requests(edits, limit=1)) == 1
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_requests(edits, limit=0)  # used to return one record
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_requests(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_documents(tmp_path)  # used to say "does not exist"
