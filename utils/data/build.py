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
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from utils.data.attributes import attribute_names, group_by_prompt, judge_rated_rows
from utils.data.chat import is_conversation, own_template
from utils.data.collate import PairDataset
from utils.data.examples import (
    Example,
    Outcome,
    describe_drops,
    drop_leaks,
    judge_rows,
    origin,
    row_problem,
    summarise,
    tally,
)
from utils.data.sources import RawSplits, load_source, local_path
from utils.data.split import parse_split, phase_indices, shuffle_order
from utils.data.steps import StepDataset, StepExample, judge_step_rows, load_steps, save_steps, tokenize_steps
from utils.data.tokenize import TokenizedExamples, load_tokenized, save_tokenized, tokenize_examples
from utils.errors import UserError
from utils.runtime import barrier

# 6: prompt and answer tokenised as one text; conversations read through the scoring template, nothing appended
CACHE_FORMAT = 6


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


def cache_key(data_paths: list[str], repo_root: str, tokenizer, spec: dict) -> str:
    """The name of the sets `tokenizer` makes of `data_paths`: a hash of the sources (their files' sizes and
    mtimes too), the tokenizer, the cache format and `spec`, everything else that changes the result."""
    stamps = [_file_stamps(local_path(p, repo_root)) for p in data_paths]
    keyed = {"format": CACHE_FORMAT, "paths": data_paths, "stamps": stamps,
             "tokenizer": tokenizer_fingerprint(tokenizer), **spec}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DataOptions:
    """How examples are chosen and labelled beyond the split (all part of the cache key)."""

    data_weights: tuple[float, ...] | None = None  # per source: its share of the training examples
    margin_source: str = "column"  # column: a `margin` column; scores: score_chosen - score_rejected; none
    max_responses: int = 0  # > 0: keep this many of a prompt's ranked responses (best, worst, evenly between)
    chat_template: str | None = None  # Jinja text used instead of the tokenizer's own
    bad_rows: str = "error"  # malformed rows: error (stop at the first) or skip (drop and count); see BAD_ROWS


MARGIN_SOURCES = ("column", "scores", "none")


def apply_margin(example: Example, margin_source: str) -> Example:
    """The margin the loss uses: from the margin column, from the score columns, or none."""
    margin = {"column": example.get("margin", 0.0), "scores": example.get("score_margin", 0.0),
              "none": 0.0}[margin_source]
    return {**example, "margin": float(margin)}


def limit_responses(example: Example, limit: int) -> Example:
    """At most `limit` responses: the best, the worst and evenly spaced ones between (a memory bound
    for long ranked lists; every kept pair keeps its order)."""
    count = len(example["responses"])
    if limit <= 0 or count <= limit or "token_ids" in example:
        return example
    keep = sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})
    return {**example, "responses": [example["responses"][i] for i in keep],
            "ranks": [example["ranks"][i] for i in keep]}


def weigh_sources(per_source: list[list[Example]], weights: tuple[float, ...],
                  seed: int) -> tuple[list[Example], list[int]]:
    """Resample each source's training examples to its share of the total (with replacement only
    where a source must grow), seeded so every rank builds the same set."""
    total = sum(len(examples) for examples in per_source)
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    counts = [round(total * weight / sum(weights)) for weight in weights]
    for examples, target in zip(per_source, counts, strict=True):
        picked = rng.choice(len(examples), size=target, replace=target > len(examples))
        out.extend(examples[i] for i in picked)
    return out, counts


def _select(rows: list, indices: list[int]) -> list:
    return [rows[i] for i in indices]


def _phase_positions(raw: RawSplits, data_split: str, phase: int, seed: int, cache_dir: str) -> dict[str, list[int]]:
    """Positions in `raw.train + raw.eval` of this phase's train and eval rows (a tenth of train is held out
    when the source has one split)."""
    key = re.sub(r"[^\w.-]+", "_", raw.name).strip("_")
    size = len(raw.train)
    if raw.eval is None:
        parts = [phase_indices(size, "9,1,0", i, seed, cache_dir, f"{key}_train_eval") for i in (0, 1)]
    else:
        parts = [list(range(size)), list(range(size, size + len(raw.eval)))]
    picked = {}
    for split, positions in zip(("train", "eval"), parts, strict=True):
        indices = phase_indices(len(positions), data_split, phase - 1, seed, cache_dir, f"{key}_{split}")
        picked[split] = _select(positions, indices)
        if not picked[split]:
            raise UserError(f"{raw.name}: --data_split {data_split} leaves no {split} rows for "
                            f"phase {phase} ({len(positions)} rows in the split)")
    return picked


def _phase_outcomes(raw: RawSplits, judge: Callable[[list], list[Outcome]], data_split: str, phase: int, seed: int,
                    cache_dir: str) -> dict[str, tuple[list, list[Outcome]]]:
    """This phase's train and eval rows of one source, with their outcomes. Every row of the source is
    judged, whichever phase it belongs to, so error mode reports a broken line anywhere in the file.
    An eval example that repeats one of this phase's training examples is dropped."""
    positions = _phase_positions(raw, data_split, phase, seed, cache_dir)
    rows = raw.train + (raw.eval or [])
    outcomes = judge(rows)
    picked = {split: (_select(rows, chosen), _select(outcomes, chosen)) for split, chosen in positions.items()}
    eval_rows, eval_outcomes = picked["eval"]
    picked["eval"] = eval_rows, drop_leaks(picked["train"][1], eval_outcomes)
    return picked


def load_examples(data_paths: list[str], data_split: str, phase: int, seed: int, cache_dir: str,
                  repo_root: str, log: Callable[[str], None],
                  options: DataOptions | None = None) -> tuple[list[Example], list[Example]]:
    """Train and eval examples of this phase from every source, concatenated and shuffled."""
    options = options or DataOptions()
    parse_split(data_split)
    weights = options.data_weights
    if weights is not None and (len(weights) != len(data_paths) or min(weights) < 0 or not sum(weights)):
        raise UserError(f"--data_weights needs one non-negative weight per --data_path ({len(data_paths)}), "
                        f"not all zero; got {' '.join(map(str, weights))}")
    per_source: list[list[Example]] = []
    evaluation: list[Example] = []
    for path in data_paths:
        raw = load_source(path, repo_root)
        judge = partial(judge_rows, problem=row_problem(raw.adapter, raw.name), bad_rows=options.bad_rows)
        for split, (rows, outcomes) in _phase_outcomes(raw, judge, data_split, phase, seed, cache_dir).items():
            examples, summary = summarise(raw, split, rows, outcomes)
            log(f"data: {summary}")
            examples = [limit_responses(apply_margin(ex, options.margin_source), options.max_responses)
                        for ex in examples]
            if split == "train":
                per_source.append(examples)
            else:
                evaluation.extend(examples)
    if weights is not None:
        train, counts = weigh_sources(per_source, weights, seed)
        log("data: train examples per source after --data_weights: "
            + ", ".join(f"{path} {count}" for path, count in zip(data_paths, counts, strict=True)))
    else:
        train = [example for examples in per_source for example in examples]
    if len(data_paths) > 1:
        train = _select(train, shuffle_order(len(train), seed))
        evaluation = _select(evaluation, shuffle_order(len(evaluation), seed))
    return train, evaluation


def _tokenize_split(examples: list[Example], split: str, tokenizer, max_seq_len: int, eot: str,
                    log: Callable[[str], None], options: DataOptions) -> TokenizedExamples:
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len, eot, options.chat_template, options.bad_rows)
    bad_ids = f", {tokenized.bad_ids} dropped (token ids outside the tokenizer's range)" if tokenized.bad_ids else ""
    log(f"data: {split}: {len(tokenized)} examples tokenised, {tokenized.truncated} with the prompt "
        f"cut from the left, {tokenized.too_long} dropped (a response longer than --max_seq_len {max_seq_len}), "
        f"{tokenized.responses_dropped} over-long responses left out of ranked lists{bad_ids}")
    if not len(tokenized):
        sources = _sources(examples)
        if tokenized.bad_ids:
            raise UserError(f"{sources}: no {split} pair left ({tokenized.bad_ids} with token ids outside the "
                            f"tokenizer's range, {tokenized.too_long} longer than --max_seq_len {max_seq_len})")
        raise UserError(f"--max_seq_len {max_seq_len} is too small for {sources}: not one {split} pair fits "
                        "(every pair has a response longer than that)")
    return tokenized


def _sources(examples: list) -> str:
    return ", ".join(dict.fromkeys(example["source"] for example in examples))


def create_reward_datasets(data_paths: list[str], data_split: str, data_output_path: str, seed: int,
                           tokenizer, max_seq_len: int, end_of_conversation_token: str,
                           repo_root: str, local_rank: int = 0, phase: int = 2,
                           log: Callable[[str], None] = print,
                           options: DataOptions | None = None) -> tuple[PairDataset, PairDataset]:
    """Train and eval sets for `phase` (2: reward model), built once per node and cached."""
    options = options or DataOptions()
    key = cache_key(data_paths, repo_root, tokenizer,
                    {"split": data_split, "phase": phase, "seed": seed, "max_seq_len": max_seq_len,
                     "eot": end_of_conversation_token, "options": asdict(options)})
    paths = {split: os.path.join(data_output_path, f"reward_{split}_{key}.npz") for split in ("train", "eval")}
    if local_rank <= 0 and not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(data_output_path, exist_ok=True)
        train, evaluation = load_examples(data_paths, data_split, phase, seed, data_output_path, repo_root, log,
                                          options)
        if (options.chat_template or own_template(tokenizer)) and any(
                not is_conversation(example) and "token_ids" not in example for example in train):
            log("note: the model has a chat template, but some training examples are text: those are read as "
                "[bos] prompt answer <|endoftext|>, while frameworks that render conversations with the template "
                "(TRL, verl) score other text; give the data as chat messages to train on what they build")
        for split, examples in (("train", train), ("eval", evaluation)):
            save_tokenized(_tokenize_split(examples, split, tokenizer, max_seq_len, end_of_conversation_token,
                                           log, options), paths[split])
    barrier()
    return PairDataset(load_tokenized(paths["train"])), PairDataset(load_tokenized(paths["eval"]))


def create_step_datasets(data_paths: list[str], data_split: str, data_output_path: str, seed: int, tokenizer,
                         max_seq_len: int, separator: str, neutral: str, last_step_only: bool, repo_root: str,
                         local_rank: int = 0, phase: int = 2, log: Callable[[str], None] = print,
                         bad_rows: str = "error") -> tuple[StepDataset, StepDataset]:
    """Train and eval sets of step-labelled solutions for a process reward model, split and cached
    like the preference sets, with the same `bad_rows` policy."""
    key = cache_key(data_paths, repo_root, tokenizer,
                    {"split": data_split, "phase": phase, "seed": seed, "max_seq_len": max_seq_len,
                     "separator": separator, "neutral": neutral, "last_step_only": last_step_only,
                     "bad_rows": bad_rows})
    paths = {split: os.path.join(data_output_path, f"steps_{split}_{key}.npz") for split in ("train", "eval")}
    if local_rank <= 0 and not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(data_output_path, exist_ok=True)
        examples: dict[str, list[StepExample]] = _judged(
            data_paths, lambda raw: partial(judge_step_rows, source=raw.name, neutral=neutral, bad_rows=bad_rows),
            data_split, phase, seed, data_output_path, repo_root, log, "step-labelled solutions",
            "prompt, steps or completions, labels")
        for split, items in examples.items():
            tokenized = tokenize_steps(items, tokenizer, max_seq_len, separator, last_step_only)
            log(f"data: {split}: {len(tokenized)} solutions tokenised, {tokenized.truncated} shortened, "
                f"{tokenized.too_long} dropped (no labelled step fits in --max_seq_len {max_seq_len})")
            if not len(tokenized):
                raise UserError(f"--max_seq_len {max_seq_len} is too small for {_sources(items)}: no {split} "
                                "solution keeps a labelled step")
            save_steps(tokenized, paths[split])
    barrier()
    return StepDataset(load_steps(paths["train"])), StepDataset(load_steps(paths["eval"]))


def create_attribute_datasets(data_paths: list[str], data_split: str, data_output_path: str, seed: int, tokenizer,
                              max_seq_len: int, end_of_conversation_token: str, repo_root: str,
                              attributes: list[str] | None = None, local_rank: int = 0, phase: int = 2,
                              log: Callable[[str], None] = print,
                              options: DataOptions | None = None) -> tuple[TokenizedExamples, TokenizedExamples]:
    """Train and eval sets of attribute-rated responses (`utils/data/attributes.py`), one example per
    prompt, split, cleaned, counted and cached like the preference sets. The attribute names (the
    data's, or `attributes` in that order) are saved with both sets."""
    options = options or DataOptions()
    key = cache_key(data_paths, repo_root, tokenizer,
                    {"split": data_split, "phase": phase, "seed": seed, "max_seq_len": max_seq_len,
                     "eot": end_of_conversation_token, "attributes": attributes,
                     "chat_template": options.chat_template, "bad_rows": options.bad_rows})
    paths = {split: os.path.join(data_output_path, f"attributes_{split}_{key}.npz") for split in ("train", "eval")}
    if local_rank <= 0 and not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(data_output_path, exist_ok=True)
        rated = load_rated(data_paths, data_split, phase, seed, data_output_path, repo_root, log, options.bad_rows)
        names = attribute_names(rated["train"], attributes)
        log(f"data: attributes {', '.join(names)}")
        for split, examples in rated.items():
            grouped, dropped = group_by_prompt(examples, names)
            if dropped:
                log(f"data: {split}: {describe_drops(dropped)} (responses)")
            if not grouped:
                raise UserError(f"{_sources(examples)}: no {split} response rates any of {', '.join(names)}")
            tokenized = _tokenize_split(grouped, split, tokenizer, max_seq_len, end_of_conversation_token, log,
                                        options)
            tokenized.attribute_names = names
            save_tokenized(tokenized, paths[split])
    barrier()
    return load_tokenized(paths["train"]), load_tokenized(paths["eval"])


def load_rated(data_paths: list[str], data_split: str, phase: int, seed: int, cache_dir: str, repo_root: str,
               log: Callable[[str], None], bad_rows: str = "error") -> dict[str, list[dict]]:
    """This phase's train and eval rows of attribute-rated responses from every source."""
    parse_split(data_split)
    return _judged(data_paths, lambda raw: partial(judge_rated_rows, source=raw.name, bad_rows=bad_rows), data_split,
                   phase, seed, cache_dir, repo_root, log, "rated responses",
                   "prompt, response and attributes, HelpSteer's columns or UltraFeedback's completions",
                   lambda examples: sum(len(example["responses"]) for example in examples))


def _judged(data_paths: list[str], judge_of: Callable[[RawSplits], Callable[[list], list[Outcome]]],
            data_split: str, phase: int, seed: int, cache_dir: str, repo_root: str, log: Callable[[str], None],
            what: str, expected: str, count: Callable[[list], int] = len) -> dict[str, list]:
    """This phase's clean train and eval examples of every source, judged by `judge_of(source)`, with
    each split's summary logged; a split with none is an error that says what was `expected`."""
    examples: dict[str, list] = {"train": [], "eval": []}
    for path in data_paths:
        raw = load_source(path, repo_root)
        for split, (rows, outcomes) in _phase_outcomes(raw, judge_of(raw), data_split, phase, seed,
                                                       cache_dir).items():
            cleaned, dropped = tally(outcomes)
            log(f"data: {raw.name} [{split}]: {len(rows)} rows -> {count(cleaned)} {what} "
                f"(dropped: {describe_drops(dropped)})")
            if not cleaned:
                raise UserError(f"{origin(rows) if rows else raw.name}: no usable {what} in the {split} split "
                                f"(expected {expected}; dropped: {describe_drops(dropped)})")
            examples[split].extend(cleaned)
    return examples
