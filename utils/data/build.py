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
from typing import TypeVar

import numpy as np
from rlhf_reward.utils.data.attributes import attribute_names, group_by_prompt, judge_rated_rows
from rlhf_reward.utils.data.chat import is_conversation, own_template
from rlhf_reward.utils.data.collate import PairDataset
from rlhf_reward.utils.data.examples import (
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
from rlhf_reward.utils.data.sources import RawSplits, load_source, local_path
from rlhf_reward.utils.data.split import parse_split, phase_indices, shuffle_order
from rlhf_reward.utils.data.steps import (
    StepDataset,
    StepExample,
    TokenizedSteps,
    judge_step_rows,
    load_steps,
    save_steps,
    tokenize_steps,
)
from rlhf_reward.utils.data.tokenize import TokenizedExamples, load_tokenized, save_tokenized, tokenize_examples
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.runtime import barrier

SPLITS = ("train", "eval")
Built = TypeVar("Built")  # what a cache build makes of one split
Loaded = TypeVar("Loaded")  # what a rank reads back from the cache

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
class DataSource:
    """Which rows a run reads and how they are split, shared by every objective and by scoring, so
    that all of them see the same examples."""

    paths: tuple[str, ...]  # --data_path: local files or folders, saved data sets, hub ids
    split: str  # --data_split: the phases' shares of every source, e.g. "2,4,4"
    seed: int  # of the split and of every shuffle, so that all ranks pick the same rows
    cache_dir: str  # --data_output_path: the split's indices and the tokenised sets are cached here
    repo_root: str  # relative local paths are read from here
    phase: int = 2  # the split's part to read (2: reward model)
    bad_rows: str = "error"  # malformed rows: error (stop at the first) or skip (drop and count); see BAD_ROWS
    log: Callable[[str], None] = print  # where each source's summary and the drops go


@dataclass(frozen=True)
class DataOptions:
    """How preference examples are chosen and labelled beyond the split (all part of the cache key)."""

    data_weights: tuple[float, ...] | None = None  # per source: its share of the training examples
    margin_source: str = "column"  # column: a `margin` column; scores: score_chosen - score_rejected; none
    max_responses: int = 0  # > 0: keep this many of a prompt's ranked responses (best, worst, evenly between)
    chat_template: str | None = None  # Jinja text used instead of the tokenizer's own


@dataclass(frozen=True)
class StepOptions:
    """How step-labelled solutions are read and scored (`utils/data/steps.py`)."""

    separator: str = "\n\n"  # ends the prompt and every step; a step is scored at its last token
    neutral: str = "positive"  # what a 0 label means: positive, negative or ignore (unlabelled)
    last_step_only: bool = False  # keep the last labelled step's label alone (outcome supervision)


@dataclass(frozen=True)
class AttributeOptions:
    """Which attributes are trained and how the rated responses are rendered."""

    names: tuple[str, ...] | None = None  # --attributes, in this order; None: every attribute the data rates
    chat_template: str | None = None  # Jinja text used instead of the tokenizer's own


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


def _phase_positions(raw: RawSplits, source: DataSource) -> dict[str, list[int]]:
    """Positions in `raw.train + raw.eval` of this phase's train and eval rows (a tenth of train is held out
    when the source has one split)."""
    key = re.sub(r"[^\w.-]+", "_", raw.name).strip("_")
    size = len(raw.train)
    if raw.eval is None:
        parts = [phase_indices(size, "9,1,0", i, source.seed, source.cache_dir, f"{key}_train_eval") for i in (0, 1)]
    else:
        parts = [list(range(size)), list(range(size, size + len(raw.eval)))]
    picked = {}
    for split, positions in zip(SPLITS, parts, strict=True):
        indices = phase_indices(len(positions), source.split, source.phase - 1, source.seed, source.cache_dir,
                                f"{key}_{split}")
        picked[split] = _select(positions, indices)
        if not picked[split]:
            raise UserError(f"{raw.name}: --data_split {source.split} leaves no {split} rows for "
                            f"phase {source.phase} ({len(positions)} rows in the split)")
    return picked


def _phase_outcomes(raw: RawSplits, judge: Callable[[list], list[Outcome]],
                    source: DataSource) -> dict[str, tuple[list, list[Outcome]]]:
    """This phase's train and eval rows of one source, with their outcomes. Every row of the source is
    judged, whichever phase it belongs to, so error mode reports a broken line anywhere in the file.
    An eval example that repeats one of this phase's training examples is dropped."""
    positions = _phase_positions(raw, source)
    rows = raw.train + (raw.eval or [])
    outcomes = judge(rows)
    picked = {split: (_select(rows, chosen), _select(outcomes, chosen)) for split, chosen in positions.items()}
    eval_rows, eval_outcomes = picked["eval"]
    picked["eval"] = eval_rows, drop_leaks(picked["train"][1], eval_outcomes)
    return picked


def load_examples(source: DataSource, options: DataOptions | None = None) -> tuple[list[Example], list[Example]]:
    """Train and eval examples of this phase from every source, concatenated and shuffled."""
    options = options or DataOptions()
    parse_split(source.split)
    weights = options.data_weights
    if weights is not None and (len(weights) != len(source.paths) or min(weights) < 0 or not sum(weights)):
        raise UserError(f"--data_weights needs one non-negative weight per --data_path ({len(source.paths)}), "
                        f"not all zero; got {' '.join(map(str, weights))}")
    per_source: list[list[Example]] = []
    evaluation: list[Example] = []
    for path in source.paths:
        raw = load_source(path, source.repo_root)
        judge = partial(judge_rows, problem=row_problem(raw.adapter, raw.name), bad_rows=source.bad_rows)
        for split, (rows, outcomes) in _phase_outcomes(raw, judge, source).items():
            examples, summary = summarise(raw, split, rows, outcomes)
            source.log(f"data: {summary}")
            examples = [limit_responses(apply_margin(ex, options.margin_source), options.max_responses)
                        for ex in examples]
            if split == "train":
                per_source.append(examples)
            else:
                evaluation.extend(examples)
    if weights is not None:
        train, counts = weigh_sources(per_source, weights, source.seed)
        source.log("data: train examples per source after --data_weights: "
                   + ", ".join(f"{path} {count}" for path, count in zip(source.paths, counts, strict=True)))
    else:
        train = [example for examples in per_source for example in examples]
    if len(source.paths) > 1:
        train = _select(train, shuffle_order(len(train), source.seed))
        evaluation = _select(evaluation, shuffle_order(len(evaluation), source.seed))
    return train, evaluation


def _tokenize_split(examples: list[Example], split: str, tokenizer, max_seq_len: int, eot: str,
                    chat_template: str | None, source: DataSource) -> TokenizedExamples:
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len, eot, chat_template, source.bad_rows)
    bad_ids = f", {tokenized.bad_ids} dropped (token ids outside the tokenizer's range)" if tokenized.bad_ids else ""
    source.log(f"data: {split}: {len(tokenized)} examples tokenised, {tokenized.truncated} with the prompt "
               f"cut from the left, {tokenized.too_long} dropped (a response longer than --max_seq_len "
               f"{max_seq_len}), {tokenized.responses_dropped} over-long responses left out of ranked lists{bad_ids}")
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


def _cache_paths(kind: str, source: DataSource, tokenizer, spec: dict) -> dict[str, str]:
    """Where the train and eval sets of `kind` made of `source` are cached, named by their cache key
    (`spec`: what else changes them)."""
    key = cache_key(list(source.paths), source.repo_root, tokenizer,
                    {"split": source.split, "phase": source.phase, "seed": source.seed, "bad_rows": source.bad_rows,
                     **spec})
    return {split: os.path.join(source.cache_dir, f"{kind}_{split}_{key}.npz") for split in SPLITS}


def _build_once(paths: dict[str, str], local_rank: int, build: Callable[[], dict[str, Built]],
                save: Callable[[Built, str], None], load: Callable[[str], Loaded]) -> tuple[Loaded, Loaded]:
    """The train and eval sets cached at `paths`. Where the cache lacks either, local rank 0 of the node
    alone builds and saves both while the other ranks wait at the barrier, and only then does every
    rank read them: ranks writing the same files would race, and one reading early would find them
    missing or half written."""
    if local_rank <= 0 and not all(os.path.isfile(path) for path in paths.values()):
        os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
        for split, built in build().items():
            save(built, paths[split])
    barrier()
    return load(paths["train"]), load(paths["eval"])


def create_reward_datasets(source: DataSource, tokenizer, max_seq_len: int, end_of_conversation_token: str,
                           local_rank: int = 0,
                           options: DataOptions | None = None) -> tuple[PairDataset, PairDataset]:
    """Train and eval sets of preference pairs and ranked lists, built once per node and cached."""
    options = options or DataOptions()

    def build() -> dict[str, TokenizedExamples]:
        train, evaluation = load_examples(source, options)
        if (options.chat_template or own_template(tokenizer)) and any(
                not is_conversation(example) and "token_ids" not in example for example in train):
            source.log("note: the model has a chat template, but some training examples are text: those are read "
                       "as [bos] prompt answer <|endoftext|>, while frameworks that render conversations with the "
                       "template (TRL, verl) score other text; give the data as chat messages to train on what "
                       "they build")
        return {split: _tokenize_split(examples, split, tokenizer, max_seq_len, end_of_conversation_token,
                                       options.chat_template, source)
                for split, examples in zip(SPLITS, (train, evaluation), strict=True)}

    paths = _cache_paths("reward", source, tokenizer, {"max_seq_len": max_seq_len, "eot": end_of_conversation_token,
                                                       "options": asdict(options)})
    return _build_once(paths, local_rank, build, save_tokenized, lambda path: PairDataset(load_tokenized(path)))


def create_step_datasets(source: DataSource, tokenizer, max_seq_len: int, options: StepOptions | None = None,
                         local_rank: int = 0) -> tuple[StepDataset, StepDataset]:
    """Train and eval sets of step-labelled solutions for a process reward model, split and cached
    like the preference sets, with the same `bad_rows` policy."""
    options = options or StepOptions()

    def build() -> dict[str, TokenizedSteps]:
        examples: dict[str, list[StepExample]] = _judged(
            source, lambda raw: partial(judge_step_rows, source=raw.name, neutral=options.neutral,
                                        bad_rows=source.bad_rows),
            "step-labelled solutions", "prompt, steps or completions, labels")
        built = {}
        for split, items in examples.items():
            tokenized = tokenize_steps(items, tokenizer, max_seq_len, options.separator, options.last_step_only)
            source.log(f"data: {split}: {len(tokenized)} solutions tokenised, {tokenized.truncated} shortened, "
                       f"{tokenized.too_long} dropped (no labelled step fits in --max_seq_len {max_seq_len})")
            if not len(tokenized):
                raise UserError(f"--max_seq_len {max_seq_len} is too small for {_sources(items)}: no {split} "
                                "solution keeps a labelled step")
            built[split] = tokenized
        return built

    paths = _cache_paths("steps", source, tokenizer, {"max_seq_len": max_seq_len, **asdict(options)})
    return _build_once(paths, local_rank, build, save_steps, lambda path: StepDataset(load_steps(path)))


def create_attribute_datasets(source: DataSource, tokenizer, max_seq_len: int, end_of_conversation_token: str,
                              options: AttributeOptions | None = None,
                              local_rank: int = 0) -> tuple[TokenizedExamples, TokenizedExamples]:
    """Train and eval sets of attribute-rated responses (`utils/data/attributes.py`), one example per
    prompt, split, cleaned, counted and cached like the preference sets. The attribute names (the
    data's, or `options.names` in that order) are saved with both sets."""
    options = options or AttributeOptions()

    def build() -> dict[str, TokenizedExamples]:
        rated = load_rated(source)
        names = attribute_names(rated["train"], options.names)
        source.log(f"data: attributes {', '.join(names)}")
        built = {}
        for split, examples in rated.items():
            grouped, dropped = group_by_prompt(examples, names)
            if dropped:
                source.log(f"data: {split}: {describe_drops(dropped)} (responses)")
            if not grouped:
                raise UserError(f"{_sources(examples)}: no {split} response rates any of {', '.join(names)}")
            built[split] = _tokenize_split(grouped, split, tokenizer, max_seq_len, end_of_conversation_token,
                                           options.chat_template, source)
            built[split].attribute_names = names
        return built

    paths = _cache_paths("attributes", source, tokenizer,
                         {"max_seq_len": max_seq_len, "eot": end_of_conversation_token, "attributes": options.names,
                          "chat_template": options.chat_template})
    return _build_once(paths, local_rank, build, save_tokenized, load_tokenized)


def load_rated(source: DataSource) -> dict[str, list[dict]]:
    """This phase's train and eval rows of attribute-rated responses from every source."""
    parse_split(source.split)
    return _judged(source, lambda raw: partial(judge_rated_rows, source=raw.name, bad_rows=source.bad_rows),
                   "rated responses",
                   "prompt, response and attributes, HelpSteer's columns or UltraFeedback's completions",
                   lambda examples: sum(len(example["responses"]) for example in examples))


def _judged(source: DataSource, judge_of: Callable[[RawSplits], Callable[[list], list[Outcome]]], what: str,
            expected: str, count: Callable[[list], int] = len) -> dict[str, list]:
    """This phase's clean train and eval examples of every source, judged by `judge_of(its raw rows)`, with
    each split's summary logged; a split with none is an error that says what was `expected`."""
    examples: dict[str, list] = {split: [] for split in SPLITS}
    for path in source.paths:
        raw = load_source(path, source.repo_root)
        for split, (rows, outcomes) in _phase_outcomes(raw, judge_of(raw), source).items():
            cleaned, dropped = tally(outcomes)
            source.log(f"data: {raw.name} [{split}]: {len(rows)} rows -> {count(cleaned)} {what} "
                       f"(dropped: {describe_drops(dropped)})")
            if not cleaned:
                raise UserError(f"{origin(rows) if rows else raw.name}: no usable {what} in the {split} split "
                                f"(expected {expected}; dropped: {describe_drops(dropped)})")
            examples[split].extend(cleaned)
    return examples
