"""Edit requests: one data class and readers for the formats the knowledge-editing field uses.

Supported record shapes (JSON list, JSON object with a list under ``"requests"``/``"data"``, or
JSON Lines; detected per record):

* **EasyEdit**: ``{"prompt", "target_new", "subject"?, "ground_truth"?, "rephrase_prompt"?,
  "locality": {name: {"prompt": str | [str], "ground_truth": str | [str]}}?}``. ``portability``
  and other extra keys are ignored.
* **CounterFact** (ROME/MEMIT): ``{"requested_rewrite": {"prompt": "{} plays", "subject",
  "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts"?,
  "neighborhood_prompts"?}``. The ``{}`` placeholder is filled with the subject.
* **ZsRE** (MEND/ROME): ``{"src", "answers": [str], "alt" | "pred", "rephrase"?, "loc"?,
  "loc_ans"?}``; ``alt`` is the new answer.

Every reader raises :class:`EditDataError` that names the record and the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EditDataError", "EditRequest", "load_requests", "parse_record", "save_requests"]


class EditDataError(ValueError):
    """A malformed edit record; the message names the record (file, index) and the field."""


@dataclass
class EditRequest:
    """One fact to write into the model.

    Attributes:
        prompt: text whose continuation should become ``target_new`` (no trailing space).
        target_new: the new answer, generated after ``prompt`` + a space.
        subject: the entity the fact is about (informational; CounterFact fills ``{}`` with it).
        target_true: the answer before the edit, when known.
        paraphrases: other phrasings of ``prompt`` with the same new answer (generalisation).
        locality_prompts: prompts whose answers must not change (neighbours). Their reference
            answers are the *pre-edit model's own* continuations, measured at evaluation time;
            ``locality_answers`` (from the data, when given) are kept for reference only.
    """

    prompt: str
    target_new: str
    subject: str = ""
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)

    def to_easyedit(self) -> dict[str, Any]:
        """EasyEdit-style record (what :func:`save_requests` writes)."""
        record: dict[str, Any] = {"prompt": self.prompt, "target_new": self.target_new, "subject": self.subject}
        if self.target_true is not None:
            record["ground_truth"] = self.target_true
        if self.paraphrases:
            record["rephrase_prompt"] = list(self.paraphrases)
        if self.locality_prompts:
            record["locality"] = {
                "neighborhood": {"prompt": list(self.locality_prompts), "ground_truth": list(self.locality_answers)}
            }
        return record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- field helpers
def _where(source: str, index: int) -> str:
    return f"{source}, record {index}"


def _string(record: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise EditDataError(f"{where}: missing required field {key!r} (fields present: {sorted(record)})")
        return None
    value = record[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # ZsRE-style one-element answer lists
    if not isinstance(value, str):
        raise EditDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise EditDataError(f"{where}: field {key!r} is empty")
    return value


def _strings(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise EditDataError(f"{where}: field {key!r} must be a string or a list of strings, got {value!r:.80}")


def _target(value: Any, key: str, where: str) -> str:
    # CounterFact stores answers as {"str": ..., "id": ...}; EasyEdit as plain strings.
    if isinstance(value, Mapping):
        if "str" not in value:
            raise EditDataError(f"{where}: field {key!r} is an object without 'str'")
        value = value["str"]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise EditDataError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return value.strip()


# ----------------------------------------------------------------------------- record formats
def _from_easyedit(record: Mapping[str, Any], where: str) -> EditRequest:
    prompt = _string(record, "prompt", where)
    if "target_new" not in record:
        raise EditDataError(f"{where}: missing required field 'target_new' (fields present: {sorted(record)})")
    target_new = _target(record["target_new"], "target_new", where)
    subject = _string(record, "subject", where, required=False) or ""
    truth = record.get("ground_truth")
    target_true = _target(truth, "ground_truth", where) if truth not in (None, "", []) else None
    paraphrases = _strings(record.get("rephrase_prompt"), "rephrase_prompt", where)
    loc_prompts: list[str] = []
    loc_answers: list[str] = []
    locality = record.get("locality") or {}
    if not isinstance(locality, Mapping):
        raise EditDataError(f"{where}: field 'locality' must be an object {{name: {{prompt, ground_truth}}}}")
    for name, entry in locality.items():
        if not isinstance(entry, Mapping) or "prompt" not in entry:
            raise EditDataError(f"{where}: field 'locality.{name}' needs a 'prompt' (string or list)")
        prompts = _strings(entry["prompt"], f"locality.{name}.prompt", where)
        answers = _strings(entry.get("ground_truth"), f"locality.{name}.ground_truth", where)
        # EasyEdit nests ground truths as lists of aliases; keep the first alias of each.
        loc_prompts += prompts
        loc_answers += answers[: len(prompts)]
    return EditRequest(prompt.rstrip(), target_new, subject, target_true, paraphrases, loc_prompts, loc_answers)  # type: ignore[union-attr]


def _from_counterfact(record: Mapping[str, Any], where: str) -> EditRequest:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise EditDataError(f"{where}: field 'requested_rewrite' must be an object")
    inner = f"{where}, requested_rewrite"
    template = _string(rewrite, "prompt", inner)
    subject = _string(rewrite, "subject", inner)
    if "target_new" not in rewrite:
        raise EditDataError(f"{inner}: missing required field 'target_new'")
    target_new = _target(rewrite["target_new"], "target_new", inner)
    target_true = _target(rewrite["target_true"], "target_true", inner) if "target_true" in rewrite else None
    assert template is not None and subject is not None
    if "{}" not in template and subject not in template:
        raise EditDataError(f"{inner}: field 'prompt' {template!r} has no '{{}}' placeholder for the subject")
    prompt = template.replace("{}", subject)
    return EditRequest(
        prompt.rstrip(),
        target_new,
        subject,
        target_true,
        _strings(record.get("paraphrase_prompts"), "paraphrase_prompts", where),
        _strings(record.get("neighborhood_prompts"), "neighborhood_prompts", where),
    )


def _from_zsre(record: Mapping[str, Any], where: str) -> EditRequest:
    prompt = _string(record, "src", where)
    key = "alt" if "alt" in record else "pred" if "pred" in record else None
    if key is None:
        raise EditDataError(f"{where}: ZsRE record needs the new answer in 'alt' (or 'pred')")
    target_new = _target(record[key], key, where)
    answers = _strings(record.get("answers"), "answers", where)
    loc = _strings(record.get("loc"), "loc", where)
    loc_ans = _strings(record.get("loc_ans"), "loc_ans", where)
    # ZsRE's "loc" prompts carry an "nq question: " prefix; keep them verbatim.
    return EditRequest(
        prompt.rstrip(),  # type: ignore[union-attr]
        target_new,
        _string(record, "subject", where, required=False) or "",
        answers[0] if answers else None,
        _strings(record.get("rephrase"), "rephrase", where),
        loc,
        loc_ans,
    )


def parse_record(record: Any, where: str = "record") -> EditRequest:
    """Turn one EasyEdit, CounterFact or ZsRE record into an :class:`EditRequest`."""
    if not isinstance(record, Mapping):
        raise EditDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return _from_counterfact(record, where)
    if "src" in record:
        return _from_zsre(record, where)
    if "prompt" in record or "target_new" in record:
        return _from_easyedit(record, where)
    raise EditDataError(
        f"{where}: unrecognised edit record with fields {sorted(record)}; expected EasyEdit "
        "('prompt', 'target_new'), CounterFact ('requested_rewrite') or ZsRE ('src', 'alt')"
    )


def _records(path: Path) -> Iterable[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        yield from _records_jsonl(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # A .json file may still be JSON Lines; try that before giving up.
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            yield from _records_jsonl(path, text)
            return
        raise EditDataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    if isinstance(data, Mapping):
        for key in ("requests", "data", "edits"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise EditDataError(f"{path}: expected a list of edit records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield _where(str(path), index), record


def _records_jsonl(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as err:
                raise EditDataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None


def load_requests(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read edit requests from a JSON or JSON Lines file (formats: see the module docstring).

    Args:
        limit: read only the first ``limit`` records (at least 1).

    Raises:
        FileNotFoundError / IsADirectoryError: the file does not exist, or is a folder.
        EditDataError: a record is malformed (the message names the record and field), or the
            file holds no records.
        ValueError: ``limit`` is below 1.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive number of edit records, got {limit!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"edit file {path} is a folder; pass a .json or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"edit file {path} does not exist")
    requests: list[EditRequest] = []
    for where, record in _records(path):
        requests.append(parse_record(record, where))
        if limit is not None and len(requests) >= limit:
            break
    if not requests:
        raise EditDataError(f"{path}: no edit records found")
    return requests


def save_requests(requests: Iterable[EditRequest], path: str | Path) -> None:
    """Write requests as an EasyEdit-style JSON list (readable by :func:`load_requests`)."""
    records = [request.to_easyedit() for request in requests]
    Path(path).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
