"""Where preference rows come from, and how one raw row becomes {prompt, chosen, rejected}.

A source is data, not a class: `SOURCES` maps a dataset id to a row adapter and its split names.
Adding a data set is adding one entry. Anything not in the table is read as a local file or
folder, or (for `org/name` ids) as a hub data set, by `_columns`: it tells the common public layouts
apart by their keys (`LAYOUTS`), so pairs, ranked lists, chat messages and pretokenized rows need no
flag. Adapters only reshape a row; `utils.data.examples` decides whether it is usable.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from utils.errors import UserError, first_line

Row = dict[str, Any]
Adapter = Callable[[Row], Row]
Messages = list[dict[str, str]]
MALFORMED_MESSAGES = "malformed chat messages (need a list of {role, content} strings)"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
ACCEPTED_LAYOUTS = ("prompt/chosen/rejected, chosen/rejected (HH dialogues or chat messages), prompt/responses/ranks, "
                    "prompt/ranked_outputs, conversation/ranked_responses (OpenAssistant) or "
                    "input_ids_chosen/input_ids_rejected (pretokenized); step-labelled prompt/steps/labels "
                    "rows train a process reward model with --process_reward")
ASSISTANT = "\n\nAssistant:"
LOCAL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
EVAL_SPLIT_NAMES = ("eval", "test", "validation", "valid")


def split_hh_dialogue(chosen: str, rejected: str) -> Row:
    """Anthropic HH rows hold two whole dialogues; the prompt is their shared text up to the last
    `\\n\\nAssistant:` they have in common."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no shared '{ASSISTANT.strip()}' turn in chosen/rejected")
    cut += len(ASSISTANT)
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def is_messages(value: Any) -> bool:
    """A chat: a list of {"role": str, "content": str} objects."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def split_chat(chosen: Messages, rejected: Messages) -> Row:
    """Chat pairs without a prompt column hold two whole conversations; the prompt is the messages
    they open with in common, the rest of each is its response."""
    if not is_messages(chosen) or not is_messages(rejected):
        raise ValueError(MALFORMED_MESSAGES)
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
        with contextlib.suppress(ValueError):
            number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"'{key}' is not a finite number")
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
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        pair = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
    elif isinstance(chosen, list) or isinstance(rejected, list):
        pair = split_chat(chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        pair = split_hh_dialogue(chosen, rejected)
    else:
        raise TypeError("'chosen' and 'rejected' must be strings or chat messages")
    return {**pair, **_judgement(row)}


def _list(row: Row, key: str) -> list:
    value = row[key]
    if not isinstance(value, list):
        raise TypeError(f"'{key}' must be a list")
    return value


def _ranked(row: Row) -> Row:
    """{prompt, responses, ranks}: a lower rank is better, equal ranks are unordered."""
    return {"prompt": row["prompt"], "responses": row["responses"], "ranks": row["ranks"]}


def _ranked_outputs(row: Row) -> Row:
    """{prompt, ranked_outputs: [best, ..., worst]}."""
    outputs = _list(row, "ranked_outputs")
    return {"prompt": row["prompt"], "responses": outputs, "ranks": list(range(len(outputs)))}


def _oasst(row: Row) -> Row:
    """OpenAssistant ranked siblings: the conversation so far, then each ranked reply as an assistant turn."""
    prompt = [{"role": OASST_ROLES.get(m["role"]), "content": m["text"]} for m in _list(row, "conversation")]
    replies = _list(row, "ranked_responses")
    ranks = row["ranks"] if "ranks" in row else list(range(len(replies)))
    return {"prompt": prompt, "responses": [[{"role": "assistant", "content": reply}] for reply in replies],
            "ranks": ranks}


def _token_ids(row: Row, side: str) -> list[int]:
    """`input_ids_<side>` where `attention_mask_<side>` (optional) is 1."""
    ids = row[f"input_ids_{side}"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("input ids are not lists of integers")
    mask = row.get(f"attention_mask_{side}")
    if mask is None:
        return ids
    if not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
        raise ValueError("attention mask is not one 0/1 per input id")
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
    return {"prompt": _human_assistant(row["prompt"]), "chosen": " " + row["chosen"],
            "rejected": " " + row["rejected"]}


def _yitingxie(row: Row) -> Row:
    return {"prompt": row["prompt"] + "Assistant:",
            "chosen": row["chosen"].split("Assistant:")[-1],
            "rejected": row["rejected"].split("Assistant:")[-1]}


def _strip_citations(text: str) -> str:
    return re.sub(r"[\(\[].*?[\)\]]", "", re.sub(r" [\(\[].*?[\)\]]", "", text))


def _webgpt(row: Row) -> Row:
    answers = [_strip_citations(row["answer_0"]), _strip_citations(row["answer_1"])]
    score_0, score_1 = row["score_0"], row["score_1"]
    best = 0 if score_0 >= score_1 else 1
    return {"prompt": _human_assistant(row["question"]["full_text"]), "chosen": " " + answers[best],
            "rejected": " " + answers[1 - best], "tie": score_0 == score_1}


def _shp(row: Row) -> Row:
    a, b = row["human_ref_A"], row["human_ref_B"]
    chosen, rejected = (a, b) if row["labels"] == 1 else (b, a)
    return {"prompt": _human_assistant(row["history"]), "chosen": " " + chosen,
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


def _read_json_lines(path: str, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid in JSON
        if line.strip():
            try:
                yield f"{path}:line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {number}: not valid JSON ({err.msg})") from None


def _read_file(path: str) -> list[tuple[str, Any]]:
    """Rows of one local file, each tagged with `file:line` (or `file:row`) for error messages."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]
    opener = gzip.open if lower.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            if lower.endswith(".csv"):
                return [(f"{path}:line {i + 2}", row) for i, row in enumerate(csv.DictReader(handle))]
            text = handle.read()
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    if lower.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        return [(f"{path}:item {i + 1}", row) for i, row in enumerate(rows)]
    return list(_read_json_lines(path, text))


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
