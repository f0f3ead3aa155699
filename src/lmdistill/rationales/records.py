"""Rationale files: one JSON object per line (``id``, ``answer``, ``label``, ``correct``, ``words``, ``rationale``),
their settings beside them in ``OUT.config.yaml``, the prefix rule that derives a smaller k from a larger one, and the
random-k control (words drawn at random from the same candidates)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import yaml

from lmdistill.errors import LmdistillError
from lmdistill.rationales.tasks import Example, render_prompt
from lmdistill.rationales.words import random_words, rationale_text, split_words
from lmdistill.storage import staged

log = logging.getLogger(__name__)


def settings_path(out: Path) -> Path:
    """Where the settings of a rationale file are kept: ``OUT.config.yaml``."""
    return out.with_name(out.name + ".config.yaml")


def read_records(out: Path) -> list[dict[str, Any]]:
    """The records of the rationale file ``--out`` (none if it does not exist).

    An incomplete last line (a write cut short) is removed from the file with a warning.

    Raises:
        LmdistillError: a line that is not a rationale record (see `parse_records`).
    """
    if not out.exists():
        return []
    data = out.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        log.warning("%s: removing an incomplete last line (an interrupted write)", out)
        with out.open("r+b") as f:
            f.truncate(whole)
    return parse_records(out, "--out")


def parse_records(path: Path, flag: str, fields: tuple[str, ...] = ("id",)) -> list[dict[str, Any]]:
    """The records of a rationale file, one JSON object per line (blank lines skipped), each with string ``fields``.

    Args:
        path: the file, which exists.
        flag: the option that gave it, named in errors.
        fields: the fields every record must have as strings.

    Raises:
        LmdistillError: a line that is not such a record, named by file and line.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmdistillError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _record_problem(record, fields)
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON ({exc.msg})"
        if problem:
            raise LmdistillError(
                f"{flag} {path} line {line_no} is not a rationale record: {problem}; give another {flag}"
            )
        records.append(record)
    return records


def _record_problem(record: Any, fields: tuple[str, ...]) -> str | None:
    """What keeps a parsed JSON line from being a record with string ``fields``; None if nothing."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [f for f in fields if not isinstance(record.get(f), str)]
    return f"no string field {missing[0]!r}" if missing else None


def first_words(record: dict[str, Any], k: int) -> dict[str, Any]:
    """A record cut to its first ``k`` rationale words, ``rationale`` rebuilt from them.

    For records extracted with ``--order score`` this is exactly the record an extraction with ``--k k`` writes: the
    selection sorts every candidate word by score before keeping the best ones, so smaller k give prefixes.
    """
    words = record["words"][:k]
    return {**record, "words": words, "rationale": rationale_text([(word, score) for word, score in words])}


def write_first_words(source: Path, out: Path, k: int) -> int:
    """Write the records of the rationale file ``source`` cut to their first ``k`` words (`first_words`) to ``out``,
    atomically, with the settings file an extraction with ``--k k`` would have written beside it.

    Returns:
        The number of records written.

    Raises:
        LmdistillError: ``source`` has no settings file, was extracted with ``--order input`` (its words are not in
            score order) or with fewer than ``k`` words per record.
    """
    path = settings_path(source)
    if not path.is_file():
        raise LmdistillError(f"{source} has no settings file {path}: cannot tell how it was extracted")
    settings = yaml.safe_load(path.read_text())
    if settings.get("order") != "score" or settings.get("k", 0) < k:
        raise LmdistillError(
            f"{source} was extracted with --order {settings.get('order')} --k {settings.get('k')}: its first {k} words "
            f"are the top-{k} rationale only with --order score and --k {k} or more"
        )
    records = [first_words(r, k) for r in read_records(source)]
    write_records(out, records, {**settings, "out": str(out), "k": k})
    return len(records)


def write_records(out: Path, records: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Write a rationale file and its settings file (`settings_path`), each atomically, the settings first (records
    never lack their settings)."""
    with staged(settings_path(out), directory=False) as staging:
        staging.write_text(yaml.safe_dump(settings, sort_keys=False))
    with staged(out, directory=False) as staging:
        staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def random_records(
    examples: list[Example], template: str, k: int, *, seed: int, drop_stop_words: bool
) -> list[dict[str, Any]]:
    """The random-k control of a saliency rationale file: per example `random_words` of its prompt's words, drawn
    with ``random.Random(f"{seed}:{id}")`` (the same for an example whatever the others), as records with ``id``,
    ``label``, ``words`` (``[[word, null], ...]``) and ``rationale`` (no teacher: no ``answer``, no ``correct``)."""
    records = []
    for example in examples:
        prompt = render_prompt(example, template)
        words = split_words(prompt.text, prompt.spans)
        chosen = random_words(words, k, random.Random(f"{seed}:{example.id}"), drop_stop_words=drop_stop_words)
        records.append(
            {
                "id": example.id,
                "label": example.label,
                "words": [[word, score] for word, score in chosen],
                "rationale": rationale_text(chosen),
            }
        )
    return records
