"""Hostile data files: each ends in a one-line UserError or a counted skip, never a traceback, a hang or a
silently smaller data set, under both `--bad_rows` policies.

Every case is a `train.<ext>` file beside a clean `eval.jsonl`, built through the trainer's own path
(`create_reward_datasets`, or `create_step_datasets` for step rows) with a tiny tokenizer. `CASES` lists
each case with the outcome expected in each mode, written by hand; `outcome_table()` runs them all and
returns the table as Markdown (case | error mode | skip mode), e.g. for a closing note:

    python -c "import sys; sys.path[:0] = ['.', 'tests']; import test_hostile_data as t; print(t.outcome_table())"

The property tests at the end mix good rows with generated hostile lines and check the invariants: error
mode ends in success (only when no malformed row is present) or a UserError naming the file; skip mode
ends in success with kept + counted == rows in the file, or a UserError when nothing usable is left.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import re
import signal
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rlhf_reward.utils.data import tokenize as tokenize_module
from rlhf_reward.utils.data.adapters import SOURCES
from rlhf_reward.utils.data.build import DataSource, create_reward_datasets, create_step_datasets
from rlhf_reward.utils.data.examples import BAD_ROWS, describe_drops, judge_rows, row_problem, tally
from rlhf_reward.utils.data.tokenize import tokenize_examples
from rlhf_reward.utils.errors import UserError

EOT = "<|endoftext|>"
MAX_SEQ_LEN = 64
# No example database in the working tree; a failure prints its example. The deadline fails a slow example,
# `time_limit` a hung one.
PROPERTY = settings(database=None, deadline=10_000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GOOD = 8  # good rows in every case's train file; the hostile line comes after the first three
TEN_MB = 10_000_000
CLEAN_SUMMARY = re.compile(r"^data: .+ \[(train|eval)\]: (\d+) rows -> (\d+) (?:examples|step-labelled solutions) "
                           r"\(dropped: (.*)\)(?:; (\d+) repeat an earlier example, kept)?$")
TOKENIZED = re.compile(r"^data: (train|eval): (\d+) (?:examples|solutions) tokenised, \d+ (?:with the prompt cut "
                       r"from the left|shortened), (\d+) dropped .*?(?:, (\d+) dropped \(token ids outside the "
                       r"tokenizer's range\))?$")


@pytest.fixture(scope="module")
def tokenizer(tokenizers):
    return tokenizers["gpt2"]


# --------------------------------------------------------------------------------------------
# Building files
# --------------------------------------------------------------------------------------------


def pair(i: int, tag: str = "") -> dict:
    return {"prompt": f"\n\nHuman: {tag}What is {i} plus {i}?\n\nAssistant:", "chosen": f" {i} plus {i} is {2 * i}.",
            "rejected": f" {i} plus {i} is {2 * i + 1}."}


def step_row(i: int) -> dict:
    return {"prompt": f"Add {i} and {i}.", "steps": [f"{i} + {i} = {2 * i}"], "labels": [1]}


def jsonl(rows: list) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def with_line(hostile: bytes, rows: list | None = None) -> bytes:
    """GOOD good rows as JSON lines with `hostile` as line 4."""
    rows = rows or [pair(i) for i in range(GOOD)]
    lines = [json.dumps(row).encode() for row in rows]
    return b"\n".join(lines[:3] + [hostile] + lines[3:]) + b"\n"


def with_row(row: object) -> bytes:
    return with_line(json.dumps(row).encode())


def csv_bytes(records: list[list[str]], header: tuple[str, ...] = ("prompt", "chosen", "rejected")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(records)
    return out.getvalue().encode("utf-8", errors="surrogateescape")


def csv_with(record: list[str]) -> bytes:
    """GOOD good one-line CSV records with `record` as the third, on line 4 (the header is line 1)."""
    good = [[f"What is {i} plus {i}?", f" {2 * i}.", f" {2 * i + 1}."] for i in range(GOOD)]
    return csv_bytes(good[:2] + [record] + good[2:])


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    table = pa.Table.from_pylist(rows) if rows else pa.table({"prompt": pa.array([], pa.string())})
    pq.write_table(table, sink)
    return sink.getvalue()


def truncated_gzip(rows: int, keep: float) -> bytes:
    """`rows` distinct good rows gzipped (level 1, so the data does not fit in one block) and cut to `keep`."""
    data = gzip.compress(jsonl([{**pair(i), "note": os.urandom(24).hex()} for i in range(rows)]), compresslevel=1)
    return data[:int(len(data) * keep)]


def complete_lines(truncated: bytes) -> int:
    """How many whole lines a truncated gzip holds, by inflating what is there."""
    return zlib.decompressobj(wbits=31).decompress(truncated).count(b"\n")


@cache
def ten_mb(spaced: bool) -> str:
    """10 MB of text: words and spaces, or one word."""
    return ("quick brown fox jumps " if spaced else "abcdefghij") * (TEN_MB // (22 if spaced else 10))


# --------------------------------------------------------------------------------------------
# Running a case through the trainer's path, and its outcome as one line
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """What the summary lines say about one split."""

    rows: int = 0
    kept: int = 0
    dropped: Counter | None = None
    repeats: int = 0


def parse_drops(text: str) -> Counter:
    if text == "none":
        return Counter()
    return Counter({reason: int(count) for count, reason in
                    (item.split(" ", 1) for item in re.split(r", (?=\d+ )", text))})


def read_log(lines: list[str]) -> dict[str, Split]:
    """Rows, kept examples and every drop (cleaning's and tokenisation's) per split, from the log lines."""
    splits = {split: Split(dropped=Counter()) for split in ("train", "eval")}
    for line in lines:
        if match := CLEAN_SUMMARY.match(line):
            split = splits[match[1]]
            split.rows, split.dropped = int(match[2]), split.dropped + parse_drops(match[4])
            split.repeats = int(match[5] or 0)
        elif match := TOKENIZED.match(line):
            split = splits[match[1]]
            split.kept = int(match[2])
            split.dropped["too long for --max_seq_len"] += int(match[3])
            split.dropped["token ids outside the tokenizer's range"] += int(match[4] or 0)
    for split in splits.values():
        split.dropped = +split.dropped
    return splits


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail instead of hanging."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build(folder: str, mode: str, tokenizer, steps: bool = False) -> dict[str, Split]:
    """The trainer's data path on `folder`, all rows to this phase; the summaries it logs, read back."""
    lines: list[str] = []
    out = os.path.join(folder, f"out-{mode}")
    with time_limit(60):
        source = DataSource((folder,), "0,1,0", 1234, out, folder, bad_rows=mode, log=lines.append)
        if steps:
            create_step_datasets(source, tokenizer, MAX_SEQ_LEN)
        else:
            create_reward_datasets(source, tokenizer, MAX_SEQ_LEN, EOT)
    return read_log(lines)


def write_folder(folder: str, ext: str, train: bytes, eval_lines: bytes = b"", steps: bool = False) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"train.{ext}"), "wb") as handle:
        handle.write(train)
    clean = [step_row(100 + i) for i in range(3)] if steps else [pair(i, "eval ") for i in range(3)]
    with open(os.path.join(folder, "eval.jsonl"), "wb") as handle:
        handle.write(jsonl(clean) + eval_lines)
    return os.path.join(folder, f"train.{ext}")


def describe_split(name: str, split: Split) -> str:
    repeats = f", {split.repeats} repeating an earlier one" if split.repeats else ""
    return f"{name} {split.kept} of {split.rows} rows kept{repeats} (dropped: {describe_drops(split.dropped)})"


def outcome(folder: str, mode: str, tokenizer, steps: bool = False) -> str:
    """`error: <message>` or the kept/dropped counts of train (and of eval when it drops rows), with
    the folder left out of paths; asserts the counts add up to the rows."""
    try:
        splits = build(folder, mode, tokenizer, steps)
    except UserError as err:
        message = str(err)
        assert "\n" not in message
        return "error: " + message.replace(folder + os.sep, "")
    for split in splits.values():
        assert split.kept + sum(split.dropped.values()) == split.rows, splits  # nothing silently lost
    shown = [describe_split("train", splits["train"])]
    if splits["eval"].dropped:
        shown.append(describe_split("eval", splits["eval"]))
    return "; ".join(shown)


# --------------------------------------------------------------------------------------------
# The cases: file, and the outcome in error mode and in skip mode (an error is matched by its start)
# --------------------------------------------------------------------------------------------

SKIP = "(--bad_rows skip drops such rows and counts them)"


def kept(count: int, rows: int, drops: str, repeats: int = 0) -> str:
    repeating = f", {repeats} repeating an earlier one" if repeats else ""
    return f"train {count} of {rows} rows kept{repeating} (dropped: {drops})"


@dataclass(frozen=True)
class Case:
    ext: str
    train: Callable[[], bytes]
    error: str  # outcome in error mode
    skip: str  # outcome in skip mode
    eval_lines: Callable[[], bytes] = bytes
    steps: bool = False


GZ_ROWS, GZ_KEEP = 60, 0.6


def gz_outcomes() -> tuple[str, str]:
    line = complete_lines(truncated_gzip(GZ_ROWS, GZ_KEEP)) + 1
    return (f"error: train.jsonl.gz, line {line}: truncated gzip file (it ends before its end-of-stream marker)",
            kept(line - 1, line, "1 truncated gzip file"))


CASES: dict[str, Case] = {
    "truncated JSON line": Case(
        "jsonl", lambda: with_line(b'{"prompt": "Q", "chos'),
        "error: train.jsonl, line 4: not valid JSON (Unterminated string", kept(8, 9, "1 not valid JSON")),
    "truncated gzip": Case("jsonl.gz", lambda: truncated_gzip(GZ_ROWS, GZ_KEEP), *gz_outcomes()),
    "not gzip at all": Case(
        "jsonl.gz", lambda: with_row(pair(0)),
        "error: train.jsonl.gz, line 1: corrupt gzip data",
        "error: train.jsonl.gz: no usable pairs or ranked lists in the train split after cleaning (1 rows; "
        "dropped: 1 corrupt gzip data)"),
    "non-UTF-8 byte": Case(
        "jsonl", lambda: with_line(json.dumps(pair(50)).encode().replace(b"50 is", b"50 \xff is")),
        "error: train.jsonl, line 4: not UTF-8 text (byte 0xff", kept(8, 9, "1 not UTF-8 text")),
    "row is a list": Case(
        "jsonl", lambda: with_row(["Q?", " a", " b"]),
        f"error: train.jsonl, line 4: row is not an object (it is a list) {SKIP}",
        kept(8, 9, "1 row is not an object")),
    "field is a number": Case(
        "jsonl", lambda: with_row({**pair(50), "chosen": 5}),
        f"error: train.jsonl, line 4: field 'chosen' is a number, not text or chat messages {SKIP}",
        kept(8, 9, "1 field 'chosen' is a number")),
    "missing field": Case(
        "jsonl", lambda: with_row({"prompt": "Q?", "chosen": " a"}),
        f"error: train.jsonl, line 4: missing field 'rejected' {SKIP}", kept(8, 9, "1 missing field 'rejected'")),
    "JSON nested too deeply": Case(
        "jsonl", lambda: with_line(b"[" * 100_000),
        f"error: train.jsonl, line 4: not valid JSON (nested too deeply) {SKIP}", kept(8, 9, "1 not valid JSON")),
    "integer of 5000 digits": Case(
        "jsonl", lambda: with_line(json.dumps(pair(50))[:-1].encode() + b', "margin": 1' + b"0" * 5000 + b"}"),
        "error: train.jsonl, line 4: not valid JSON (Exceeds the limit (4300 digits)", kept(8, 9, "1 not valid JSON")),
    "non-finite number": Case(
        "jsonl", lambda: with_row({**pair(50), "margin": float("nan")}),
        f"error: train.jsonl, line 4: field 'margin' is not a finite number (it is a decimal number) {SKIP}",
        kept(8, 9, "1 field 'margin' is not a finite number")),
    "lone surrogate": Case(
        "jsonl", lambda: with_line(json.dumps(pair(50)).encode().replace(b"50 is", b"50 \\ud800 is")),
        "error: train.jsonl, line 4: field 'chosen' is not valid Unicode text",
        kept(8, 9, "1 field 'chosen' is not valid Unicode text")),
    "rank is text": Case(
        "jsonl", lambda: with_row({"prompt": "Q?", "responses": [" a", " b"], "ranks": [0, "1"]}),
        f"error: train.jsonl, line 4: an item of field 'ranks' is text, not an integer {SKIP}",
        kept(8, 9, "1 an item of field 'ranks' is text")),
    "ranks and responses differ": Case(
        "jsonl", lambda: with_row({"prompt": "Q?", "responses": [" a", " b", " c"], "ranks": [0, 1]}),
        f"error: train.jsonl, line 4: fields 'ranks' and 'responses' differ in length (2 ranks, 3 responses) {SKIP}",
        kept(8, 9, "1 fields 'ranks' and 'responses' differ in length")),
    "malformed chat messages": Case(
        "jsonl", lambda: with_row({"prompt": "Q?", "chosen": [{"role": "assistant"}], "rejected": " b"}),
        "error: train.jsonl, line 4: field 'chosen' is malformed chat messages (need a list of {role, content} "
        f"strings) {SKIP}", kept(8, 9, "1 field 'chosen' is malformed chat messages")),
    "token id is text": Case(
        "jsonl", lambda: with_row({"input_ids_chosen": [1, "2"], "input_ids_rejected": [1, 3]}),
        f"error: train.jsonl, line 4: an item of field 'input_ids_chosen' is text, not an integer {SKIP}",
        kept(8, 9, "1 an item of field 'input_ids_chosen' is text")),
    "token id out of range": Case(
        "jsonl", lambda: with_row({"input_ids_chosen": [1, 10**6], "input_ids_rejected": [1, 3]}),
        "error: train.jsonl, line 4: field 'input_ids_chosen' has a token id outside the tokenizer's range "
        f"(1000000; the tokenizer has 512 tokens) {SKIP}", kept(8, 9, "1 token ids outside the tokenizer's range")),
    "CSV record with an extra field": Case(
        "csv", lambda: csv_with(["Q?", " a", " b", " c"]),
        f"error: train.csv, line 4: wrong number of fields (4; the header has 3) {SKIP}",
        kept(8, 9, "1 wrong number of fields")),
    "CSV non-UTF-8 byte": Case(
        "csv", lambda: csv_with(["Q?", " a\udcff", " b"]),
        "error: train.csv, line 4: field 'chosen' is not valid Unicode text",
        kept(8, 9, "1 field 'chosen' is not valid Unicode text")),
    "CSV NUL byte": Case("csv", lambda: csv_with(["Q?", " a\x00", " b"]), kept(9, 9, "none"), kept(9, 9, "none")),
    "CSV 10 MB field": Case(
        "csv", lambda: csv_with([ten_mb(True), " a", " b"]), kept(9, 9, "none"), kept(9, 9, "none")),
    "10 MB prompt (words)": Case(
        "jsonl", lambda: with_row({**pair(50), "prompt": ten_mb(True)}), kept(9, 9, "none"), kept(9, 9, "none")),
    "10 MB prompt (one word)": Case(
        "jsonl", lambda: with_row({**pair(50), "prompt": ten_mb(False)}), kept(9, 9, "none"), kept(9, 9, "none")),
    "10 MB response (one word)": Case(
        "jsonl", lambda: with_row({**pair(50), "chosen": ten_mb(False)}),
        kept(8, 9, "1 too long for --max_seq_len"), kept(8, 9, "1 too long for --max_seq_len")),
    "pair longer than --max_seq_len": Case(
        "jsonl", lambda: with_row({**pair(50), "rejected": " no" * 200}),
        kept(8, 9, "1 too long for --max_seq_len"), kept(8, 9, "1 too long for --max_seq_len")),
    "duplicated row": Case(
        "jsonl", lambda: with_row(pair(1)), kept(9, 9, "none", repeats=1), kept(9, 9, "none", repeats=1)),
    "eval row duplicating a train row": Case(
        "jsonl", lambda: jsonl([pair(i) for i in range(GOOD)]),
        "train 8 of 8 rows kept (dropped: none); eval 3 of 4 rows kept (dropped: 1 same as a training example)",
        "train 8 of 8 rows kept (dropped: none); eval 3 of 4 rows kept (dropped: 1 same as a training example)",
        eval_lines=lambda: jsonl([pair(5)])),
    "empty file": Case(
        "jsonl", bytes, "error: train.jsonl: empty file, no rows", "error: train.jsonl: empty file, no rows"),
    "empty gzip file": Case(
        "jsonl.gz", lambda: gzip.compress(b""), "error: train.jsonl.gz: empty file, no rows",
        "error: train.jsonl.gz: empty file, no rows"),
    "CSV with only a header": Case(
        "csv", lambda: csv_bytes([]), "error: train.csv: empty file, no rows", "error: train.csv: empty file, no rows"),
    "empty JSON array": Case(
        "json", lambda: b"[]", "error: train.json: empty file, no rows", "error: train.json: empty file, no rows"),
    "parquet without rows": Case(
        "parquet", lambda: parquet_bytes([]), "error: train.parquet: empty file, no rows",
        "error: train.parquet: empty file, no rows"),
    "parquet without the needed columns": Case(
        "parquet", lambda: parquet_bytes([{"question": "Why?", "answer": "Because."}] * 3),
        "error: train.parquet: rows lack the needed columns", "error: train.parquet: rows lack the needed columns"),
    "corrupt parquet": Case(
        "parquet", lambda: parquet_bytes([pair(i) for i in range(GOOD)])[:-100],
        "error: train.parquet: not a readable parquet file", "error: train.parquet: not a readable parquet file"),
    "broken JSON array": Case(
        "json", lambda: json.dumps([pair(i) for i in range(GOOD)], indent=1).encode()[:-40],
        "error: train.json, line ", "error: train.json, line "),
    "truncated gzip JSON array": Case(
        "json.gz", lambda: gzip.compress(json.dumps([pair(i) for i in range(GOOD)]).encode())[:-30],
        "error: train.json.gz: truncated gzip file (it ends before its end-of-stream marker); a JSON array cannot "
        "be read in part", "error: train.json.gz: truncated gzip file"),
    "step row with a bad label": Case(
        "jsonl", lambda: with_line(json.dumps({**step_row(50), "labels": ["good"]}).encode(),
                                   [step_row(i) for i in range(GOOD)]),
        "error: train.jsonl, line 4: an item of field 'labels' is not a step label (true, false, 1, 0, -1 or null) "
        + SKIP, kept(8, 9, "1 an item of field 'labels' is not a step label"), steps=True),
    "step file cut mid-line": Case(
        "jsonl", lambda: jsonl([step_row(i) for i in range(GOOD)]) + b'{"prompt": "Add', "error: train.jsonl, "
        "line 9: not valid JSON", kept(8, 9, "1 not valid JSON"), steps=True),
}


def run_case(name: str, root: str, tokenizer) -> tuple[str, str]:
    """The outcome of case `name` in error mode and in skip mode, each from a fresh folder under `root`."""
    case = CASES[name]
    results = []
    for mode in BAD_ROWS:
        folder = os.path.join(root, mode)
        write_folder(folder, case.ext, case.train(), case.eval_lines(), case.steps)
        results.append(outcome(folder, mode, tokenizer, case.steps))
    return results[0], results[1]


def matches(actual: str, expected: str) -> bool:
    """Errors match by their start (library messages follow); counts match exactly."""
    return actual.startswith(expected) if expected.startswith("error: ") else actual == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_outcome(name, tokenizer, tmp_path):
    error_mode, skip_mode = run_case(name, str(tmp_path), tokenizer)
    assert matches(error_mode, CASES[name].error), error_mode
    assert matches(skip_mode, CASES[name].skip), skip_mode


def outcome_table(tokenizer=None) -> str:
    """Every case's outcome in both modes, as a Markdown table."""
    if tokenizer is None:
        from conftest import corpus
        from rlhf_reward.utils.tiny import train_tokenizer

        tokenizer = train_tokenizer(corpus(), "gpt2")
    lines = ["| case | --bad_rows error (default) | --bad_rows skip |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        for name in CASES:
            error_mode, skip_mode = run_case(name, os.path.join(root, re.sub(r"\W+", "_", name)), tokenizer)
            lines.append(f"| {name} | {error_mode.replace('|', '/')} | {skip_mode.replace('|', '/')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Long texts are not tokenised in full, with the same result
# --------------------------------------------------------------------------------------------

WORD = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=30)
GAP = st.sampled_from([" ", "  ", " \n", "\n\n ", "\t "])


@st.composite
def words(draw, min_words: int, max_words: int) -> str:
    """Text of words, spaces and newlines: every word shorter than half the window of the cut."""
    items = draw(st.lists(st.tuples(WORD, GAP), min_size=min_words, max_size=max_words))
    return "".join(word + gap for word, gap in items) + draw(WORD)


@settings(PROPERTY, max_examples=60)
@given(prompt=words(50, 200), answers=st.lists(words(0, 10) | words(100, 200), min_size=2, max_size=3, unique=True),
       max_seq_len=st.integers(1, 6))
def test_bounded_tokenisation_matches_full_tokenisation(tokenizer, prompt, answers, max_seq_len):
    example = {"prompt": prompt, "responses": answers, "ranks": list(range(len(answers))), "source": "s"}
    limit = max_seq_len * tokenize_module.CHARS_PER_TOKEN
    event(f"prompt tokenised in part: {len(prompt) > limit}, an answer not at all: {max(map(len, answers)) > limit}")
    bounded = tokenize_examples([example], tokenizer, max_seq_len, EOT)
    with mock.patch.object(tokenize_module, "CHARS_PER_TOKEN", 10**9):  # every text tokenised in full
        full = tokenize_examples([example], tokenizer, max_seq_len, EOT)
    assert (bounded.truncated, bounded.too_long, bounded.responses_dropped) == (
        full.truncated, full.too_long, full.responses_dropped)
    assert [p.tolist() for p in bounded.prompts] == [p.tolist() for p in full.prompts]
    assert [[r.tolist() for r in rs] for rs in bounded.responses] == [[r.tolist() for r in rs] for rs in full.responses]


def test_ten_mb_texts_take_no_time(tokenizer):
    import time

    examples = [{"prompt": ten_mb(spaced), "responses": [" a", " b"], "ranks": [0, 1], "source": "s"}
                for spaced in (True, False)]
    examples.append({"prompt": "Q?", "responses": [ten_mb(True), " b"], "ranks": [0, 1], "source": "s"})
    start = time.perf_counter()
    out = tokenize_examples(examples, tokenizer, 512, EOT)
    assert time.perf_counter() - start < 2  # in full: over 10 s each
    assert (len(out), out.truncated, out.too_long) == (2, 2, 1)
    assert all(len(prompt) + max(map(len, responses)) == 512
               for prompt, responses in zip(out.prompts, out.responses, strict=True))


# --------------------------------------------------------------------------------------------
# Property tests: good rows mixed with hostile lines
# --------------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["prompt", "chosen", "rejected", "responses", "ranks", "ranked_outputs",
                                         "input_ids_chosen", "input_ids_rejected", "conversation",
                                         "ranked_responses", "margin", "role", "content", "text", "x"]),
                        inner, max_size=5), max_leaves=12)
NOT_TEXT = st.none() | st.booleans() | st.integers() | st.floats() | st.dictionaries(st.text(max_size=3), st.integers())


@dataclass
class Line:
    data: bytes
    kind: str  # "good", "malformed" (certainly), "maybe" (either), "blank"


@st.composite
def line(draw, index: int, earlier: list[Line]) -> Line:
    kind = draw(st.sampled_from(["good", "good", "json", "wrong type", "cut", "spliced", "huge", "dup", "blank"]))
    row = pair(index)
    if kind == "json":
        return Line(json.dumps(draw(JSON)).encode(), "maybe")
    if kind == "wrong type":
        return Line(json.dumps({**row, draw(st.sampled_from(sorted(row))): draw(NOT_TEXT)}).encode(), "malformed")
    if kind == "cut":
        text = json.dumps(row).encode()
        return Line(text[:draw(st.integers(1, len(text) - 1))], "malformed")
    if kind == "spliced":
        text = json.dumps(row).encode()
        at = draw(st.integers(0, len(text)))
        junk = draw(st.binary(min_size=1, max_size=8).filter(lambda b: b"\n" not in b and b.strip()))
        return Line(text[:at] + junk + text[at:], "maybe")
    if kind == "huge":
        return Line(json.dumps({**row, "chosen": " a" * draw(st.integers(1000, 40_000))}).encode(), "maybe")
    if kind == "dup" and earlier:
        return draw(st.sampled_from(earlier))
    if kind == "blank":
        return Line(draw(st.sampled_from([b"", b"  ", b"\r"])), "blank")
    return Line(json.dumps(row).encode(), "good")


@st.composite
def hostile_file(draw) -> tuple[bytes, list[Line], bool]:
    """(file bytes, its lines, gzipped) with the file possibly gzipped and cut at a random byte."""
    lines: list[Line] = []
    for index in range(draw(st.integers(1, 14))):
        lines.append(draw(line(index, lines)))
    data = b"\n".join(item.data for item in lines) + b"\n"
    gzipped = draw(st.booleans())
    if gzipped:
        data = gzip.compress(data)
        data = data[:draw(st.integers(1, len(data)))]
    return data, lines, gzipped


def expected_rows(data: bytes, lines: list[Line], gzipped: bool) -> tuple[int, list[Line], bool]:
    """(rows in the file, the lines read whole, whether the file is cut): a cut gzip keeps its whole lines
    and counts the rest as one row."""
    if not gzipped:
        return sum(item.kind != "blank" for item in lines), lines, False
    inflater = zlib.decompressobj(wbits=31)
    try:
        text = inflater.decompress(data)
    except zlib.error:
        text = b""
    if inflater.eof:
        return sum(item.kind != "blank" for item in lines), lines, False
    whole = text.split(b"\n")[:-1]
    return sum(bool(part.strip()) for part in whole) + 1, lines[:len(whole)], True


@settings(PROPERTY, max_examples=150)
@given(case=hostile_file())
def test_mixed_hostile_lines_end_in_an_error_or_a_full_count(tokenizer, case):
    data, lines, gzipped = case
    rows, read, cut = expected_rows(data, lines, gzipped)
    malformed = cut or any(item.kind == "malformed" for item in read)
    suspicious = cut or any(item.kind in ("malformed", "maybe") for item in read)
    usable = any(item.kind == "good" for item in read)
    with tempfile.TemporaryDirectory() as root:
        for mode in BAD_ROWS:
            folder = os.path.join(root, mode)
            write_folder(folder, "jsonl.gz" if gzipped else "jsonl", data)
            try:
                splits = build(folder, mode, tokenizer)
            except UserError as err:
                event(f"{mode}: error")
                message = str(err)
                assert "\n" not in message and folder in message, message
                assert mode == "error" and suspicious or rows == 0 or not usable, message
                continue
            event(f"{mode}: built")
            assert not (mode == "error" and malformed), "a malformed row passed in error mode"
            train = splits["train"]
            assert train.rows == rows and train.kept + sum(train.dropped.values()) == rows, (train, rows)


@st.composite
def hostile_csv(draw) -> tuple[bytes, int, bool]:
    """(CSV bytes, records, whether one surely has the wrong number of fields or an undecodable byte)."""
    records, malformed = [], False
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
    for index in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["good", "good", "fields", "bytes", "text"]))
        record = list(pair(index).values())
        if kind == "fields":
            record = record + [draw(text)] if draw(st.booleans()) else record[:draw(st.integers(1, 2))]
            malformed = True
        elif kind == "bytes":
            record[1] += "\udcff"  # written as the raw byte 0xff
            malformed = True
        elif kind == "text":
            record = [draw(text) for _ in range(3)]
        records.append(record)
    return csv_bytes(records), len(records), malformed


@settings(PROPERTY, max_examples=60)
@given(case=hostile_csv())
def test_csv_records_end_in_an_error_or_a_full_count(tokenizer, case):
    data, rows, malformed = case
    with tempfile.TemporaryDirectory() as root:
        for mode in BAD_ROWS:
            folder = os.path.join(root, mode)
            write_folder(folder, "csv", data)
            try:
                train = build(folder, mode, tokenizer)["train"]
            except UserError as err:
                assert "\n" not in str(err) and folder in str(err), str(err)
                continue
            assert not (mode == "error" and malformed)
            assert train.rows == rows and train.kept + sum(train.dropped.values()) == rows


@st.composite
def step_file(draw) -> tuple[bytes, int, bool]:
    rows, malformed = [], False
    for index in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["good", "good", "labels", "steps", "json"]))
        row: object = step_row(index)
        if kind == "labels":
            row = {**step_row(index), "labels": [draw(st.sampled_from([2, "good", 0.5, [1]]))]}
            malformed = True
        elif kind == "steps":
            row = {**step_row(index), "steps": draw(NOT_TEXT)}
            malformed = True
        elif kind == "json":
            row = draw(JSON)
            malformed = malformed or not isinstance(row, dict)
        rows.append(row)
    return jsonl(rows), len(rows), malformed


@settings(PROPERTY, max_examples=60)
@given(case=step_file())
def test_step_rows_end_in_an_error_or_a_full_count(tokenizer, case):
    data, rows, malformed = case
    with tempfile.TemporaryDirectory() as root:
        for mode in BAD_ROWS:
            folder = os.path.join(root, mode)
            write_folder(folder, "jsonl", data, steps=True)
            try:
                train = build(folder, mode, tokenizer, steps=True)["train"]
            except UserError as err:
                assert "\n" not in str(err) and folder in str(err), str(err)
                continue
            assert not (mode == "error" and malformed)
            assert train.rows == rows and train.kept + sum(train.dropped.values()) == rows


# --------------------------------------------------------------------------------------------
# The phase split: every row is checked, and a broken row keeps its place
# --------------------------------------------------------------------------------------------


def load(path: str, mode: str, data_split: str, cache: str) -> tuple[list, list]:
    from rlhf_reward.utils.data.build import load_examples

    return load_examples(DataSource((path,), data_split, 1234, cache, cache, bad_rows=mode, log=lambda _: None))


def test_error_mode_reports_a_broken_line_that_another_phase_would_read(tmp_path):
    from rlhf_reward.utils.data.split import phase_indices

    rows = [json.dumps(pair(i)).encode() for i in range(40)]
    train_part = phase_indices(40, "9,1,0", 0, 1234)  # single file: a tenth is held out, then --data_split
    phase_2 = {train_part[i] for i in phase_indices(len(train_part), "2,4,4", 1, 1234)}
    other = next(i for i in train_part if i not in phase_2)
    rows[other] = b'{"prompt": "Q", "chosen": 5, "rejected": " b"}'
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(UserError, match=rf"pairs\.jsonl, line {other + 1}: field 'chosen' is a number"):
        load(str(path), "error", "2,4,4", str(tmp_path / "error"))
    train, _ = load(str(path), "skip", "2,4,4", str(tmp_path / "skip"))  # not this phase's row: nothing dropped
    assert len(train) == len(phase_2)


@pytest.mark.parametrize("broken", [b'{"prompt": "Q", "cho', b"\xff\xfe", b"[1, 2]"])
def test_a_skipped_row_keeps_its_place_in_the_split(tmp_path, broken):
    """The split cuts raw row positions: a broken row takes the place a dropped row would."""
    rows = [json.dumps(pair(i)).encode() for i in range(40)]
    results = []
    for name, line_7 in (("broken", broken), ("dropped", json.dumps({**pair(6), "chosen": " "}).encode())):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"\n".join(rows[:6] + [line_7] + rows[7:]) + b"\n")
        train, evaluation = load(str(path), "skip", "2,4,4", str(tmp_path / name))
        results.append([[ex["prompt"] for ex in examples] for examples in (train, evaluation)])
    assert results[0] == results[1]


ANY_KEYS = ["prompt", "chosen", "rejected", "question", "answer_0", "answer_1", "score_0", "score_1", "history",
            "human_ref_A", "human_ref_B", "labels", "responses", "ranks", "ranked_outputs", "conversation",
            "ranked_responses", "input_ids_chosen", "input_ids_rejected", "attention_mask_chosen", "margin", "tie"]
ANY_VALUE = JSON | st.fixed_dictionaries({"full_text": JSON}) | st.text(max_size=40).map(lambda t: "\n\nAssistant:" + t)


@settings(PROPERTY, max_examples=150)
@given(rows=st.lists(st.dictionaries(st.sampled_from(ANY_KEYS), ANY_VALUE, max_size=8) | JSON, min_size=1,
                     max_size=6),
       dataset_id=st.sampled_from(sorted(SOURCES)))
def test_every_adapter_drops_or_names_a_bad_row(rows, dataset_id):
    """Any value in any field of any known data set's layout: a counted drop, or an error naming the row."""
    tagged = [(f"rows.jsonl:line {i + 1}", row) for i, row in enumerate(rows)]
    problem = row_problem(SOURCES[dataset_id].adapter, dataset_id)
    examples, dropped = tally(judge_rows(tagged, problem, "skip"))
    assert len(examples) + sum(dropped.values()) == len(rows)
    try:
        judge_rows(tagged, problem)
    except UserError as err:
        assert re.match(r"rows\.jsonl, line \d+: ", str(err)) and "\n" not in str(err), str(err)


def test_rw_eval_scoring_follows_bad_rows_for_token_ids(saved_models, tmp_path):
    """Scoring a data file (rw_eval, the converter) applies --bad_rows to pretokenized ids too."""
    from rlhf_reward.utils.data.build import DataSource
    from rlhf_reward.utils.model_files import load_hf_tokenizer

    from step2_reward_model.heldout import score_split
    from step2_reward_model.objectives.base import DataRequest
    from step2_reward_model.objectives.preference import Preference
    from step2_reward_model.output import load_reward_model
    from step2_reward_model.scoring import Scorer

    folder = str(tmp_path / "data")
    write_folder(folder, "jsonl", jsonl([{"input_ids_chosen": [5, 6, i], "input_ids_rejected": [5, 7, i]}
                                         for i in range(8)]),
                 eval_lines=jsonl([{"input_ids_chosen": [5, 10**6], "input_ids_rejected": [5, 8]}]))
    path = saved_models["gpt2"]
    scorer = Scorer(load_reward_model(path), load_hf_tokenizer(path), MAX_SEQ_LEN, EOT)
    def request(bad_rows: str, log) -> DataRequest:
        return DataRequest(DataSource((folder,), "0,1,0", 1234, str(tmp_path / bad_rows), folder, bad_rows=bad_rows,
                                      log=log), MAX_SEQ_LEN)

    with pytest.raises(UserError, match=r"eval.jsonl, line 4: field 'input_ids_chosen' has a token id outside"):
        score_split(scorer, Preference(), request("error", lambda _: None), "eval")
    lines: list[str] = []
    held_out = score_split(scorer, Preference(), request("skip", lines.append), "eval")
    assert held_out.dataset.data.bad_ids == 1 and len(held_out.table) == 6  # the three clean eval pairs
    assert any(line.startswith("data: eval: 3 examples") and "1 dropped (token ids outside the tokenizer's range)"
               in line for line in lines), lines
