"""The README's usage example runs, and examples/quickstart.py is exactly that example."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Usage.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its usage example"
    return match.group(1)


def test_quickstart_is_the_readme_example():
    assert readme_example() in (ROOT / "examples" / "quickstart.py").read_text()


def test_readme_example_runs_and_trains_within_the_kept_subspace(capsys):
    # the example's lines before the projector build the (seeded) model: run them alone for the start weights
    example = readme_example()
    start: dict = {}
    exec(compile(example[: example.index("projector = ")], "readme-prefix", "exec"), start)
    namespace = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    projector, model = namespace["projector"], namespace["model"]
    assert projector.model is model
    fractions = projector.kept_fraction()
    assert set(fractions) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "model.layers.0.mlp.down_proj" in capsys.readouterr().out
    before = dict(start["model"].named_parameters())
    for name, state in projector.layers.items():
        weight = state.geometry.weight.detach()
        delta = weight - before[f"{name}.weight"].detach()
        assert delta.norm() > 0, f"{name} did not train"
        leak = (delta - projector.project(name, delta)).norm() / delta.norm()
        assert leak < 1e-5, f"{name}: {leak:.2e} of the change lies in blocked directions"


def test_ci_runs_exactly_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    test_line = next(line for line in block.splitlines() if "pytest" in line)
    command = test_line.split("   #")[0].strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == command
