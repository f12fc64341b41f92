"""Batch input: many requests from a JSONL or CSV file, validated as a whole.

A manifest is all-or-nothing. Every row is checked before anything is enqueued, and
every bad row is reported with its line number. A half-enqueued backlog is worse than
none: the user would have to work out which rows went in before fixing and re-running.
(Re-running is safe anyway, since job ids are deterministic and enqueue is unique.)

Row fields are the ``JobRequest`` fields plus two optional ones:

- ``job_id``: an explicit id (``[A-Za-z0-9_-]``, at most 128 characters). Without one,
  the id comes from the request.
- ``priority``: ``high``, ``default`` or ``low``.

Rows are checked against the request limits of the settings (``JobRequest.limit_problems``).

JSONL has one JSON object per line, lines ending at ``\n`` only (a raw U+2028 is valid
inside a JSON string, so ``str.splitlines`` would cut such a row in two). Blank lines are
skipped. CSV needs a header row with the same field names. Empty cells count as absent.
``metadata`` is a JSON object, or it is spread over ``metadata.KEY`` columns whose
values are kept as strings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from pydantic import ValidationError

from producer.schema import JOB_ID_PATTERN, JobRequest

if TYPE_CHECKING:
    from producer.settings import Settings

PRIORITIES = ("high", "default", "low")
_JOB_ID = re.compile(JOB_ID_PATTERN)


@dataclass(frozen=True)
class EnqueueItem:
    """One request to enqueue, with the per-row options a manifest may carry."""

    request: JobRequest
    job_id: str | None = None
    priority: str | None = None


class ManifestError(ValueError):
    """Rows that failed validation. ``problems`` is a list of (number, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[int, str]], unit: str = "line"):
        self.source = source
        self.problems = problems
        self.unit = unit
        shown = "\n".join(f"  {unit} {n}: {msg}" for n, msg in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        rows = "row" if len(problems) == 1 else "rows"
        super().__init__(f"{source}: {len(problems)} invalid {rows}, nothing enqueued:\n{shown}{more}")


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} must be 1-128 characters from A-Z a-z 0-9 _ -")
    return job_id


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} must be one of {', '.join(PRIORITIES)}")
    return priority


def describe_validation_error(exc: ValidationError) -> str:
    """Problems joined by ``; ``, each ``field: reason`` (or the reason alone when it spans fields)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def within_limits(request: JobRequest, settings: "Settings") -> JobRequest:
    """``request``, or ValueError naming every text field longer than the settings allow."""
    problems = request.limit_problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    return request


def item_from_dict(row: dict[str, Any], settings: "Settings") -> EnqueueItem:
    """Validate one row; raises ValueError with a one-line reason."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    fields = dict(row)
    job_id = fields.pop("job_id", None)
    priority = fields.pop("priority", None)
    if job_id is not None:
        check_job_id(job_id)
    if priority is not None:
        check_priority(priority)
    try:
        request = JobRequest.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None
    return EnqueueItem(request=within_limits(request, settings), job_id=job_id, priority=priority)


def _jsonl_rows(text: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})")


def _csv_row_to_dict(row: dict[str | None, Any]) -> dict[str, Any]:
    if None in row:
        raise ValueError("more cells than header columns")
    fields: dict[str, Any] = {}
    spread: dict[str, str] = {}
    for name, value in row.items():
        if value is None or value == "":
            continue
        name = name.strip()
        if name.startswith("metadata."):
            spread[name[len("metadata."):]] = value
        elif name == "metadata":
            try:
                fields["metadata"] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"metadata: not valid JSON: {exc.msg}") from None
        else:
            fields[name] = value
    if spread:
        merged = fields.get("metadata", {})
        if not isinstance(merged, dict):
            raise ValueError("metadata: must be a JSON object when metadata.* columns are used")
        fields["metadata"] = {**merged, **spread}
    return fields


def _csv_rows(text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # csv's own line ends; U+2028 is a character
    if not reader.fieldnames:
        return
    start = reader.line_num + 1
    for row in reader:
        try:
            yield start, _csv_row_to_dict(row)
        except ValueError as exc:
            yield start, exc
        start = reader.line_num + 1


def manifest_format(path: Path, text: str) -> str:
    """``jsonl`` or ``csv``: by extension, else by whether the first character is ``{``."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def validate_items(rows: Iterable[tuple[int, Any]], source: str, settings: "Settings") -> list[EnqueueItem]:
    """All rows valid → the items; otherwise a ManifestError naming every bad row.

    An explicit ``job_id`` used twice is an error: the second row would silently become
    "already exists" although it may ask for something different.
    """
    items: list[EnqueueItem] = []
    problems: list[tuple[int, str]] = []
    first_use: dict[str, int] = {}
    for number, row in rows:
        if isinstance(row, Exception):
            problems.append((number, str(row)))
            continue
        try:
            item = item_from_dict(row, settings)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if item.job_id is not None:
            if item.job_id in first_use:
                problems.append((number, f"job_id {item.job_id!r} already used on line {first_use[item.job_id]}"))
                continue
            first_use[item.job_id] = number
        items.append(item)
    if problems:
        raise ManifestError(source, problems)
    return items


def read_manifest(path: str | Path, settings: "Settings") -> list[EnqueueItem]:
    """Parse and validate a whole manifest file; raises ManifestError if any row is bad."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    rows = _jsonl_rows(text) if manifest_format(path, text) == "jsonl" else _csv_rows(text)
    items = validate_items(rows, str(path), settings)
    if not items:
        raise ManifestError(str(path), [(0, "the manifest has no rows")])
    return items
