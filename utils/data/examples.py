"""Raw rows -> clean examples, with every dropped row counted by reason.

An example is a prompt and its responses ranked best first: a preference pair is the case of two
responses, so ranked lists can use the same representation later.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, TypedDict

from utils.data.sources import RawSplits
from utils.errors import UserError


class Example(TypedDict):
    prompt: str
    responses: list[str]  # best first
    source: str


def _problem(row: Any, adapter) -> tuple[dict | None, str | None]:
    """(adapted row, None) or (None, reason it cannot be used)."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    try:
        pair = adapter(row)
    except KeyError as err:
        return None, f"missing field {err}"
    except (TypeError, AttributeError):
        return None, "field of the wrong type"
    except ValueError as err:
        return None, str(err)
    if not all(isinstance(pair[key], str) for key in ("prompt", "chosen", "rejected")):
        return None, "field of the wrong type"
    if pair.get("tie"):
        return None, "tie (equal scores)"
    if not pair["prompt"].strip():
        return None, "empty prompt"
    if not pair["chosen"].strip() or not pair["rejected"].strip():
        return None, "empty response"
    if pair["chosen"].strip() == pair["rejected"].strip():
        return None, "chosen identical to rejected"
    return pair, None


def clean_rows(rows: list[tuple[str, Any]], adapter, source: str) -> tuple[list[Example], Counter]:
    """Adapt and validate rows; returns the examples and a count of dropped rows per reason."""
    examples: list[Example] = []
    dropped: Counter = Counter()
    for _, row in rows:
        pair, reason = _problem(row, adapter)
        if reason:
            dropped[reason] += 1
        else:
            examples.append(Example(prompt=pair["prompt"], responses=[pair["chosen"], pair["rejected"]],
                                    source=source))
    return examples, dropped


def origin(rows: list[tuple[str, Any]]) -> str:
    """The file (or hub split) the rows came from: their location tags are `origin:where`."""
    return rows[0][0].rsplit(":", 1)[0]


def describe_drops(dropped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.most_common()) or "none"


def clean_source(raw: RawSplits, split: str, rows: list[tuple[str, Any]]) -> tuple[list[Example], str]:
    """Clean one split of one source; a split with nothing usable is an error that says why."""
    examples, dropped = clean_rows(rows, raw.adapter, raw.name)
    summary = f"{raw.name} [{split}]: {len(rows)} rows -> {len(examples)} pairs (dropped: {describe_drops(dropped)})"
    if not examples:
        first = next((row for _, row in rows if isinstance(row, dict)), None)
        if first is not None and all(reason.startswith("missing field") for reason in dropped):
            raise UserError(f"{origin(rows)}: rows lack the needed columns "
                            f"prompt/chosen/rejected or chosen/rejected (found: {', '.join(first)})")
        raise UserError(f"{origin(rows) if rows else raw.name}: no usable pairs in the {split} split after cleaning "
                        f"({len(rows)} rows; dropped: {describe_drops(dropped)})")
    return examples, summary
