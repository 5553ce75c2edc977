"""Raw rows -> clean examples, with every dropped row counted by reason.

An example is a prompt and its responses sorted best first, each with a rank: a preference pair is
the case of two responses ranked [0, 1], so pairs, ranked lists and best-of-N sets (one best, the
rest tied) share one representation and one set of checks. Prompts and responses are text or chat
messages; messages are rendered with the model's chat template later (`utils.data.chat`), where the
tokenizer is known. A bad row is never an exception: it is dropped and its reason counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, TypedDict

from utils.data.sources import ACCEPTED_LAYOUTS, MALFORMED_MESSAGES, Messages, RawSplits, is_messages
from utils.errors import UserError

WRONG_TYPE = "field of the wrong type"
TIE = "tie (equal scores)"
IDENTICAL = {True: "chosen identical to rejected", False: "identical responses ranked differently"}  # by: is a pair


class Example(TypedDict, total=False):
    prompt: str | Messages  # "" for pretokenized examples
    responses: list[str] | list[Messages]  # best first; each message list is the turns after the prompt
    ranks: list[int]  # one per response: 0 for the best, dense, equal ranks are tied
    margin: float  # only when the row gives one
    score_margin: float  # score_chosen - score_rejected, only when the row has both
    token_ids: list[list[int]]  # pretokenized examples only: each response's whole sequence, best first
    source: str


def _kind(value: Any) -> str:
    """'text', 'chat', or the reason the value is neither."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "chat" if is_messages(value) else MALFORMED_MESSAGES
    return WRONG_TYPE


def _blank(value: str | Messages) -> bool:
    return not value.strip() if isinstance(value, str) else not any(m["content"].strip() for m in value)


def _identity(value: str | Messages) -> Any:
    """What responses are compared by: their text, or their messages' roles and text, stripped."""
    return value.strip() if isinstance(value, str) else tuple((m["role"], m["content"].strip()) for m in value)


def _ranking_problem(responses: Any, ranks: Any) -> str | None:
    if not isinstance(responses, list) or not isinstance(ranks, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        return WRONG_TYPE
    if len(ranks) != len(responses):
        return "ranks and responses differ in length"
    if len(responses) < 2:
        return "fewer than 2 responses"
    if len(set(ranks)) == 1:
        return "all responses tied"
    return None


def _content_problem(prompt: Any, responses: list, ranks: list[int], pair: bool) -> str | None:
    kinds = [_kind(prompt)] + [_kind(response) for response in responses]
    bad = next((kind for kind in kinds if kind not in ("text", "chat")), None)
    if bad:
        return bad
    if len(set(kinds[1:])) > 1:  # text and chat responses mixed
        return WRONG_TYPE
    if _blank(prompt):
        return "empty prompt"
    if any(_blank(response) for response in responses):
        return "empty response"
    if kinds[1] == "chat" and any(response[0]["role"] != "assistant" for response in responses):
        return "response does not start with an assistant message"
    seen: dict[Any, int] = {}
    for response, rank in zip(responses, ranks, strict=True):
        if seen.setdefault(_identity(response), rank) != rank:
            return IDENTICAL[pair]
    return None


def _token_problem(token_ids: list[list[int]]) -> str | None:
    if not all(token_ids):
        return "empty token sequence"
    if len({tuple(ids) for ids in token_ids}) < len(token_ids):
        return "chosen identical to rejected"
    return None


def _best_first(ranks: list[int]) -> tuple[list[int], list[int]]:
    """Positions sorted by rank (stable), and their ranks re-numbered 0, 1, ... without gaps."""
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    dense = {rank: number for number, rank in enumerate(sorted(set(ranks)))}
    return order, [dense[ranks[i]] for i in order]


def _problem(row: Any, adapter, source: str) -> tuple[Example | None, str | None]:
    """(clean example, None) or (None, the reason the row cannot be used)."""
    if not isinstance(row, dict):
        return None, "row is not an object"
    try:
        adapted = adapter(row)
    except KeyError as err:
        return None, f"missing field {err}"
    except (TypeError, AttributeError):
        return None, WRONG_TYPE
    except ValueError as err:
        return None, str(err)
    if adapted.get("tie"):
        return None, TIE
    extras = {key: adapted[key] for key in ("margin", "score_margin") if key in adapted}
    if "token_ids" in adapted:
        token_ids = adapted["token_ids"]
        reason = _token_problem(token_ids)
        if reason:
            return None, reason
        return Example(prompt="", responses=[""] * len(token_ids), ranks=list(range(len(token_ids))),
                       token_ids=token_ids, **extras, source=source), None
    pair = "chosen" in adapted
    if pair:
        responses, ranks = [adapted["chosen"], adapted["rejected"]], [0, 1]
    else:
        responses, ranks = adapted["responses"], adapted["ranks"]
    reason = _ranking_problem(responses, ranks) or _content_problem(adapted["prompt"], responses, ranks, pair)
    if reason:
        return None, reason
    order, dense = _best_first(ranks)
    return Example(prompt=adapted["prompt"], responses=[responses[i] for i in order], ranks=dense, **extras,
                   source=source), None


def keep_usable(rows: list[tuple[str, Any]], problem: Callable[[Any], tuple[Any, str | None]]) -> tuple[list, Counter]:
    """The rows `problem` turns into examples, and a count of the others by the reason it gives."""
    examples: list = []
    dropped: Counter = Counter()
    for _, row in rows:
        example, reason = problem(row)
        if reason:
            dropped[reason] += 1
        else:
            examples.append(example)
    return examples, dropped


def clean_rows(rows: list[tuple[str, Any]], adapter, source: str) -> tuple[list[Example], Counter]:
    """Adapt and validate rows; returns the examples and a count of dropped rows per reason."""
    return keep_usable(rows, lambda row: _problem(row, adapter, source))


def origin(rows: list[tuple[str, Any]]) -> str:
    """The file (or hub split) the rows came from: their location tags are `origin:where`."""
    return rows[0][0].rsplit(":", 1)[0]


def describe_drops(dropped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.most_common()) or "none"


def clean_source(raw: RawSplits, split: str, rows: list[tuple[str, Any]]) -> tuple[list[Example], str]:
    """Clean one split of one source; a split with nothing usable is an error that says why."""
    examples, dropped = clean_rows(rows, raw.adapter, raw.name)
    summary = (f"{raw.name} [{split}]: {len(rows)} rows -> {len(examples)} examples "
               f"(dropped: {describe_drops(dropped)})")
    if not examples:
        first = next((row for _, row in rows if isinstance(row, dict)), None)
        if first is not None and all(reason.startswith("missing field") for reason in dropped):
            raise UserError(f"{origin(rows)}: rows lack the needed columns, one of the layouts {ACCEPTED_LAYOUTS} "
                            f"(found: {', '.join(first)})")
        raise UserError(f"{origin(rows) if rows else raw.name}: no usable pairs or ranked lists in the {split} split "
                        f"after cleaning ({len(rows)} rows; dropped: {describe_drops(dropped)})")
    return examples, summary
