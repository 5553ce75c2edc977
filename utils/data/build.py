"""The data pipeline end to end: sources -> clean -> phase split -> tokenise -> cached datasets.

Local rank 0 of each node builds and caches the tokenised sets under `--data_output_path`; the
other ranks wait and read the cache. The cache key covers everything that changes the result
(sources and their file stamps, split, seed, phase, length, end token, tokenizer), so a changed
input rebuilds instead of silently reusing stale data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

import torch.distributed as dist

from utils.data.collate import PairDataset
from utils.data.examples import Example, clean_source
from utils.data.sources import load_source, local_path
from utils.data.split import parse_split, phase_indices, shuffle_order
from utils.data.tokenize import TokenizedExamples, load_tokenized, save_tokenized, tokenize_examples
from utils.errors import UserError

CACHE_FORMAT = 1


def _file_stamps(path: str) -> list:
    """Size and mtime of every file under a local path (nothing for hub ids)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    else:
        return []
    return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}{len(tokenizer)}{text}".encode()).hexdigest()


def cache_key(data_paths: list[str], data_split: str, phase: int, seed: int, max_seq_len: int,
              end_of_conversation_token: str, tokenizer, repo_root: str) -> str:
    stamps = [_file_stamps(local_path(p, repo_root)) for p in data_paths]
    spec = {"format": CACHE_FORMAT, "paths": data_paths, "stamps": stamps,
            "split": data_split, "phase": phase, "seed": seed, "max_seq_len": max_seq_len,
            "eot": end_of_conversation_token, "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _select(rows: list, indices: list[int]) -> list:
    return [rows[i] for i in indices]


def load_examples(data_paths: list[str], data_split: str, phase: int, seed: int, cache_dir: str,
                  repo_root: str, log: Callable[[str], None]) -> tuple[list[Example], list[Example]]:
    """Train and eval examples of this phase from every source, concatenated and shuffled."""
    parse_split(data_split)
    train: list[Example] = []
    evaluation: list[Example] = []
    for path in data_paths:
        raw = load_source(path, repo_root)
        key = re.sub(r"[^\w.-]+", "_", raw.name).strip("_")
        train_rows, eval_rows = raw.train, raw.eval
        if eval_rows is None:  # one split only: hold out a tenth for evaluation
            halves = [phase_indices(len(train_rows), "9,1,0", i, seed, cache_dir, f"{key}_train_eval") for i in (0, 1)]
            train_rows, eval_rows = _select(train_rows, halves[0]), _select(train_rows, halves[1])
        for split, rows, sink in (("train", train_rows, train), ("eval", eval_rows, evaluation)):
            picked = _select(rows, phase_indices(len(rows), data_split, phase - 1, seed, cache_dir, f"{key}_{split}"))
            if not picked:
                raise UserError(f"{raw.name}: --data_split {data_split} leaves no {split} rows for "
                                f"phase {phase} ({len(rows)} rows in the split)")
            examples, summary = clean_source(raw, split, picked)
            log(f"data: {summary}")
            sink.extend(examples)
    if len(data_paths) > 1:
        train = _select(train, shuffle_order(len(train), seed))
        evaluation = _select(evaluation, shuffle_order(len(evaluation), seed))
    return train, evaluation


def _tokenize_split(examples: list[Example], split: str, tokenizer, max_seq_len: int, eot: str,
                    log: Callable[[str], None]) -> TokenizedExamples:
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len, eot)
    log(f"data: {split}: {len(tokenized)} pairs tokenised, {tokenized.truncated} with the prompt "
        f"cut from the left, {tokenized.too_long} dropped (a response longer than --max_seq_len {max_seq_len})")
    if not len(tokenized):
        raise UserError(f"--max_seq_len {max_seq_len} is too small: not one {split} pair fits "
                        "(every pair has a response longer than that)")
    return tokenized


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def create_reward_datasets(data_paths: list[str], data_split: str, data_output_path: str, seed: int,
                           tokenizer, max_seq_len: int, end_of_conversation_token: str,
                           repo_root: str, local_rank: int = 0, phase: int = 2,
                           log: Callable[[str], None] = print) -> tuple[PairDataset, PairDataset]:
    """Train and eval sets for `phase` (2: reward model), built once per node and cached."""
    key = cache_key(data_paths, data_split, phase, seed, max_seq_len, end_of_conversation_token, tokenizer,
                    repo_root)
    paths = {split: os.path.join(data_output_path, f"reward_{split}_{key}.npz") for split in ("train", "eval")}
    if local_rank <= 0 and not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(data_output_path, exist_ok=True)
        train, evaluation = load_examples(data_paths, data_split, phase, seed, data_output_path, repo_root, log)
        for split, examples in (("train", train), ("eval", evaluation)):
            save_tokenized(_tokenize_split(examples, split, tokenizer, max_seq_len,
                                           end_of_conversation_token, log), paths[split])
    _barrier()
    return PairDataset(load_tokenized(paths["train"])), PairDataset(load_tokenized(paths["eval"]))
