"""Where preference rows come from, and how one raw row becomes {prompt, chosen, rejected}.

A source is data, not a class: `SOURCES` maps a dataset id to a row adapter and its split names.
Adding a data set is adding one entry. Anything not in the table is read as a local file or
folder, or (for `org/name` ids) as a hub data set with `prompt/chosen/rejected` or HH-style
`chosen/rejected` columns.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from utils.errors import UserError, first_line

Row = dict[str, Any]
Adapter = Callable[[Row], Row]
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


def _columns(row: Row) -> Row:
    """prompt/chosen/rejected columns, or chosen/rejected whole dialogues (HH format)."""
    if "prompt" in row:
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise TypeError("'chosen' and 'rejected' must be strings")
    return split_hh_dialogue(chosen, rejected)


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
