"""Shared fixtures for the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import lm_batch, tiny_gpt2, tiny_llama

# Two cores in CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def lm_batches():
    return [lm_batch(seed) for seed in range(3)]


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cache of the demo's pretrained base models for every test that runs the demo (pretrain once)."""
    return tmp_path_factory.mktemp("demo-cache")
