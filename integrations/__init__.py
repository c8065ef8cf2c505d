"""Adapters to Hugging Face Trainer, Accelerate and PEFT (importable as ``torch_crisp.integrations``).

Each submodule imports its framework lazily, so the core package never depends on them.
"""
