"""Where preference rows come from, and how one raw row becomes {prompt, chosen, rejected}.

A source is data, not a class: `SOURCES` maps a dataset id to a row adapter and its split names.
Adding a data set is adding one entry. Anything not in the table is read as a local file or
folder, or (for `org/name` ids) as a hub data set, by `_columns`: it tells the common public layouts
apart by their keys (`LAYOUTS`), so pairs, ranked lists, chat messages and pretokenized rows need no
flag. Adapters reshape a row and check that it matches its layout, raising `Malformed` with the field
named when it does not; `utils.data.examples` decides whether a well-formed row is usable.

Files are read leniently: a line that cannot be read (invalid JSON or UTF-8, a truncated gzip tail, a
CSV record with the wrong number of fields) becomes an `Unreadable` row in its place, so the `--bad_rows`
policy decides about it like any other malformed row and the row positions (the phase split) stay put.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from utils.errors import UserError, first_line

Row = dict[str, Any]
Adapter = Callable[[Row], Row]
Messages = list[dict[str, str]]
CHAT_HINT = " (need a list of {role, content} strings)"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
ACCEPTED_LAYOUTS = ("prompt/chosen/rejected, chosen/rejected (HH dialogues or chat messages), prompt/responses/ranks, "
                    "prompt/ranked_outputs, conversation/ranked_responses (OpenAssistant) or "
                    "input_ids_chosen/input_ids_rejected (pretokenized); step-labelled prompt/steps/labels "
                    "rows train a process reward model with --process_reward")
ASSISTANT = "\n\nAssistant:"
LOCAL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
EVAL_SPLIT_NAMES = ("eval", "test", "validation", "valid")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) rejects long texts; this reads any field
GZIP_CHUNK = 1 << 20
# How a value reads in an error message, by type (the first match counts: a bool is an int too).
VALUE_KINDS: list[tuple[type, str]] = [
    (bool, "a boolean"), (int, "a number"), (float, "a decimal number"), (str, "text"), (list, "a list"),
    (dict, "an object"), (type(None), "null")]


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


def describe(value: Any) -> str:
    return next((name for types, name in VALUE_KINDS if isinstance(value, types)), f"a {type(value).__name__}")


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


# The layouts `_columns` reads, each told apart by a key only it has, checked in this order; any
# other row is a pair (`_pair`), so a row with none of these keys fails as a pair with a missing field.
LAYOUTS: list[tuple[str, Adapter]] = [
    ("input_ids_chosen", _pretokenized),
    ("ranked_responses", _oasst),
    ("ranked_outputs", _ranked_outputs),
    ("responses", _ranked),
]


def _columns(row: Row) -> Row:
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
    "Dahoas/rm-static": Source(_columns),
    "Dahoas/full-hh-rlhf": Source(_columns),
    "Dahoas/synthetic-instruct-gptj-pairwise": Source(_synthetic_gptj, eval_split=None),
    "yitingxie/rlhf-reward-datasets": Source(_yitingxie),
    "openai/webgpt_comparisons": Source(_webgpt, eval_split=None),
    "stanfordnlp/SHP": Source(_shp, eval_split="validation"),
    "Anthropic/hh-rlhf": Source(_columns),
}


@dataclass
class RawSplits:
    """One source's raw rows: each split is a list of (where, row); `where` names file and line."""

    name: str
    adapter: Adapter
    train: list[tuple[str, Any]]
    eval: list[tuple[str, Any]] | None


def place(where: str) -> str:
    """`file:line 7` as `file, line 7`, for messages."""
    origin, _, spot = where.rpartition(":")
    return f"{origin}, {spot}" if origin else where


def _gunzip(path: str) -> tuple[bytes, Unreadable | None]:
    """The data of a gzip file up to where it ends early or turns corrupt, and why it stops there (None: it
    does not). Read by hand because the gzip module loses the data it holds when it meets the break."""
    out: list[bytes] = []
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    with open(path, "rb") as handle:
        while chunk := handle.read(GZIP_CHUNK):
            try:
                out.append(inflater.decompress(chunk))
                while inflater.eof and inflater.unused_data:  # another member follows (concatenated files)
                    rest, inflater = inflater.unused_data, zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
                    out.append(inflater.decompress(rest))
            except zlib.error as err:
                return b"".join(out), Unreadable("corrupt gzip data", f" ({err})")
    if out and not inflater.eof:
        return b"".join(out), Unreadable("truncated gzip file", " (it ends before its end-of-stream marker)")
    return b"".join(out), None


def _read_json_lines(path: str, data: bytes, broken: Unreadable | None) -> list[tuple[str, Any]]:
    """One row per non-blank line; a line that cannot be read is an `Unreadable` row in its place, and so is
    the incomplete last line of a broken gzip file."""
    lines = data.split(b"\n")  # not splitlines(): U+2028 is valid in JSON
    if broken:
        lines.pop()
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            line_text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append((f"{path}:line {number}", Unreadable(
                "not UTF-8 text", f" (byte 0x{line[err.start]:02x} at column {err.start + 1})")))
            continue
        if line_text.strip():
            rows.append((f"{path}:line {number}", _parse_json_line(line_text)))
    if broken:
        rows.append((f"{path}:line {len(lines) + 1}", broken))
    return rows


def _gist(err: BaseException) -> str:
    """The first clause of a parser's message ("Exceeds the limit (4300 digits) for integer string conversion")."""
    return first_line(err).split(": ")[0]


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return Unreadable("not valid JSON", f" ({err.msg}, column {err.colno})")
    except RecursionError:
        return Unreadable("not valid JSON", " (nested too deeply)")
    except ValueError as err:  # an integer literal beyond Python's digit limit
        return Unreadable("not valid JSON", f" ({_gist(err)})")


def _read_json_array(path: str, data: bytes, broken: Unreadable | None) -> list[tuple[str, Any]]:
    """A `[...]` file is parsed whole, so a broken one cannot be read in part: an error in either mode."""
    if broken:
        raise UserError(f"{path}: {broken.reason}{broken.hint}; a JSON array cannot be read in part")
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); a JSON array "
                        "cannot be read in part") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except (RecursionError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({_gist(err)})") from None
    return [(f"{path}:item {i + 1}", row) for i, row in enumerate(rows)]


def _read_csv(path: str, data: bytes) -> list[tuple[str, Any]]:
    """Records as {header: value} rows, tagged with the line they start on. Bytes that are not UTF-8 become
    lone surrogates, which the field checks report; a record with the wrong number of fields is unreadable."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    header = next((record for record in reader if record), [])  # blank lines are no records
    rows: list[tuple[str, Any]] = []
    while True:
        where = f"{path}:line {reader.line_num + 1}"
        try:
            record = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:  # the reader cannot go on: the rest of the file is one unreadable row
            rows.append((where, Unreadable("unreadable CSV record", f" ({err})")))
            return rows
        if record and len(record) == len(header):
            rows.append((where, dict(zip(header, record, strict=True))))
        elif record:
            rows.append((where, Unreadable("wrong number of fields", f" ({len(record)}; the header has "
                                                                    f"{len(header)})")))


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable parquet file ({first_line(err)})") from None
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]


def _read_text_file(path: str) -> list[tuple[str, Any]]:
    lower = path.lower()
    try:
        if lower.endswith(".gz"):
            data, broken = _gunzip(path)
        else:
            with open(path, "rb") as handle:
                data, broken = handle.read(), None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    if lower.endswith(".csv"):
        return _read_csv(path, data)
    if lower.endswith((".json", ".json.gz")) and data.lstrip().startswith(b"["):
        return _read_json_array(path, data, broken)
    return _read_json_lines(path, data, broken)


def _read_file(path: str) -> list[tuple[str, Any]]:
    """Rows of one local file, each tagged with `file:line` (or `file:row`, `file:item`) for messages."""
    rows = _read_parquet(path) if path.lower().endswith(".parquet") else _read_text_file(path)
    if not rows:
        raise UserError(f"{path}: empty file, no rows")
    return rows


def _split_files(folder: str) -> dict[str, str]:
    """`train.*` and `eval.*` (or test/validation) files of a folder, by split."""
    found: dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = entry.split(".", 1)[0], "." + entry.split(".", 1)[-1]
        if ext.lower() not in LOCAL_EXTENSIONS:
            continue
        split = "train" if stem == "train" else "eval" if stem in EVAL_SPLIT_NAMES else None
        if split and split not in found:
            found[split] = os.path.join(folder, entry)
    return found


def _from_hf_dataset(name: str, dataset: Any) -> list[tuple[str, Any]]:
    return [(f"{name}:row {i}", row) for i, row in enumerate(dataset)]


def _load_saved_dataset(folder: str) -> RawSplits:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(folder)
    if not isinstance(loaded, DatasetDict):
        return RawSplits(folder, _columns, _from_hf_dataset(folder, loaded), None)
    eval_name = next((s for s in EVAL_SPLIT_NAMES if s in loaded), None)
    if "train" not in loaded:
        raise UserError(f"{folder}: saved data set has no 'train' split (has: {', '.join(loaded)})")
    eval_rows = _from_hf_dataset(f"{folder}[{eval_name}]", loaded[eval_name]) if eval_name else None
    return RawSplits(folder, _columns, _from_hf_dataset(f"{folder}[train]", loaded["train"]), eval_rows)


def _load_local(path: str) -> RawSplits:
    if os.path.isfile(path):
        if not path.lower().endswith(LOCAL_EXTENSIONS):
            raise UserError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_EXTENSIONS)})")
        return RawSplits(path, _columns, _read_file(path), None)
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")):
        return _load_saved_dataset(path)
    files = _split_files(path)
    if "train" not in files:
        raise UserError(f"{path}: folder has no train.{{jsonl,json,parquet,csv}} file and is not "
                        "a datasets.save_to_disk folder")
    eval_rows = _read_file(files["eval"]) if "eval" in files else None
    return RawSplits(path, _columns, _read_file(files["train"]), eval_rows)


def _load_hub(name: str, source: Source) -> RawSplits:
    from datasets import load_dataset

    try:
        loaded = load_dataset(name)
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise UserError(f"cannot load data set '{name}' from the Hugging Face hub "
                        f"(offline, or no such data set?): {first_line(err)}") from None
    if source.train_split not in loaded:
        raise UserError(f"data set '{name}' has no '{source.train_split}' split "
                        f"(has: {', '.join(loaded)})")
    train = _from_hf_dataset(f"{name}[{source.train_split}]", loaded[source.train_split])
    eval_split = source.eval_split if source.eval_split in loaded else None
    eval_rows = _from_hf_dataset(f"{name}[{eval_split}]", loaded[eval_split]) if eval_split else None
    return RawSplits(name, source.adapter, train, eval_rows)


def local_path(path: str, repo_root: str) -> str:
    """The file or folder a `--data_path` entry reads from disk (`local/jsonfile` is `repo_root/data`)."""
    return os.path.join(repo_root, "data") if path == "local/jsonfile" else path


def load_source(path: str, repo_root: str) -> RawSplits:
    """Raw rows of one `--data_path` entry: a known id, `local/jsonfile`, a local path, or a hub id."""
    if path in SOURCES:
        return _load_hub(path, SOURCES[path])
    if path == "local/jsonfile":
        folder = local_path(path, repo_root)
        for split in ("train", "eval"):
            if not os.path.isfile(os.path.join(folder, f"{split}.json")):
                raise UserError(f"local/jsonfile: {os.path.join(folder, split + '.json')} not found")
        raw = _load_local(folder)
        raw.name = "jsonfile"
        return raw
    if os.path.exists(path):
        return _load_local(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.lower().endswith(LOCAL_EXTENSIONS):
        return _load_hub(path, Source(_columns))
    known = ", ".join(sorted(SOURCES))
    raise UserError(f"--data_path '{path}': no such file or folder, and not a known data set "
                    f"(known: {known}, local/jsonfile, or any hub id org/name)")
