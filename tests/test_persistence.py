"""Projector state dicts and folders: exact round trips, validation, atomic writes."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
from tiny_models import lm_batch, tiny_gpt2, tiny_llama

from torch_crisp import CrispConfig, CrispProjector, persistence, serialization

TARGETS = ["mlp.c_proj", "attn.c_attn"]  # GPT-2 Conv1D layers with a bias (transposed storage)


@pytest.fixture(scope="module")
def collected():
    """A GPT-2 projector collected on two batches (model, projector)."""
    model = tiny_gpt2()
    projector = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.8))
    projector.collect([lm_batch(0), lm_batch(1)], progress=False)
    return model, projector


def probe_matrices(projector: CrispProjector, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in projector.layers.items():
        shape = (layer.geometry.d_out, layer.geometry.d_in_augmented)
        out[name] = torch.randn(shape, generator=g)
    return out


def assert_same_projections(a: CrispProjector, b: CrispProjector) -> None:
    assert a.target_names == b.target_names
    for name, Q in probe_matrices(a).items():
        assert torch.equal(a.project(name, Q), b.project(name, Q)), name
        assert torch.equal(a.layers[name].basis.mask, b.layers[name].basis.mask)
        assert a.layers[name].basis.tau == b.layers[name].basis.tau


def assert_same_sums(a: CrispProjector, b: CrispProjector) -> None:
    for name in a.target_names:
        la, lb = a.layers[name], b.layers[name]
        assert torch.equal(la.A_sum, lb.A_sum) and torch.equal(la.S_sum, lb.S_sum)
        assert la.token_count == lb.token_count


# ------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("include_basis", [False, True])
def test_state_dict_round_trip_is_bit_exact_through_weights_only_load(collected, include_basis):
    model, projector = collected
    sd = projector.state_dict(include_basis=include_basis)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # the safety contract for Trainer checkpoints

    fresh = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.5))
    assert not fresh.has_basis
    fresh.load_state_dict(loaded)
    assert fresh.config.gamma == 0.8  # the saved hyper-parameter wins, as in Optimizer.load_state_dict
    assert_same_sums(projector, fresh)
    assert_same_projections(projector, fresh)
    # the loaded projector owns its tensors: collecting more must not change the dict or the source
    first = projector.target_names[0]
    before = projector.layers[first].A_sum.clone()
    fresh.collect([lm_batch(5)], progress=False)
    assert torch.equal(projector.layers[first].A_sum, before)


def test_state_dict_then_more_data_equals_never_saving():
    model = tiny_gpt2()
    original = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    original.collect([lm_batch(0)], progress=False)
    twin = CrispProjector(model, CrispConfig(target_modules=TARGETS)).load_state_dict(original.state_dict())
    for p in (twin, original):
        p.collect([lm_batch(7)], progress=False)
    assert_same_sums(twin, original)
    assert_same_projections(twin, original)


def test_load_state_dict_rejects_other_layers_and_leaves_projector_untouched(collected):
    model, projector = collected
    other = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj", "mlp.c_fc"]))
    with pytest.raises(ValueError) as info:
        other.load_state_dict(projector.state_dict())
    message = str(info.value)
    assert "transformer.h.0.attn.c_attn" in message  # saved, not targeted
    assert "transformer.h.0.mlp.c_fc" in message  # targeted, not saved
    assert all(layer.A_sum is None for layer in other.layers.values())


def test_load_state_dict_rejects_foreign_dicts(collected):
    model, _ = collected
    fresh = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="not a torch_crisp projector state"):
        fresh.load_state_dict({"layers": {}})
    with pytest.raises(ValueError, match="format_version"):
        fresh.load_state_dict({"format": serialization.FORMAT_NAME, "format_version": 99, "layers": {}})


# ------------------------------------------------------------------ folders
@pytest.mark.parametrize("include_basis", [False, True])
def test_save_and_from_pretrained_reproduce_projections_bit_for_bit(collected, tmp_path, include_basis):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "proj", include_basis=include_basis, metadata={"data": "unit"})
    manifest = json.loads((folder / persistence.CONFIG_NAME).read_text())
    assert manifest["metadata"] == {"data": "unit"}
    assert manifest["config"]["gamma"] == 0.8
    fp = manifest["layers"]["transformer.h.1.mlp.c_proj"]["fingerprint"]
    assert (fp["d_out"], fp["d_in"], fp["has_bias"], fp["module_type"]) == (32, 128, True, "Conv1D")
    assert len(fp["weight_sha256"]) == 64

    loaded = CrispProjector.from_pretrained(folder, copy.deepcopy(model))
    assert loaded.config.target_modules == TARGETS
    assert_same_sums(projector, loaded)
    assert_same_projections(projector, loaded)


def test_from_pretrained_gamma_override_recomputes_masks(collected, tmp_path):
    model, projector = collected
    projector.save_pretrained(tmp_path / "p")
    loaded = CrispProjector.from_pretrained(tmp_path / "p", model, gamma=0.99)
    assert loaded.config.gamma == 0.99
    reference = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.99))
    reference.load_state_dict(projector.state_dict())  # saved gamma 0.8 ...
    reference.config.gamma = 0.99
    reference.update_basis()  # ... then re-thresholded
    assert_same_projections(loaded, reference)
    assert sum(loaded.kept_fraction().values()) < sum(projector.kept_fraction().values())


def test_from_pretrained_rejects_a_different_model_listing_every_mismatch(collected, tmp_path):
    _, projector = collected
    projector.save_pretrained(tmp_path / "p")
    from transformers import GPT2Config, GPT2LMHeadModel

    wider = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=4, n_positions=64))
    with pytest.raises(ValueError) as info:
        CrispProjector.from_pretrained(tmp_path / "p", wider)
    message = str(info.value)
    assert "transformer.h.2.mlp.c_proj" in message  # a layer the saved state does not have
    assert "transformer.h.0.mlp.c_proj: saved [W|b] shape (32, 129)" in message
    assert "transformer.h.1.attn.c_attn" in message
    assert "\n" not in message  # one line, fit for the command line

    with pytest.raises(ValueError, match="does not fit this model.*matches no linear module"):
        CrispProjector.from_pretrained(tmp_path / "p", tiny_llama())  # no c_proj at all


def test_from_pretrained_warns_when_weights_changed(collected, tmp_path):
    model, projector = collected
    projector.save_pretrained(tmp_path / "p")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_proj.weight.add_(1e-3)
    with pytest.warns(UserWarning, match=r"weights of 1 layer\(s\) differ.*transformer.h.1.mlp.c_proj"):
        loaded = CrispProjector.from_pretrained(tmp_path / "p", changed)
    assert_same_projections(projector, loaded)  # still usable

    projector.save_pretrained(tmp_path / "nohash", hash_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CrispProjector.from_pretrained(tmp_path / "nohash", changed)  # nothing to compare: silent


def test_saving_an_empty_projector_round_trips(tmp_path):
    model = tiny_llama()
    empty = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"]))
    empty.save_pretrained(tmp_path / "empty")
    loaded = CrispProjector.from_pretrained(tmp_path / "empty", model)
    assert not loaded.has_basis
    assert all(layer.token_count == 0 and layer.A_sum is None for layer in loaded.layers.values())


def test_missing_or_foreign_folders_are_clear_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CrispProjector.from_pretrained(tmp_path / "nowhere", model)
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no crisp_config.json"):
        CrispProjector.from_pretrained(tmp_path / "plain", model)
    (tmp_path / "plain" / persistence.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CrispProjector.from_pretrained(tmp_path / "plain", model)


# ------------------------------------------------------------------ atomic writes
def _failing_after_partial_write(real_save_file):
    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # a torn write: the file is cut short ...
            handle.truncate(100)
        raise OSError("disk full (simulated)")  # ... and the writer dies

    return save_file


def test_interrupted_tensor_write_leaves_previous_folder_loadable(collected, tmp_path, monkeypatch):
    model, projector = collected
    folder = tmp_path / "p"
    projector.save_pretrained(folder)
    files_before = sorted(p.name for p in folder.iterdir())

    changed = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.8))
    changed.load_state_dict(projector.state_dict())
    changed.collect([lm_batch(9)], progress=False)
    monkeypatch.setattr(persistence, "save_file", _failing_after_partial_write(persistence.save_file))
    with pytest.raises(OSError, match="simulated"):
        changed.save_pretrained(folder)
    monkeypatch.undo()

    assert sorted(p.name for p in folder.iterdir()) == files_before  # no debris either
    assert_same_projections(projector, CrispProjector.from_pretrained(folder, model))


def test_interruption_just_before_the_commit_keeps_the_old_state(collected, tmp_path, monkeypatch):
    model, projector = collected
    folder = tmp_path / "p"
    projector.save_pretrained(folder)
    changed = CrispProjector(model, CrispConfig(target_modules=TARGETS, gamma=0.8))
    changed.load_state_dict(projector.state_dict())
    changed.collect([lm_batch(9)], progress=False)

    real_fsync = persistence._fsync_file

    def dies_on_manifest(path):
        real_fsync(path)
        if path.name.startswith(persistence.CONFIG_NAME):
            raise KeyboardInterrupt  # e.g. Ctrl-C between writing the new manifest and committing it

    monkeypatch.setattr(persistence, "_fsync_file", dies_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        changed.save_pretrained(folder)
    monkeypatch.undo()
    assert_same_projections(projector, CrispProjector.from_pretrained(folder, model))

    # a later successful save replaces the state and leaves exactly one tensor file
    changed.save_pretrained(folder)
    assert_same_sums(changed, CrispProjector.from_pretrained(folder, model))
    assert len(list(folder.glob("crisp_tensors-*"))) == 1
    assert sorted(p.name for p in folder.iterdir())[0] == persistence.CONFIG_NAME


def test_interrupted_first_save_leaves_nothing_that_loads(collected, tmp_path, monkeypatch):
    model, projector = collected
    monkeypatch.setattr(persistence, "save_file", _failing_after_partial_write(persistence.save_file))
    with pytest.raises(OSError):
        projector.save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        CrispProjector.from_pretrained(tmp_path / "new", model)


def test_saving_into_a_folder_keeps_unrelated_files(collected, tmp_path):
    _, projector = collected
    (tmp_path / "README.md").write_text("mine")
    projector.save_pretrained(tmp_path)
    projector.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"


# ------------------------------------------------------------------ curvature variants
@pytest.mark.parametrize("curvature", ["ekfac", "activations"])
def test_curvature_variants_round_trip(tmp_path, curvature):
    model = tiny_gpt2()
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"], gamma=0.9, curvature=curvature))
    projector.collect([lm_batch(0), lm_batch(1)], progress=False)
    assert all(layer.basis.curvature == curvature for layer in projector.layers.values())

    # without include_basis: activations recomputes its mask; EK-FAC keeps its basis regardless,
    # because its correction sums are expressed in that basis
    sd = projector.state_dict()
    assert all((entry["basis"] is not None) == (curvature == "ekfac") for entry in sd["layers"].values())
    twin = CrispProjector(model, CrispConfig(target_modules=["mlp.c_proj"])).load_state_dict(sd)
    assert twin.config.curvature == curvature
    assert_same_projections(projector, twin)

    projector.save_pretrained(tmp_path / "p")
    loaded = CrispProjector.from_pretrained(tmp_path / "p", model)
    assert_same_projections(projector, loaded)
    for name, layer in loaded.layers.items():
        assert layer.basis.curvature == curvature
        if curvature == "ekfac":
            assert torch.equal(layer.correction_sum, projector.layers[name].correction_sum)
            assert layer.example_count == projector.layers[name].example_count == 6

    # a new gamma re-thresholds the loaded curvature exactly as the original would
    regammad = CrispProjector.from_pretrained(tmp_path / "p", model, gamma=0.99)
    for layer in projector.layers.values():
        if curvature == "ekfac":
            layer.apply_correction(0.99)
        else:
            layer.compute_basis(0.99, curvature)
    assert_same_projections(projector, regammad)


def test_ekfac_state_without_its_correction_warns(collected):
    model, projector = collected  # K-FAC state, loaded into an EK-FAC projector: no correction
    sd = copy.copy(projector.state_dict())
    sd["config"] = {**sd["config"], "curvature": "ekfac"}
    fresh = CrispProjector(model, CrispConfig(target_modules=TARGETS))
    with pytest.warns(UserWarning, match="no EK-FAC correction was saved"):
        fresh.load_state_dict(sd)
    assert_same_projections(projector, fresh)  # K-FAC masks meanwhile


# ------------------------------------------------------------------ wrapped models
def test_align_layer_names_only_through_one_consistent_prefix():
    saved = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    wrapped = ["base_model.model." + n for n in saved]
    assert serialization.align_layer_names(saved, wrapped) == dict(zip(wrapped, saved))
    assert serialization.align_layer_names(wrapped, saved) == dict(zip(saved, wrapped))
    assert serialization.align_layer_names(saved, saved) == {n: n for n in saved}
    other = ["base_model.model.model.layers.0.mlp.down_proj", "base_model.model.model.layers.2.mlp.down_proj"]
    assert serialization.align_layer_names(saved, other) == {n: n for n in other}  # no consistent prefix


def test_factors_collected_on_the_plain_model_load_into_its_peft_wrapper(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    projector = CrispProjector(model, CrispConfig(target_modules=["mlp.down_proj"]))
    projector.collect([lm_batch(0)], progress=False)
    projector.save_pretrained(tmp_path / "p")
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["down_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # same base weights: no hash warning
        warnings.filterwarnings("ignore", module="peft.*")
        loaded = CrispProjector.from_pretrained(tmp_path / "p", peft_model)
    assert loaded.target_names == ["base_model.model." + n for n in projector.target_names]
    for saved_name, name in zip(projector.target_names, loaded.target_names):
        Q = torch.randn(32, 64)
        assert torch.equal(projector.project(saved_name, Q), loaded.project(name, Q))
    # the LoRA adapters were moved into the kept rectangle of the loaded basis (as update_basis
    # does): projecting them again changes nothing
    assert set(loaded.lora_layers) == set(loaded.target_names)
    adapters = [p for layer in loaded.lora_layers.values() for p in layer.parameters()]
    before = [p.detach().clone() for p in adapters]
    loaded.project_lora_parameters_()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(adapters, before))
    twin = CrispProjector(peft_model, CrispConfig(target_modules=["mlp.down_proj"]))
    twin.load_state_dict(projector.state_dict())  # the state dict path aligns names too
    assert_same_projections(loaded, twin)


# ------------------------------------------------------------------ untrusted folders
def _rewrite_manifest(folder, **changes):
    path = folder / persistence.CONFIG_NAME
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = manifest
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    path.write_text(json.dumps(manifest))
    return manifest


_DELETE = object()
C_PROJ = "transformer.h.1.mlp.c_proj"


def test_a_regex_in_a_loaded_manifest_is_never_matched(collected, tmp_path):
    """``"(.*)*x"`` backtracks exponentially on every module name: loading must not run it."""
    import signal

    model, projector = collected
    projector.save_pretrained(tmp_path / "p")
    _rewrite_manifest(tmp_path / "p", config__target_modules="(.*)*x")

    def expire(*_):
        raise TimeoutError("from_pretrained matched the saved regular expression")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(3)
    try:
        loaded = CrispProjector.from_pretrained(tmp_path / "p", model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert loaded.config.target_modules == "(.*)*x"  # the saved spec is still reported
    assert_same_projections(projector, loaded)


def test_loading_config_builds_from_the_saved_layer_names():
    sd = {"format": serialization.FORMAT_NAME, "format_version": 1,
          "config": {**CrispConfig().to_dict(), "target_modules": "(.*)*x"}, "layers": {"a.b": {}, "c": {}}}
    assert serialization.loading_config(sd, "here").target_modules == ["a.b", "c"]
    sd["config"]["target_modules"] = ["mlp.c_proj"]  # a suffix list compiles nothing: kept as saved
    assert serialization.loading_config(sd, "here").target_modules == ["mlp.c_proj"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (f"layers__{C_PROJ}__num_tokens", -1, "num_tokens"),
        (f"layers__{C_PROJ}__num_tokens", 1e300, "num_tokens"),
        (f"layers__{C_PROJ}__num_tokens", "Infinity", "non-standard constant Infinity"),  # made bare below
        (f"layers__{C_PROJ}__num_tokens", "1e400", "num_tokens"),  # made bare below: a float that overflows
        (f"layers__{C_PROJ}__num_tokens", True, "num_tokens"),
        ("format_version", -7, "format_version"),
        ("format_version", True, "format_version"),
        ("format_version", 3, "upgrade torch_crisp"),
        ("config__gamma", _DELETE, "lacks the fields"),
        (f"layers__{C_PROJ}__fingerprint__d_out", "32", "d_out"),
        ("tensors_sha256", "0" * 64, "SHA-256"),
    ],
)
def test_manifest_values_that_would_weaken_the_projection_are_refused(collected, tmp_path, field, value, message):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    _rewrite_manifest(folder, **{field: value})
    if value in ("Infinity", "1e400"):  # JSON has no infinity; Python's json module would accept both
        path = folder / persistence.CONFIG_NAME
        path.write_text(path.read_text().replace(f'"{value}"', value))
    with pytest.raises(ValueError, match=message) as info:
        CrispProjector.from_pretrained(folder, model)
    assert str(folder) in str(info.value)  # the file is named


def test_flipped_bytes_in_the_tensors_are_detected(collected, tmp_path):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    tensors = next(folder.glob("crisp_tensors-*"))
    content = bytearray(tensors.read_bytes())
    content[-3] ^= 0x01  # a low mantissa bit of the last float: finite garbage, loaded silently before
    tensors.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=f"{tensors.name} does not match the SHA-256"):
        CrispProjector.from_pretrained(folder, model)


def test_version_1_folders_without_checksum_still_load_and_are_validated(collected, tmp_path):
    from safetensors.torch import load_file, save_file

    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    # what version 1 wrote: no checksum, and only the config fields of that time (later ones default)
    config = json.loads((folder / persistence.CONFIG_NAME).read_text())["config"]
    version_1_fields = ("target_modules", "gamma", "fisher", "curvature", "factor_dtype")
    manifest = _rewrite_manifest(folder, format_version=1, tensors_sha256=_DELETE,
                                 **{f"config__{key}": _DELETE for key in config if key not in version_1_fields})
    assert_same_projections(projector, CrispProjector.from_pretrained(folder, model))

    tensors = folder / manifest["tensors_file"]  # no checksum: the values themselves are checked
    content = load_file(str(tensors))
    content[f"{C_PROJ}.S_sum"][0, 0] = float("nan")
    save_file(content, str(tensors), metadata={"format": serialization.FORMAT_NAME, "save_id": manifest["save_id"]})
    with pytest.raises(ValueError, match=rf"{tensors.name}.*{C_PROJ}.*S_sum contains NaN"):
        CrispProjector.from_pretrained(folder, model)


def test_truncated_tensors_are_a_value_error_naming_the_file(collected, tmp_path):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    manifest = _rewrite_manifest(folder, format_version=1, tensors_sha256=_DELETE)  # reach safetensors itself
    tensors = folder / manifest["tensors_file"]
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{tensors.name} is not a readable safetensors file"):
        persistence.read_folder(folder)


@pytest.mark.parametrize("fault", ["nan_sum", "negative_tokens", "infinite_tokens", "wrong_shape"])
def test_save_refuses_a_state_that_would_not_load_before_touching_the_folder(collected, tmp_path, fault):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    files_before = sorted(p.name for p in folder.iterdir())
    sd = projector.state_dict()
    entry = sd["layers"][C_PROJ] = dict(sd["layers"][C_PROJ])
    if fault == "nan_sum":
        entry["A_sum"] = entry["A_sum"].clone().fill_(float("nan"))
    elif fault == "wrong_shape":
        entry["S_sum"] = entry["S_sum"][:-1]
    else:
        entry["num_tokens"] = -5 if fault == "negative_tokens" else float("inf")
    with pytest.raises(ValueError, match=C_PROJ):
        persistence.save_pretrained(sd, folder)
    assert sorted(p.name for p in folder.iterdir()) == files_before
    assert_same_projections(projector, CrispProjector.from_pretrained(folder, model))


# ------------------------------------------------------------------ what a save may delete
def test_saving_deletes_only_what_the_previous_manifest_names(collected, tmp_path):
    _, projector = collected
    mine = ["crisp_tensors-mine.safetensors", "crisp_tensors-0123.safetensors", "crisp_config.json.backup.tmp",
            "crisp_config.json.orig"]
    for name in mine:
        (tmp_path / name).write_text("user data")
    projector.save_pretrained(tmp_path)
    first = json.loads((tmp_path / persistence.CONFIG_NAME).read_text())["tensors_file"]
    projector.save_pretrained(tmp_path)
    second = json.loads((tmp_path / persistence.CONFIG_NAME).read_text())["tensors_file"]
    assert not (tmp_path / first).exists() and (tmp_path / second).is_file()
    assert all((tmp_path / name).read_text() == "user data" for name in mine)


def test_the_next_save_removes_what_a_killed_save_left(collected, tmp_path):
    model, projector = collected
    folder = projector.save_pretrained(tmp_path / "p")
    # What a save killed after moving its tensors in (but before its commit) leaves, a safetensors
    # temporary inside its staging folder, and a version-1 save's temporaries.
    staging = folder / ".crisp-save-00000000abcd"
    staging.mkdir()
    (staging / ".tmpXyZ123").write_bytes(b"\0" * 1000)
    (folder / "crisp_tensors-00000000abcd.safetensors").write_bytes(b"\0" * 1000)
    (folder / "crisp_tensors-00000000ef01.safetensors.partial").write_bytes(b"\0" * 1000)
    (folder / "crisp_config.json.00000000ef01.tmp").write_text("{}")
    projector.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [persistence.CONFIG_NAME, next(folder.glob("crisp_t*")).name]
    assert_same_projections(projector, CrispProjector.from_pretrained(folder, model))


def test_tensors_get_the_file_mode_of_the_manifest(collected, tmp_path):
    import os
    import stat

    _, projector = collected
    old = os.umask(0o022)
    try:
        folder = projector.save_pretrained(tmp_path / "p")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # safetensors' own temporary file is 0600


# ------------------------------------------------------------------ Accelerate checkpoints
def test_accelerate_checkpoints_restore_the_projector_without_unpickling(collected, tmp_path):
    """A malicious ``custom_checkpoint_0.pkl`` in a checkpoint is never unpickled by the projector."""
    import os
    import pickle

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch_crisp.integrations import accelerate as crisp_accelerate

    model, projector = collected
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    twin = CrispProjector(model, CrispConfig(target_modules=TARGETS)).load_state_dict(
        projector.state_dict(include_basis=True))
    accelerator = Accelerator(cpu=True)
    try:
        crisp_accelerate.register(accelerator, twin)
        accelerator.save_state(str(tmp_path / "checkpoint"))
        assert (tmp_path / "checkpoint" / "crisp_projector" / persistence.CONFIG_NAME).is_file()
        (tmp_path / "checkpoint" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCode()))
        twin.reset()
        try:
            accelerator.load_state(str(tmp_path / "checkpoint"))
        except RuntimeError as err:  # Accelerate itself refuses a pickle no object was registered for
            assert "custom checkpoints" in str(err)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert not marker.exists()
    assert_same_projections(projector, twin)  # bit-identical bases and masks


def test_a_dtype_change_alone_is_not_reported_as_changed_weights(tmp_path):
    model = tiny_llama().to(torch.bfloat16)  # collected in bf16, as `torch-crisp collect --dtype bfloat16`
    projector = CrispProjector(model, CrispConfig(target_modules=["down_proj"]))
    projector.collect([lm_batch(0)], progress=False)
    projector.save_pretrained(tmp_path / "f")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CrispProjector.from_pretrained(tmp_path / "f", model.to(torch.float32))  # the same checkpoint, in float32
    messages = [str(w.message) for w in caught]
    assert any("dtype differs" in m for m in messages)
    assert not any("weights of" in m for m in messages)
