"""Where preference rows come from: each `--data_path` entry -> its raw rows and the adapter that reads them.

An entry is a known hub id (`utils.data.adapters.SOURCES`), `local/jsonfile`, a local file, a folder of
`train.*` and `eval.*` files or a `datasets.save_to_disk` folder, or any other hub id `org/name`. Everything
but the known ids is read by `utils.data.adapters.columns`, which tells the layouts apart by their keys.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from rlhf_reward.utils.data.adapters import SOURCES, Adapter, Source, columns
from rlhf_reward.utils.data.readers import LOCAL_EXTENSIONS, read_file
from rlhf_reward.utils.errors import UserError, first_line

EVAL_SPLIT_NAMES = ("eval", "test", "validation", "valid")


@dataclass
class RawSplits:
    """One source's raw rows: each split is a list of (where, row); `where` names file and line."""

    name: str
    adapter: Adapter
    train: list[tuple[str, Any]]
    eval: list[tuple[str, Any]] | None


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
        return RawSplits(folder, columns, _from_hf_dataset(folder, loaded), None)
    eval_name = next((s for s in EVAL_SPLIT_NAMES if s in loaded), None)
    if "train" not in loaded:
        raise UserError(f"{folder}: saved data set has no 'train' split (has: {', '.join(loaded)})")
    eval_rows = _from_hf_dataset(f"{folder}[{eval_name}]", loaded[eval_name]) if eval_name else None
    return RawSplits(folder, columns, _from_hf_dataset(f"{folder}[train]", loaded["train"]), eval_rows)


def _load_local(path: str) -> RawSplits:
    if os.path.isfile(path):
        if not path.lower().endswith(LOCAL_EXTENSIONS):
            raise UserError(f"{path}: unsupported file type (use one of {', '.join(LOCAL_EXTENSIONS)})")
        return RawSplits(path, columns, read_file(path), None)
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")):
        return _load_saved_dataset(path)
    files = _split_files(path)
    if "train" not in files:
        raise UserError(f"{path}: folder has no train.{{jsonl,json,parquet,csv}} file and is not "
                        "a datasets.save_to_disk folder")
    eval_rows = read_file(files["eval"]) if "eval" in files else None
    return RawSplits(path, columns, read_file(files["train"]), eval_rows)


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
        return _load_hub(path, Source(columns))
    known = ", ".join(sorted(SOURCES))
    raise UserError(f"--data_path '{path}': no such file or folder, and not a known data set "
                    f"(known: {known}, local/jsonfile, or any hub id org/name)")
