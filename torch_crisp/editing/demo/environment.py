"""What a demo run records about its process and machine, and what it keeps out of its output.

* :func:`machine_record`: thread count, CPU, load and library versions, so that a results file
  says what its timings (and its float rounding) come from;
* :func:`torch_threads`: run a block with a given number of torch CPU threads, restored after;
* :func:`captured_library_warnings`: collect the warnings of transformers / peft (Python warnings
  and their loggers) during a block instead of printing them between the table's rows;
* :func:`no_transformers_progress_bars`: no loading / saving bars of transformers in a block.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "captured_library_warnings",
    "cpu_model",
    "machine_record",
    "no_transformers_progress_bars",
    "summarize_warnings",
    "torch_threads",
]

_VERSIONED = ("torch", "transformers", "peft", "tokenizers", "accelerate", "matplotlib")
_LIBRARY_LOGGERS = ("transformers", "peft")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_record() -> dict[str, Any]:
    """Threads, CPU, load average and versions of the running process (JSON-ready)."""
    from torch_crisp import __version__

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        # timings on a shared machine mean little without the load they were taken at
        "load_average": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch_crisp": __version__, **{name: _version(name) for name in _VERSIONED}},
    }


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: unchanged); restore after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """Run the block without transformers' own progress bars (restored after).

    Loading and saving the demo's 38-tensor model takes milliseconds; its "Loading weights" and
    "Writing model shards" bars only cluttered the output (also with --quiet).
    """
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class _Collector(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def captured_library_warnings() -> Iterator[list[str]]:
    """Collect Python warnings and transformers / peft log warnings raised in the block.

    Yields the list the messages are appended to (``"Category: message"``, one per occurrence).
    The libraries' own handlers are detached meanwhile, so nothing reaches the terminal.
    """
    messages: list[str] = []
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    collector = _Collector(messages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, so the summary can count them
        for lg in loggers:
            lg.handlers = [collector]
            lg.propagate = False
        try:
            yield messages
        finally:
            for lg, handlers, propagate in saved:
                lg.handlers = handlers
                lg.propagate = propagate
            messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def summarize_warnings(messages: list[str]) -> list[dict[str, Any]]:
    """Distinct messages with their counts, most frequent first (one line each)."""
    counts: dict[str, int] = {}
    for message in messages:
        line = " ".join(str(message).split())
        counts[line] = counts.get(line, 0) + 1
    return [{"message": m, "count": c} for m, c in sorted(counts.items(), key=lambda item: -item[1])]
