"""The documented commands and Python snippets run as written.

In docs/cli.md and docs/editing.md every fenced ``bash`` and ``python`` block is either run here, in
document order, in one working folder (the demo's quick run leaves the files the later commands
use), or marked ``<!-- not run: <reason> -->`` on the line before it. A block without either fails
this test, so a new example cannot go untested by accident. The API pages (budget, curvature,
sequential, PEFT, Trainer, Accelerate) hold fragments of a user's script; their Python blocks run in
order after a preamble that defines what the prose assumes, under the same marking rule.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "cli.md", ROOT / "docs" / "editing.md"]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+) -->")


def blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """``(language, body, reason it is not run or None)`` of every bash/python block, in order."""
    found = []
    for match in BLOCK.finditer("\n" + path.read_text()):
        skip = NOT_RUN.search(match["before"])
        found.append((match["lang"], match["body"], skip["reason"] if skip else None))
    return found


def shell_commands(body: str) -> list[str]:
    """Commands of a bash block: continuation lines joined, comments dropped."""
    text = body.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


QUICK_DEMO = "torch-crisp demo --quick --out demo-results"


def environment(demo_cache: Path) -> dict[str, str]:
    env = {**os.environ, "TORCH_CRISP_CACHE": str(demo_cache), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_cache):
    """A folder holding ``demo-results`` from the quick demo, the files both pages start from.

    docs/cli.md documents this very command first; it is run here once so that either page can be
    tested on its own.
    """
    folder = tmp_path_factory.mktemp("docs")
    result = subprocess.run(QUICK_DEMO, shell=True, cwd=folder, env=environment(demo_cache), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"`{QUICK_DEMO}` failed:\n{result.stderr[-3000:]}"
    return folder


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_documented_commands_run_as_written(doc, workdir, demo_cache):
    env = environment(demo_cache)
    ran = 0
    for lang, body, reason in blocks(doc):
        if reason is not None:
            assert len(reason.strip()) > 10, f"{doc.name}: say why a block is not run"
            continue
        if lang == "bash":
            for command in shell_commands(body):
                if command == QUICK_DEMO:
                    continue  # run by the workdir fixture, once for both pages
                result = subprocess.run(command, shell=True, cwd=workdir, env=env, capture_output=True, text=True,
                                        timeout=600)
                assert result.returncode == 0, f"{doc.name}: `{command}` failed:\n{result.stderr[-3000:]}"
                ran += 1
        else:
            result = subprocess.run([sys.executable, "-c", body], cwd=workdir, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{doc.name}: python block failed:\n{body}\n{result.stderr[-3000:]}"
            assert "Warning" not in result.stderr, f"{doc.name}: python block warned:\n{result.stderr[-2000:]}"
            ran += 1
    assert ran > 0


def test_shell_commands_are_parsed_like_a_shell_would():
    body = "torch-crisp collect --model a \\\n    --out b   # a comment\n# only a comment\ntorch-crisp inspect b\n"
    assert shell_commands(body) == ["torch-crisp collect --model a      --out b", "torch-crisp inspect b"]
    assert shlex.split(shell_commands(body)[0])[:3] == ["torch-crisp", "collect", "--model"]


# --------------------------------------------------------------------------- the API pages
# Their Python blocks are fragments of a user's script: they run here in order, one page per
# process, after a preamble that defines what the prose assumes (a model, capability batches,
# Trainer arguments, edit data). Blocks that cannot run as written say why, as above.
API_PAGES = [ROOT / "docs" / name for name in (
    "budget.md", "curvature.md", "sequential.md", "integrations/peft.md", "integrations/trainer.md",
    "integrations/accelerate.md",
)]

PREAMBLE = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from torch_crisp import CrispConfig, CrispOptimizer, CrispProjector

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4))

def batch(seed):
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

capability_batches = [batch(s) for s in range(4)]
capability_dataset = [{"input_ids": row.tolist()} for b in capability_batches for row in b["input_ids"]]
edit_dataset = [{k: v[0] for k, v in batch(100 + s).items()} for s in range(8)]
round1_batches, round2_batches, round3_batches = ([batch(200 + 10 * r + s) for s in range(2)] for r in range(3))
args = TrainingArguments(output_dir="trainer-out", max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True)
edit_loader = [batch(300 + s) for s in range(2)]
edit_params = [p for name, p in model.named_parameters() if "mlp.down_proj" in name]


def load_model():  # "your model"
    return model


for name, p in model.named_parameters():
    p.requires_grad_("mlp.down_proj" in name)
'''

DRIVER = '''
import json, sys, traceback
preamble, blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
exec(compile(preamble, "preamble", "exec"), namespace)
for index, block in enumerate(blocks):
    try:
        exec(compile(block, f"block {index + 1}", "exec"), namespace)
    except Exception:
        print(f"block {index + 1} failed:\\n{block}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
'''


@pytest.mark.parametrize("page", API_PAGES, ids=lambda p: p.name)
def test_the_api_pages_python_fragments_run_in_order(page, tmp_path):
    found = blocks(page)
    for lang, _body, reason in found:
        assert reason is not None or lang == "python", f"{page.name}: a {lang} block is neither run nor marked"
        assert reason is None or len(reason.strip()) > 10, f"{page.name}: say why a block is not run"
    runnable = [body for lang, body, reason in found if lang == "python" and reason is None]
    assert runnable, f"{page.name}: no Python block runs"
    (tmp_path / "blocks.json").write_text(json.dumps([PREAMBLE, runnable]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", DRIVER, "blocks.json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-4000:]}"
