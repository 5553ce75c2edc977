"""How one raw row becomes {prompt, chosen, rejected} (or a ranked list, or token ids): the row adapters.

A source is data, not a class: `SOURCES` maps a dataset id to a row adapter and its split names.
Adding a data set is adding one entry. Anything not in the table (local files and folders, other hub
ids) is read by `columns`: it tells the common public layouts apart by their keys (`LAYOUTS`), so
pairs, ranked lists, chat messages and pretokenized rows need no flag. Adapters reshape a row and check
that it matches its layout, raising `Malformed` with the field named when it does not;
`utils.data.examples` decides whether a well-formed row is usable.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_reward.utils.data.fields import (
    Malformed,
    Messages,
    Row,
    as_content,
    as_integer,
    as_text,
    describe,
    list_of,
    required,
    wrong_type,
)

Adapter = Callable[[Row], Row]
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
ACCEPTED_LAYOUTS = ("prompt/chosen/rejected, chosen/rejected (HH dialogues or chat messages), prompt/responses/ranks, "
                    "prompt/ranked_outputs, conversation/ranked_responses (OpenAssistant) or "
                    "input_ids_chosen/input_ids_rejected (pretokenized); step-labelled prompt/steps/labels "
                    "rows train a process reward model with --process_reward, attribute-rated "
                    "prompt/response rows (HelpSteer, UltraFeedback) one with --objective regression")
ASSISTANT = "\n\nAssistant:"


def _text_field(row: Row, key: str) -> str:
    return as_text(required(row, key), f"field '{key}'")


def _one_kind(responses: list, fields: str) -> list:
    """Responses are all text or all chat messages (a text prompt beside chat responses is fine)."""
    if len({isinstance(response, str) for response in responses}) > 1:
        raise Malformed(f"{fields} mix text and chat messages")
    return responses


def _responses(row: Row, key: str) -> list:
    return _one_kind(list_of(row, key, as_content, "texts or chat messages"), f"the items of field '{key}'")


def _ranks(row: Row, responses: list, responses_key: str) -> list[int]:
    ranks = list_of(row, "ranks", as_integer, "integers")
    if len(ranks) != len(responses):
        raise Malformed(f"fields 'ranks' and '{responses_key}' differ in length",
                        f" ({len(ranks)} ranks, {len(responses)} responses)")
    return ranks


def split_hh_dialogue(chosen: str, rejected: str) -> Row:
    """Anthropic HH rows hold two whole dialogues; the prompt is their shared text up to the last
    `\\n\\nAssistant:` they have in common."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no shared '{ASSISTANT.strip()}' turn in chosen/rejected")
    cut += len(ASSISTANT)
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def split_chat(chosen: Messages, rejected: Messages) -> Row:
    """Chat pairs without a prompt column hold two whole conversations; the prompt is the messages
    they open with in common, the rest of each is its response."""
    shared = 0
    for ours, theirs in zip(chosen, rejected, strict=False):  # up to the shorter one
        if (ours["role"], ours["content"]) != (theirs["role"], theirs["content"]):
            break
        shared += 1
    if not shared:
        raise ValueError("no shared leading messages in chosen/rejected")
    if shared in (len(chosen), len(rejected)):
        raise ValueError("no messages after the shared prompt in chosen or rejected")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _number(row: Row, key: str) -> float | None:
    """The row's number under `key` (numeric text too, as CSV gives it), None when absent or empty."""
    value = row.get(key)
    if value is None or value == "":
        return None
    number = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # OverflowError: an integer beyond any float
            number = float(value)
    if not math.isfinite(number):
        raise Malformed(f"field '{key}' is not a finite number", f" (it is {describe(value)})")
    return number


def _required_number(row: Row, key: str) -> float:
    number = _number(row, key)
    if number is None:
        raise Malformed(f"missing field '{key}'")
    return number


def _judgement(row: Row) -> Row:
    """A pair row's optional margin, score difference, and tie (a `tie: true` flag or equal scores)."""
    extra: Row = {}
    margin = _number(row, "margin")
    if margin is not None:
        extra["margin"] = margin
    scores = _number(row, "score_chosen"), _number(row, "score_rejected")
    if None not in scores:
        extra["score_margin"] = scores[0] - scores[1]
    if row.get("tie") is True or extra.get("score_margin") == 0:
        extra["tie"] = True
    return extra


def _pair(row: Row) -> Row:
    """prompt/chosen/rejected columns (text or chat messages), or chosen/rejected whole dialogues: HH
    text or chat messages, whose shared opening is the prompt."""
    chosen, rejected = required(row, "chosen"), required(row, "rejected")
    responses = _one_kind([as_content(chosen, "field 'chosen'"), as_content(rejected, "field 'rejected'")],
                          "fields 'chosen' and 'rejected'")
    if "prompt" in row:
        pair = {"prompt": as_content(row["prompt"], "field 'prompt'"), "chosen": chosen, "rejected": rejected}
    elif isinstance(responses[0], list):
        pair = split_chat(chosen, rejected)
    else:
        pair = split_hh_dialogue(chosen, rejected)
    return {**pair, **_judgement(row)}


def _ranked(row: Row) -> Row:
    """{prompt, responses, ranks}: a lower rank is better, equal ranks are unordered."""
    prompt = as_content(required(row, "prompt"), "field 'prompt'")
    responses = _responses(row, "responses")
    return {"prompt": prompt, "responses": responses, "ranks": _ranks(row, responses, "responses")}


def _ranked_outputs(row: Row) -> Row:
    """{prompt, ranked_outputs: [best, ..., worst]}."""
    prompt = as_content(required(row, "prompt"), "field 'prompt'")
    outputs = _responses(row, "ranked_outputs")
    return {"prompt": prompt, "responses": outputs, "ranks": list(range(len(outputs)))}


def _oasst_message(message: Any, name: str) -> dict[str, str]:
    """One OpenAssistant turn, {role: prompter or assistant, text}, as a chat message."""
    role = message.get("role") if isinstance(message, dict) else None
    if not isinstance(role, str) or role not in OASST_ROLES:
        raise Malformed(f"{name} is not a {{role, text}} message", " (role: prompter or assistant)")
    return {"role": OASST_ROLES[role], "content": as_text(message.get("text"), name)}


def _oasst(row: Row) -> Row:
    """OpenAssistant ranked siblings: the conversation so far, then each ranked reply as an assistant turn."""
    prompt = list_of(row, "conversation", _oasst_message, "{role, text} messages")
    replies = list_of(row, "ranked_responses", as_text, "texts")
    ranks = _ranks(row, replies, "ranked_responses") if "ranks" in row else list(range(len(replies)))
    return {"prompt": prompt, "responses": [[{"role": "assistant", "content": reply}] for reply in replies],
            "ranks": ranks}


def _token_ids(row: Row, side: str) -> list[int]:
    """`input_ids_<side>` where `attention_mask_<side>` (optional) is 1; the tokenizer's range is checked
    once it is known (`utils.data.tokenize`)."""
    ids = list_of(row, f"input_ids_{side}", as_integer, "token ids")
    mask = row.get(f"attention_mask_{side}")
    if mask is None:
        return ids
    if not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
        raise Malformed(f"field 'attention_mask_{side}' is not one 0/1 per input id")
    return [i for i, m in zip(ids, mask, strict=True) if m == 1]


def _pretokenized(row: Row) -> Row:
    """TRL-style tokenised pairs: each side's whole sequence, prompt included."""
    return {"token_ids": [_token_ids(row, "chosen"), _token_ids(row, "rejected")], **_judgement(row)}


# The layouts `columns` reads, each told apart by a key only it has, checked in this order; any
# other row is a pair (`_pair`), so a row with none of these keys fails as a pair with a missing field.
LAYOUTS: list[tuple[str, Adapter]] = [
    ("input_ids_chosen", _pretokenized),
    ("ranked_responses", _oasst),
    ("ranked_outputs", _ranked_outputs),
    ("responses", _ranked),
]


def columns(row: Row) -> Row:
    """The adapter for local files and unknown hub ids: the first matching layout of `LAYOUTS`, or a pair."""
    return next((adapter for key, adapter in LAYOUTS if key in row), _pair)(row)


def _human_assistant(question: str) -> str:
    return " Human: " + question + " Assistant:"


def _synthetic_gptj(row: Row) -> Row:
    return {"prompt": _human_assistant(_text_field(row, "prompt")), "chosen": " " + _text_field(row, "chosen"),
            "rejected": " " + _text_field(row, "rejected")}


def _yitingxie(row: Row) -> Row:
    return {"prompt": _text_field(row, "prompt") + "Assistant:",
            "chosen": _text_field(row, "chosen").split("Assistant:")[-1],
            "rejected": _text_field(row, "rejected").split("Assistant:")[-1]}


def _strip_citations(value: str) -> str:
    return re.sub(r"[\(\[].*?[\)\]]", "", re.sub(r" [\(\[].*?[\)\]]", "", value))


def _webgpt(row: Row) -> Row:
    question = required(row, "question")
    if not isinstance(question, dict):
        raise wrong_type("field 'question'", question, "an object with full_text")
    answers = [_strip_citations(_text_field(row, "answer_0")), _strip_citations(_text_field(row, "answer_1"))]
    score_0, score_1 = _required_number(row, "score_0"), _required_number(row, "score_1")
    best = 0 if score_0 >= score_1 else 1
    return {"prompt": _human_assistant(_text_field(question, "full_text")), "chosen": " " + answers[best],
            "rejected": " " + answers[1 - best], "tie": score_0 == score_1}


def _shp(row: Row) -> Row:
    a, b = _text_field(row, "human_ref_A"), _text_field(row, "human_ref_B")
    label = required(row, "labels")
    if isinstance(label, bool) or label not in (0, 1):
        raise Malformed("field 'labels' is not 0 or 1", f" (it is {describe(label)})")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return {"prompt": _human_assistant(_text_field(row, "history")), "chosen": " " + chosen,
            "rejected": " " + rejected}


@dataclass(frozen=True)
class Source:
    adapter: Adapter
    train_split: str = "train"
    eval_split: str | None = "test"  # None: carve eval out of train, 9:1, as DeepSpeed-Chat does


SOURCES: dict[str, Source] = {
    "Dahoas/rm-static": Source(columns),
    "Dahoas/full-hh-rlhf": Source(columns),
    "Dahoas/synthetic-instruct-gptj-pairwise": Source(_synthetic_gptj, eval_split=None),
    "yitingxie/rlhf-reward-datasets": Source(_yitingxie),
    "openai/webgpt_comparisons": Source(_webgpt, eval_split=None),
    "stanfordnlp/SHP": Source(_shp, eval_split="validation"),
    "Anthropic/hh-rlhf": Source(columns),
    # Attribute-rated responses, for --objective regression (read by utils.data.attributes).
    "nvidia/HelpSteer": Source(columns, eval_split="validation"),
    "nvidia/HelpSteer2": Source(columns, eval_split="validation"),
    "openbmb/UltraFeedback": Source(columns, eval_split=None),
}
