"""Raw rows -> clean examples, with every dropped row counted by reason.

An example is a prompt and its responses sorted best first, each with a rank: a preference pair is
the case of two responses ranked [0, 1], so pairs, ranked lists and best-of-N sets (one best, the
rest tied) share one representation and one set of checks. Prompts and responses are text or chat
messages; messages are rendered with the model's chat template later (`utils.data.chat`), where the
tokenizer is known.

Rows that cannot be used are of two kinds. A malformed row (unreadable, or not matching its layout: the
adapters raise `Malformed`) follows the `--bad_rows` policy: "error" stops at the first one with a
one-line message naming its file, line and field; "skip" drops and counts it. A well-formed row that
cannot train (an empty or tied answer, an eval example that repeats a training one, ...) is always
dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from typing import Any, TypedDict

from rlhf_reward.utils.data.adapters import ACCEPTED_LAYOUTS, Adapter
from rlhf_reward.utils.data.fields import Malformed, Messages, as_object
from rlhf_reward.utils.data.readers import place
from rlhf_reward.utils.data.sources import RawSplits
from rlhf_reward.utils.errors import UserError

BAD_ROWS = ("error", "skip")
SKIP_HINT = "(--bad_rows skip drops such rows and counts them)"
TIE = "tie (equal scores)"
LEAK = "same as a training example"
IDENTICAL_PAIR = "chosen identical to rejected"
IDENTICAL_RANKED = "identical responses ranked differently"

# (example, None) for a usable row, (None, why it is dropped) for the others.
Outcome = tuple[Any, str | None]


class Example(TypedDict, total=False):
    prompt: str | Messages  # "" for pretokenized examples
    responses: list[str] | list[Messages]  # best first; each message list is the turns after the prompt
    ranks: list[int]  # one per response: 0 for the best, dense, equal ranks are tied
    margin: float  # only when the row gives one
    score_margin: float  # score_chosen - score_rejected, only when the row has both
    token_ids: list[list[int]]  # pretokenized examples only: each response's whole sequence, best first
    where: str  # pretokenized examples only: the row's place, for errors found once the tokenizer is known
    source: str


def is_blank(value: str | Messages) -> bool:
    return not value.strip() if isinstance(value, str) else not any(m["content"].strip() for m in value)


def _identity(value: str | Messages) -> Any:
    """What responses are compared by: their text, or their messages' roles and text, stripped."""
    return value.strip() if isinstance(value, str) else tuple((m["role"], m["content"].strip()) for m in value)


def _ranking_problem(responses: list, ranks: list[int]) -> str | None:
    if len(responses) < 2:
        return "fewer than 2 responses"
    if len(set(ranks)) == 1:
        return "all responses tied"
    return None


def _content_problem(prompt: str | Messages, responses: list, ranks: list[int], pair: bool) -> str | None:
    if is_blank(prompt):
        return "empty prompt"
    if any(is_blank(response) for response in responses):
        return "empty response"
    if isinstance(responses[0], list) and any(response[0]["role"] != "assistant" for response in responses):
        return "response does not start with an assistant message"
    seen: dict[Any, int] = {}
    for response, rank in zip(responses, ranks, strict=True):
        if seen.setdefault(_identity(response), rank) != rank:
            return IDENTICAL_PAIR if pair else IDENTICAL_RANKED
    return None


def _token_problem(token_ids: list[list[int]]) -> str | None:
    if not all(token_ids):
        return "empty token sequence"
    if len({tuple(ids) for ids in token_ids}) < len(token_ids):
        return IDENTICAL_PAIR
    return None


def _best_first(ranks: list[int]) -> tuple[list[int], list[int]]:
    """Positions sorted by rank (stable), and their ranks re-numbered 0, 1, ... without gaps."""
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    dense = {rank: number for number, rank in enumerate(sorted(set(ranks)))}
    return order, [dense[ranks[i]] for i in order]


def _outcome(where: str, row: Any, adapter: Adapter, source: str) -> Outcome:
    """(clean example, None) or (None, the reason a well-formed row cannot be used); Malformed for the others."""
    try:
        adapted = adapter(as_object(row))
    except ValueError as err:  # the adapters' word for a well-formed row that cannot be used
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
                       token_ids=token_ids, **extras, where=where, source=source), None
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


def _fingerprint(example: dict) -> bytes:
    """What makes two examples the same: everything but where they come from."""
    content = {key: value for key, value in example.items() if key not in ("source", "where")}
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).digest()


def _file(where: str) -> str:
    """The file (or hub split) of a location tag `origin:where`."""
    return where.rsplit(":", 1)[0]


def malformed_error(where: str, err: Malformed) -> UserError:
    return UserError(f"{place(where)}: {err.reason}{err.hint} {SKIP_HINT}")


def _lacks_columns(rows: list[tuple[str, Any]], outcomes: list[Outcome], file: str) -> bool:
    """Whether no row of `file` is usable and every one misses a field: the file has another layout, which
    the summary's error explains better than its first row's."""
    return all(example is None and reason.startswith("missing field")
               for (where, _), (example, reason) in zip(rows, outcomes, strict=True) if _file(where) == file)


def judge_rows(rows: list[tuple[str, Any]], problem: Callable[[str, Any], Outcome],
               bad_rows: str = "error") -> list[Outcome]:
    """Each row's outcome, in order. A malformed row is dropped with its reason in skip mode; in error
    mode the first one is raised once every row has been read, unless no row of its file has the
    needed fields (the caller's error about the layout is the better one then)."""
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {', '.join(BAD_ROWS)}, not {bad_rows!r}")
    outcomes: list[Outcome] = []
    first: tuple[str, Malformed] | None = None
    for where, row in rows:
        try:
            example, reason = problem(where, row)
        except Malformed as err:
            first = first or (where, err)
            example, reason = None, err.reason
        outcomes.append((example, reason))
    if first and bad_rows == "error" and not _lacks_columns(rows, outcomes, _file(first[0])):
        raise malformed_error(*first)
    return outcomes


def drop_leaks(train: list[Outcome], evaluation: list[Outcome]) -> list[Outcome]:
    """The eval outcomes, with every example that repeats a training example dropped: a pair the
    model trained on would inflate the held-out accuracy."""
    seen = {_fingerprint(example) for example, _ in train if example is not None}
    return [(None, LEAK) if example is not None and _fingerprint(example) in seen else (example, reason)
            for example, reason in evaluation]


def repeats(examples: list) -> int:
    """How many examples repeat an earlier one of the same split. They are kept (a comparison
    collected twice weighs twice, as in DeepSpeed-Chat and TRL), but the summary says how many."""
    return len(examples) - len({_fingerprint(example) for example in examples})


def tally(outcomes: list[Outcome]) -> tuple[list, Counter]:
    """The examples of the usable rows, and a count of the others by reason."""
    return ([example for example, reason in outcomes if reason is None],
            Counter(reason for _, reason in outcomes if reason is not None))


def row_problem(adapter: Adapter, source: str) -> Callable[[str, Any], Outcome]:
    """The `problem` of `judge_rows` for preference rows read by `adapter`."""
    return lambda where, row: _outcome(where, row, adapter, source)


def origin(rows: list[tuple[str, Any]]) -> str:
    """The file (or hub split) the rows came from."""
    return _file(rows[0][0])


def describe_drops(dropped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.most_common()) or "none"


def _column_names(row: dict) -> str:
    """A row's keys for a one-line message (escaped, and cut when long)."""
    return ", ".join(repr(key)[1:-1][:40] if isinstance(key, str) else repr(key)[:40] for key in row)[:300]


def summarise(raw: RawSplits, split: str, rows: list[tuple[str, Any]],
              outcomes: list[Outcome]) -> tuple[list[Example], str]:
    """The examples of one split of one source and its summary line; a split with nothing usable is an
    error that says why."""
    examples, dropped = tally(outcomes)
    repeated = repeats(examples)
    summary = (f"{raw.name} [{split}]: {len(rows)} rows -> {len(examples)} examples "
               f"(dropped: {describe_drops(dropped)})" + (f"; {repeated} repeat an earlier example, kept" if repeated
                                                          else ""))
    if not examples:
        first = next((row for _, row in rows if isinstance(row, dict)), None)
        if first is not None and all(reason.startswith("missing field") for reason in dropped):
            raise UserError(f"{origin(rows)}: rows lack the needed columns, one of the layouts {ACCEPTED_LAYOUTS} "
                            f"(found: {_column_names(first)})")
        raise UserError(f"{origin(rows) if rows else raw.name}: no usable pairs or ranked lists in the {split} split "
                        f"after cleaning ({len(rows)} rows; dropped: {describe_drops(dropped)})")
    return examples, summary
