#!/usr/bin/env bash
# The README's test command: install the package with its test dependencies, then run the suite.
# torch is pinned to a release that has a CPU build; curvlinops (the test oracle) is installed
# without its backpack-for-pytorch -> torchvision chain, which would replace torch with a CUDA build.
set -euo pipefail
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,hf]"
python -m pip install -q --no-deps "curvlinops-for-pytorch==3.0.1"
python -m pytest -q "$@"
