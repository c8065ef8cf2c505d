"""Drop-in use in real training scripts: HfArgumentParser options, datasets, TRL, messages users see."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from fake_accelerator import FakeAccelerator
from tiny_models import VOCAB, lm_batch, tiny_llama
from torch_crisp.integrations.hf_trainer import CrispArguments, CrispCallback
from transformers import HfArgumentParser, Trainer, TrainingArguments

from torch_crisp import CrispConfig, CrispProjector
from torch_crisp.editing.demo.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(VOCAB - 5)]


class Examples(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seed: int = 1) -> None:
        self.ids = torch.randint(3, 12, (n, 10), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i].clone()}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                  save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return TrainingArguments(**{**kwargs, **overrides})


def test_crisp_arguments_parse_with_no_flags_and_build_the_callback(tmp_path):
    parser = HfArgumentParser((TrainingArguments, CrispArguments))
    _, defaults = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--capability_file"):
        defaults.build_callback(tiny_llama())
    corpus = tmp_path / "capability.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, 40, 3)))
    _, crisp = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--capability_file", str(corpus), "--crisp_target_modules", "down_proj",
        "--crisp_capability_budget", "0.01", "--freeze_unprojected", "--capability_seq_len", "8",
    ])
    model = tiny_llama()
    callback = crisp.build_callback(model, build_tokenizer(WORDS))
    assert callback.mode == "update" and callback.freeze_unprojected
    config = callback.projector.config
    assert config.gamma is None and config.capability_budget == 0.01
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=Examples(), callbacks=[callback])
    trainer.train()  # collects at train begin, freezes the rest, constrains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "down_proj" in n}
    assert any("crisp/predicted_capability_increase" in e for e in trainer.state.log_history)


def test_collect_takes_a_tokenised_datasets_dataset_and_explains_raw_text():
    from datasets import Dataset

    tokenizer = build_tokenizer(WORDS)
    texts = [" ".join(WORDS[i : i + 5 + i % 3]) for i in range(12)]
    dataset = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    projector = CrispProjector(tiny_llama(), CrispConfig(target_modules=["down_proj"]))
    projector.collect(dataset, batch_size=4, progress=False)
    n_terms = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert projector.num_tokens(projector.target_names[0]) == n_terms  # every non-padding position
    with pytest.raises(ValueError, match="tokenise the text first"):
        projector.collect(Dataset.from_dict({"text": texts}), progress=False)


def test_warnings_point_at_the_users_line_not_at_the_trainer(tmp_path):
    model = tiny_llama()
    projector = CrispProjector(model, CrispConfig(target_modules=["down_proj"])).collect(
        [lm_batch(0)], progress=False
    )
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=Examples(),
                      callbacks=[CrispCallback(projector)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()  # the line a warning about unconstrained parameters should name
    ours = [w for w in caught if "outside every projected layer" in str(w.message)]
    assert ours and all(w.filename == __file__ for w in ours)


def test_all_linear_covers_every_linear_layer_of_the_blocks():
    model = tiny_llama()
    projector = CrispProjector(model, CrispConfig(target_modules="all-linear"))
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(projector.target_names) == expected and len(expected) == 7 * 2


@pytest.mark.parametrize("flags", [[], ["--dpo"]], ids=["sft", "dpo"])
def test_trl_trainers_example_keeps_the_change_in_the_kept_subspace(flags):
    spec = importlib.util.spec_from_file_location("trl_sft_example", ROOT / "examples" / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "3", *flags])
    assert result["min_change_norm"] > 1e-3  # every projected layer trained
    assert result["max_relative_leak"] < 1e-5


def test_a_resumed_accelerate_run_restores_instead_of_collecting(tmp_path):
    from torch_crisp.integrations import accelerate as crisp_accelerate

    accelerator = FakeAccelerator()
    projector = CrispProjector(tiny_llama(), CrispConfig(target_modules=["down_proj"]))
    crisp_accelerate.collect(accelerator, projector, [lm_batch(s) for s in range(2)], progress=False)
    crisp_accelerate.register(accelerator, projector)
    next(iter(accelerator.save_hooks.values()))([], [], str(tmp_path))  # what save_state calls

    def never():
        raise AssertionError("a resumed run must not collect again")
        yield

    resumed = CrispProjector(tiny_llama(), CrispConfig(target_modules=["down_proj"]))
    crisp_accelerate.collect(FakeAccelerator(), resumed, never(), resume_from=tmp_path)
    for name in projector.layers:
        assert torch.equal(resumed.layers[name].basis.U_in, projector.layers[name].basis.U_in)


def test_accelerate_seeing_one_process_of_several_is_warned_about(monkeypatch):
    from torch_crisp.integrations import accelerate as crisp_accelerate

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match="ACCELERATE_USE_CPU=1"):
        crisp_accelerate._warn_if_accelerate_sees_one_process(FakeAccelerator())
