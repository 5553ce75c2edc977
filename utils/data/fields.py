"""The checks of a raw row's fields, shared by every layout: each returns the field's value or raises `Malformed`.

`Malformed` names the field and what it holds ("field 'chosen' is a number"), so that skip mode counts rows
by a short, stable reason and error mode stops with a message that says what to fix. A line of a file that
could not be read at all stands in its row's place as an `Unreadable`, which the first check turns into
`Malformed` like any other bad row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

Row = dict[str, Any]
Messages = list[dict[str, str]]
CHAT_HINT = " (need a list of {role, content} strings)"


class ValueKind(NamedTuple):
    """How a value of `type` reads in an error message: `plain` for data rows, which come from CSV and parquet
    files as well as JSON, and `json` for the request bodies of the scoring server, in JSON's own names."""

    type: type
    plain: str
    json: str


# The first match counts: a bool is an int too.
VALUE_KINDS: list[ValueKind] = [
    ValueKind(bool, "a boolean", "a boolean"), ValueKind(int, "a number", "a number"),
    ValueKind(float, "a decimal number", "a number"), ValueKind(str, "text", "a string"),
    ValueKind(list, "a list", "an array"), ValueKind(dict, "an object", "an object"),
    ValueKind(type(None), "null", "null")]


class Malformed(Exception):
    """A row that does not match its layout. `reason` is the short, stable text skip mode counts it by
    (naming the field); `hint` adds what was expected, for the error message."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason + hint)
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True)
class Unreadable:
    """A line or record of a file that could not be parsed, kept in its place as a malformed row."""

    reason: str
    hint: str = ""


def describe(value: Any, json_names: bool = False) -> str:
    """What `value` is, in plain words or (`json_names`) in JSON's."""
    kind = next((kind for kind in VALUE_KINDS if isinstance(value, kind.type)), None)
    if kind is None:
        return f"a {type(value).__name__}"
    return kind.json if json_names else kind.plain


def wrong_type(name: str, value: Any, expected: str) -> Malformed:
    """`name` (e.g. "field 'chosen'") holds `value`, which is not `expected`."""
    return Malformed(f"{name} is {describe(value)}", f", not {expected}")


def as_object(row: Any) -> dict:
    """The row as an object, or Malformed: an unreadable line, or a JSON value that is not an object."""
    if isinstance(row, Unreadable):
        raise Malformed(row.reason, row.hint)
    if not isinstance(row, dict):
        raise Malformed("row is not an object", f" (it is {describe(row)})")
    return row


def valid_text(value: str) -> bool:
    """False for text with lone surrogates (JSON's "\\ud800", or undecodable CSV bytes): the tokenizer
    cannot encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def required(row: Row, key: str) -> Any:
    if key not in row:
        raise Malformed(f"missing field '{key}'")
    return row[key]


def as_text(value: Any, name: str) -> str:
    """`value` as text, or Malformed naming `name` (e.g. "field 'chosen'")."""
    if not isinstance(value, str):
        raise wrong_type(name, value, "text")
    if not valid_text(value):
        raise Malformed(f"{name} is not valid Unicode text",
                        " (a lone surrogate such as \\ud800, or bytes that are not UTF-8)")
    return value


def as_integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(name, value, "an integer")
    return value


def is_messages(value: Any) -> bool:
    """A chat: a list of {"role": str, "content": str} objects."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def as_content(value: Any, name: str) -> str | Messages:
    """A prompt or response: text or chat messages, or Malformed naming `name`."""
    if isinstance(value, str):
        return as_text(value, name)
    if not isinstance(value, list):
        raise wrong_type(name, value, "text or chat messages")
    if not is_messages(value):
        raise Malformed(f"{name} is malformed chat messages", CHAT_HINT)
    for message in value:
        as_text(message["role"], name)
        as_text(message["content"], name)
    return value


def list_of(row: Row, key: str, item: Callable[[Any, str], Any], what: str) -> list:
    """The list under `key`, each item checked by `item`; Malformed names the field (or its item)."""
    value = required(row, key)
    if not isinstance(value, list):
        raise wrong_type(f"field '{key}'", value, f"a list of {what}")
    return [item(element, f"an item of field '{key}'") for element in value]
