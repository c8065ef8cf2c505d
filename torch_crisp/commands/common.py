"""What every ``torch-crisp`` subcommand shares: user errors, argument checks, devices, model loading.

User mistakes raise :class:`CLIError` (or ``ValueError`` / ``OSError``); the entry point
(:mod:`torch_crisp.cli`) prints them as one line with exit code 2. Subcommands check every
argument and path with the ``check_*`` functions *before* any work starts, so a mistake never
costs a model load or a collection. transformers is imported only inside :func:`load_hf_model`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES", "CLIError", "add_threads_argument", "apply_threads", "check_fraction", "check_input_file",
    "check_model_folder", "check_output_folder",
    "check_positive", "check_positive_int", "check_seed", "first_line", "load_hf_model", "resolve_device",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A mistake the user can fix; printed as ``torch-crisp <command>: error: <message>``."""


def first_line(err: BaseException) -> str:
    """One line of an error's text (errors of other libraries may span lines)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


# ----------------------------------------------------------------------------- argument checks
def check_positive_int(flag: str, value: int | None, minimum: int = 1) -> None:
    """``CLIError`` unless ``value`` (when given) is an integer of at least ``minimum``."""
    if value is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise CLIError(f"{flag} must be {what}, got {value}")


def check_positive(flag: str, value: float | None) -> None:
    """``CLIError`` unless ``value`` (when given) is a finite number above 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise CLIError(f"{flag} must be a finite number above 0, got {value}")


def check_fraction(flag: str, value: float | None, *, closed_above: bool = False) -> None:
    """``CLIError`` unless ``value`` (when given) lies in ``(0, 1)`` (``(0, 1]`` with ``closed_above``)."""
    if value is None:
        return
    inside = 0.0 < value <= 1.0 if closed_above else 0.0 < value < 1.0  # NaN fails both
    if not inside:
        bounds = "in (0, 1]" if closed_above else "strictly between 0 and 1"
        raise CLIError(f"{flag} must lie {bounds}, got {value}")


def check_seed(flag: str, value: int) -> None:
    """``CLIError`` unless ``torch.manual_seed`` accepts ``value``."""
    if not -(2**63) <= value < 2**64:
        raise CLIError(f"{flag} must lie between -2^63 and 2^64 - 1, got {value}")


def check_model_folder(path: Path) -> None:
    """``CLIError`` unless ``--model`` is a folder with a ``config.json`` (a Hugging Face model folder)."""
    if path.is_file():
        raise CLIError(f"--model {path} is a file; pass the model's folder (config, weights, tokenizer)")
    if not path.is_dir():
        raise CLIError(f"--model {path}: no such folder (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path} is not a Hugging Face model folder (it has no config.json)")


def check_input_file(flag: str, path: Path, suffixes: tuple[str, ...] = ()) -> None:
    """``CLIError`` unless ``path`` is an existing file (with one of ``suffixes``, when given)."""
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; pass a file")
    if not path.is_file():
        raise CLIError(f"{flag} {path} does not exist")
    if suffixes and path.suffix.lower() not in suffixes:
        found = path.suffix or "(no extension)"
        raise CLIError(f"{flag} {path}: unsupported data format {found!r}; use {' or '.join(suffixes)}")


def check_output_folder(flag: str, path: Path, *, input_model: Path | None = None) -> None:
    """``CLIError`` unless ``path`` is a writable folder or can be created as one (nothing is created),
    and is not the ``input_model`` folder (writing there would overwrite the input)."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is a file; name a folder")
    if input_model is not None and _same_folder(path, input_model):
        raise CLIError(f"{flag} {path} is the --model folder, which would be overwritten; choose another folder")
    existing = path
    while not existing.exists() and existing.parent != existing:  # the nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{flag} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to")


def _same_folder(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


# ----------------------------------------------------------------------------- devices and models
def resolve_device(name: str) -> torch.device:
    """The ``--device``: ``auto`` (CUDA if available), or a CPU / CUDA / MPS / XPU device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type in ("mps", "xpu"):
        backend = getattr(torch, device.type, None) if device.type == "xpu" else torch.backends.mps
        if backend is None or not backend.is_available():
            raise CLIError(f"--device {name}: {device.type.upper()} is not available on this machine; use --device cpu")
    elif device.type != "cpu":  # e.g. meta, which holds no data to run on
        raise CLIError(f"--device {name} cannot run a model; use cpu, cuda, cuda:N or mps")
    return device


def load_hf_model(path: Path, dtype: str, device: torch.device, quiet: bool) -> tuple[torch.nn.Module, Any]:
    """Load a local Hugging Face causal LM and its tokenizer onto ``device``; ``CLIError`` naming the
    folder for anything that goes wrong (a folder's files are user input: any failure is theirs)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("this command needs Hugging Face transformers: pip install 'torch-crisp[hf]'") from None
    check_model_folder(path)
    # transformers >= 4.56 calls the argument dtype; older versions torch_dtype
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()  # its "Loading weights" bar; restored below
    try:
        # Broad on purpose: a malformed config.json, truncated weights or a tokenizer file raise
        # TypeError, KeyError, SafetensorError, ... from deep inside transformers.
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise CLIError(f"--model {path}: cannot load its tokenizer ({_describe(err)})") from err
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, **{dtype_kw: DTYPES.get(dtype, "auto")}
            )
        except Exception as err:
            raise CLIError(f"--model {path}: cannot load it as a causal LM ({_describe(err)})") from err
    finally:
        if quiet and bars_were_enabled:
            hf_logging.enable_progress_bar()
    try:
        return model.to(device), tokenizer
    except torch.cuda.OutOfMemoryError:  # an alias of torch.OutOfMemoryError, present in older torch too
        raise CLIError(f"--model {path} does not fit on {device}; use another --device or --dtype bfloat16") from None


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command (default: torch's own choice)."""
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch CPU threads (default: torch's choice; 1 avoids stalls on a CPU that other jobs keep busy)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Use ``args.threads`` CPU threads, if given (checked: a positive integer)."""
    check_positive_int("--threads", args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
