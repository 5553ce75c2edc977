"""The data module: row adapters, local sources, cleaning, phase split, tokenisation, batches, caching.

Every expected value is written by hand here or computed by an independent re-implementation (the
DeepSpeed-Chat split, the tokenizer called directly), never by the function under test.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import FAMILIES, needs_shared_data
from rlhf_reward.utils.data import build as build_module
from rlhf_reward.utils.data import split as split_module
from rlhf_reward.utils.data.adapters import SOURCES, Adapter, split_hh_dialogue
from rlhf_reward.utils.data.build import DataSource, create_reward_datasets
from rlhf_reward.utils.data.collate import EvalShard, PairCollator, PairDataset
from rlhf_reward.utils.data.examples import Example, judge_rows, row_problem, summarise, tally
from rlhf_reward.utils.data.sources import RawSplits, load_source
from rlhf_reward.utils.data.split import parse_split, phase_indices, shuffle_order, split_bounds
from rlhf_reward.utils.data.tokenize import (
    TokenizedExamples,
    load_tokenized,
    save_tokenized,
    special_affixes,
    tokenize_examples,
)
from rlhf_reward.utils.errors import UserError

EOT = "<|endoftext|>"


def QUIET(message: str) -> None:  # noqa: N802
    """A log function that drops the progress lines."""

# Rows in both local layouts, and what each must become.
PAIRS = [
    {"prompt": "\n\nHuman: What is 2 plus 3?\n\nAssistant:", "chosen": " 2 plus 3 is 5.",
     "rejected": " 2 plus 3 is 6."},
    {"prompt": "\n\nHuman: Tell me something about cats.\n\nAssistant:",
     "chosen": " Here is a fact: kitten and fur go with purr.",
     "rejected": " Here is a fact: sail and deck go with waves."},
    {"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
     "chosen": " Sure, happy to help. Put it in hot water for ten minutes.",
     "rejected": " Stop bothering me. Put it in hot water for ten minutes."},
]
HH_ROWS = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS]
EXPECTED = [(p["prompt"], p["chosen"], p["rejected"]) for p in PAIRS]


def as_tuples(examples) -> list[tuple[str, str, str]]:
    return [(ex["prompt"], ex["responses"][0], ex["responses"][1]) for ex in examples]


def tagged(rows) -> list[tuple[str, object]]:
    return [(f"test.jsonl:line {i + 1}", row) for i, row in enumerate(rows)]


def adapt(dataset_id: str, row: dict) -> dict:
    return SOURCES[dataset_id].adapter(row)


def clean(rows, adapter: Adapter, source: str, bad_rows: str = "error") -> tuple[list[Example], Counter]:
    """The examples of `rows` and their drops by reason, judged as `utils.data.build.load_examples` does."""
    return tally(judge_rows(rows, row_problem(adapter, source), bad_rows))


def summarised(raw: RawSplits) -> tuple[list[Example], str]:
    """The examples of the train split of `raw` and its summary line, as `utils.data.build.load_examples` logs it."""
    return summarise(raw, "train", raw.train, judge_rows(raw.train, row_problem(raw.adapter, raw.name)))


def write_jsonl(path, rows, ensure_ascii: bool = True) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
    return str(path)


def numbered_rows(count: int, tag: str = "") -> list[dict]:
    """Distinct prompt/chosen/rejected rows (so every example can be told apart by its prompt)."""
    return [{"prompt": f"\n\nHuman: {tag}What is {i} plus {i}?\n\nAssistant:", "chosen": f" {i} plus {i} is {2 * i}.",
             "rejected": f" {i} plus {i} is {2 * i + 1}."} for i in range(count)]


def reference_phase(size: int, data_split: str, phase_index: int, seed: int) -> list[int]:
    """DeepSpeed-Chat's get_raw_dataset_split_index + get_shuffle_idx, written out independently."""
    splits = [float(s) for s in data_split.split(",")]
    splits_sum = sum(splits)
    splits = [s / splits_sum for s in splits]
    index = [0]
    for i, s in enumerate(splits):
        index.append(index[i] + int(round(s * float(size))))
    diff = index[-1] - size
    for i in range(1, len(index)):
        index[i] -= diff
    assert index[-1] == size
    shuffle_idx = np.arange(start=0, stop=size, step=1, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(shuffle_idx)
    return [int(x) for x in shuffle_idx[index[phase_index]:index[phase_index + 1]]]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# Row adapters of the known data sets, in each data set's real column layout
# --------------------------------------------------------------------------------------------


def test_every_deepspeed_chat_dataset_id_has_an_adapter():
    expected = {"Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
                "yitingxie/rlhf-reward-datasets", "openai/webgpt_comparisons", "stanfordnlp/SHP",
                "Anthropic/hh-rlhf"}
    assert expected <= set(SOURCES)
    # Sources without a test split get their eval carved out of train, as DeepSpeed-Chat does.
    assert SOURCES["openai/webgpt_comparisons"].eval_split is None
    assert SOURCES["Dahoas/synthetic-instruct-gptj-pairwise"].eval_split is None
    assert SOURCES["stanfordnlp/SHP"].eval_split == "validation"


@pytest.mark.parametrize("dataset_id", ["Dahoas/rm-static", "Dahoas/full-hh-rlhf"])
def test_dahoas_rows_keep_prompt_chosen_rejected(dataset_id):
    row = {"prompt": "\n\nHuman: Is the sky blue?\n\nAssistant:", "response": " Yes, it is.",
           "chosen": " Yes, it is.", "rejected": " No idea, ask someone else."}
    pair = adapt(dataset_id, row)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (
        "\n\nHuman: Is the sky blue?\n\nAssistant:", " Yes, it is.", " No idea, ask someone else.")


def test_synthetic_gptj_wraps_prompt_in_human_assistant():
    row = {"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast.", "rejected": "Buy it."}
    pair = adapt("Dahoas/synthetic-instruct-gptj-pairwise", row)
    assert pair["prompt"] == " Human: How do I bake bread? Assistant:"
    assert pair["chosen"] == " Mix flour, water and yeast."
    assert pair["rejected"] == " Buy it."


def test_yitingxie_appends_assistant_and_keeps_last_assistant_turn():
    row = {"prompt": "\n\nHuman: Why do cats purr?\n\n",
           "chosen": "Assistant: They purr when content.",
           "rejected": "Assistant: Earlier turn.\n\nHuman: And?\n\nAssistant: No clue."}
    pair = adapt("yitingxie/rlhf-reward-datasets", row)
    assert pair["prompt"] == "\n\nHuman: Why do cats purr?\n\nAssistant:"
    assert pair["chosen"] == " They purr when content."
    assert pair["rejected"] == " No clue."


def webgpt_row(answer_0: str, answer_1: str, score_0: float, score_1: float) -> dict:
    return {"question": {"dataset": "eli5", "id": "q1", "full_text": "Why is the sky blue?"},
            "quotes_0": {"title": [], "extract": []}, "answer_0": answer_0, "tokens_0": [], "score_0": score_0,
            "quotes_1": {"title": [], "extract": []}, "answer_1": answer_1, "tokens_1": [], "score_1": score_1}


def test_webgpt_strips_citations_and_picks_higher_score():
    row = webgpt_row("Light scatters [1]. Blue scatters most [2][3].", "It reflects the sea (mostly).",
                     score_0=1.0, score_1=-1.0)
    pair = adapt("openai/webgpt_comparisons", row)
    assert pair["prompt"] == " Human: Why is the sky blue? Assistant:"
    assert pair["chosen"] == " Light scatters. Blue scatters most."
    assert pair["rejected"] == " It reflects the sea."
    assert not pair["tie"]

    swapped = adapt("openai/webgpt_comparisons", webgpt_row("Wrong [1].", "Right [2].", score_0=-0.5, score_1=0.5))
    assert (swapped["chosen"], swapped["rejected"]) == (" Right.", " Wrong.")


def test_webgpt_tie_is_flagged_and_dropped_by_cleaning():
    row = webgpt_row("Answer one.", "Answer two.", score_0=0.0, score_1=0.0)
    assert adapt("openai/webgpt_comparisons", row)["tie"] is True
    good = webgpt_row("Answer one.", "Answer two.", score_0=1.0, score_1=0.0)
    examples, dropped = clean(tagged([row, good]), SOURCES["openai/webgpt_comparisons"].adapter, "webgpt")
    assert dropped == Counter({"tie (equal scores)": 1})
    assert as_tuples(examples) == [(" Human: Why is the sky blue? Assistant:", " Answer one.", " Answer two.")]


@pytest.mark.parametrize("label, chosen, rejected", [(1, " Answer A", " Answer B"), (0, " Answer B", " Answer A")])
def test_shp_label_picks_the_preferred_reference(label, chosen, rejected):
    row = {"post_id": "x", "domain": "askscience_train", "upvote_ratio": 0.9, "history": "Why is ice slippery?",
           "c_root_id_A": "a", "c_root_id_B": "b", "created_at_utc_A": 1, "created_at_utc_B": 2,
           "score_A": 10, "score_B": 3, "human_ref_A": "Answer A", "human_ref_B": "Answer B",
           "labels": label, "seconds_difference": 1.0, "score_ratio": 3.3}
    pair = adapt("stanfordnlp/SHP", row)
    assert pair["prompt"] == " Human: Why is ice slippery? Assistant:"
    assert (pair["chosen"], pair["rejected"]) == (chosen, rejected)


def test_anthropic_hh_rows_are_split_into_prompt_and_responses():
    row = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
           "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}
    pair = adapt("Anthropic/hh-rlhf", row)
    assert pair == {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello! How can I help?",
                    "rejected": " Go away."}


@pytest.mark.parametrize("chosen, rejected, prompt", [
    # Two turns, differing only in the last answer.
    ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D one.",
     "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: E two.",
     "\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant:"),
    # The answers share their first words: the prompt still stops at the Assistant turn.
    ("\n\nHuman: Is it?\n\nAssistant: I think so.", "\n\nHuman: Is it?\n\nAssistant: I think not.",
     "\n\nHuman: Is it?\n\nAssistant:"),
    # They diverge at an earlier Assistant turn (one dialogue goes on longer).
    ("\n\nHuman: A?\n\nAssistant: B.\n\nHuman: C?\n\nAssistant: D.", "\n\nHuman: A?\n\nAssistant: X.",
     "\n\nHuman: A?\n\nAssistant:"),
])
def test_split_hh_dialogue_cuts_after_last_shared_assistant(chosen, rejected, prompt):
    pair = split_hh_dialogue(chosen, rejected)
    assert pair["prompt"] == prompt
    assert pair["chosen"] == chosen[len(prompt):]
    assert pair["rejected"] == rejected[len(prompt):]


def test_split_hh_dialogue_without_shared_assistant_turn_is_an_error():
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_dialogue("Human: hello", "Human: bye")


# --------------------------------------------------------------------------------------------
# load_source on local files and folders
# --------------------------------------------------------------------------------------------


def write_rows(path, rows, fmt: str) -> str:
    """`rows` written in format `fmt` at `path` (no extension): returns the file name."""
    name = f"{path}.{fmt}"
    if fmt == "jsonl":
        write_jsonl(name, rows)
    elif fmt == "jsonl.gz":
        with gzip.open(name, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    elif fmt == "json":
        with open(name, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    elif fmt == "json-lines":
        name = f"{path}.json"
        write_jsonl(name, rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), name)
    elif fmt == "csv":
        import csv

        with open(name, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise AssertionError(fmt)
    return name


@pytest.mark.parametrize("layout", ["prompt_chosen_rejected", "hh_chosen_rejected"])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "json-lines", "parquet", "csv"])
def test_load_source_reads_local_files(tmp_path, fmt, layout):
    rows = PAIRS if layout == "prompt_chosen_rejected" else HH_ROWS
    name = write_rows(tmp_path / "pairs", rows, fmt)
    raw = load_source(name, str(tmp_path))
    assert raw.eval is None
    assert len(raw.train) == len(rows)
    assert all(where.startswith(name) for where, _ in raw.train)
    examples, dropped = clean(raw.train, raw.adapter, raw.name)
    assert not dropped
    assert as_tuples(examples) == EXPECTED


@pytest.mark.parametrize("eval_name", ["eval.jsonl", "test.jsonl"])
def test_load_source_reads_a_folder_with_train_and_eval_files(tmp_path, eval_name):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", PAIRS[:2])
    write_jsonl(folder / eval_name, HH_ROWS[2:])
    (folder / "README.md").write_text("not data")
    raw = load_source(str(folder), str(tmp_path))
    assert as_tuples(clean(raw.train, raw.adapter, raw.name)[0]) == EXPECTED[:2]
    assert as_tuples(clean(raw.eval, raw.adapter, raw.name)[0]) == EXPECTED[2:]


def test_load_source_folder_with_only_train_has_no_eval(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", PAIRS)
    raw = load_source(str(tmp_path / "data"), str(tmp_path))
    assert raw.eval is None and len(raw.train) == 3


def test_load_source_reads_save_to_disk_dataset_dict_and_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(PAIRS[:2]), "test": Dataset.from_list(PAIRS[2:])}).save_to_disk(
        str(tmp_path / "dict"))
    raw = load_source(str(tmp_path / "dict"), str(tmp_path))
    assert as_tuples(clean(raw.train, raw.adapter, raw.name)[0]) == EXPECTED[:2]
    assert as_tuples(clean(raw.eval, raw.adapter, raw.name)[0]) == EXPECTED[2:]

    Dataset.from_list(HH_ROWS).save_to_disk(str(tmp_path / "plain"))
    raw = load_source(str(tmp_path / "plain"), str(tmp_path))
    assert raw.eval is None
    assert as_tuples(clean(raw.train, raw.adapter, raw.name)[0]) == EXPECTED


def test_load_source_local_jsonfile_reads_repo_data_folder(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.json").write_text(json.dumps(PAIRS[:2]))
    (repo / "data" / "eval.json").write_text(json.dumps(HH_ROWS[2:]))
    raw = load_source("local/jsonfile", str(repo))
    assert raw.name == "jsonfile"
    assert as_tuples(clean(raw.train, raw.adapter, raw.name)[0]) == EXPECTED[:2]
    assert as_tuples(clean(raw.eval, raw.adapter, raw.name)[0]) == EXPECTED[2:]


def test_load_source_local_jsonfile_without_eval_file_names_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(PAIRS))
    with pytest.raises(UserError) as err:
        load_source("local/jsonfile", str(tmp_path))
    assert "eval.json" in str(err.value) and "\n" not in str(err.value)


# JSON allows U+2028, U+2029 and U+0085 unescaped inside strings; JSON Lines separates records with "\n" only.
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_jsonl_string_with_unicode_line_separator_is_one_row(tmp_path, separator):
    row = {"prompt": "\n\nHuman: Say hi\n\nAssistant:", "chosen": f" Hi{separator}there.", "rejected": " No."}
    name = write_jsonl(tmp_path / "pairs.jsonl", [row], ensure_ascii=False)
    raw = load_source(name, str(tmp_path))
    assert [r for _, r in raw.train] == [row]


# --------------------------------------------------------------------------------------------
# Bad input: one-line UserError naming the file or id
# --------------------------------------------------------------------------------------------


def user_error(call, *args) -> str:
    with pytest.raises(UserError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_dataset_id_is_a_user_error(tmp_path):
    message = user_error(load_source, "not_a_dataset", str(tmp_path))
    assert "not_a_dataset" in message


def test_missing_local_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = user_error(load_source, "missing/file.jsonl", str(tmp_path))
    assert "missing/file.jsonl" in message and "no such file" in message


def test_file_without_needed_columns_names_file_and_found_columns(tmp_path):
    name = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}] * 2)
    raw = load_source(name, str(tmp_path))
    message = user_error(summarised, raw)
    assert name in message
    assert "question" in message and "answer" in message


def test_invalid_json_line_names_file_and_line(tmp_path):
    name = str(tmp_path / "broken.jsonl")
    with open(name, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "oops", \n' + json.dumps(PAIRS[1]) + "\n")
    raw = load_source(name, str(tmp_path))  # a broken line is a row in its place, judged by --bad_rows
    message = user_error(summarised, raw)
    assert name in message and "line 3" in message and "not valid JSON" in message


def test_invalid_json_array_names_file_and_line(tmp_path):
    name = str(tmp_path / "broken.json")
    with open(name, "w", encoding="utf-8") as handle:
        handle.write('[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": oops}\n]\n')
    message = user_error(load_source, name, str(tmp_path))
    assert name in message and "line 3" in message


def test_data_set_empty_after_cleaning_is_a_user_error(tmp_path):
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["chosen"]} for p in PAIRS]
    name = write_jsonl(tmp_path / "same.jsonl", rows)
    raw = load_source(name, str(tmp_path))
    message = user_error(summarised, raw)
    assert name in message and "no usable pairs" in message and "identical" in message


def test_unsupported_extension_is_a_user_error(tmp_path):
    name = tmp_path / "pairs.txt"
    name.write_text(json.dumps(PAIRS[0]) + "\n")
    message = user_error(load_source, str(name), str(tmp_path))
    assert str(name) in message and "unsupported" in message


def test_folder_without_train_file_is_a_user_error(tmp_path):
    write_jsonl(tmp_path / "data" / "pairs.jsonl", PAIRS)
    message = user_error(load_source, str(tmp_path / "data"), str(tmp_path))
    assert str(tmp_path / "data") in message and "train" in message


@pytest.mark.parametrize("hub_id", ["someorg/somedata", "Anthropic/hh-rlhf"])
def test_hub_id_offline_is_a_user_error_naming_it(tmp_path, monkeypatch, hub_id):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read the variable once, at import: set their copies too, so no request is tried.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    message = user_error(load_source, hub_id, str(tmp_path))
    assert hub_id in message


# --------------------------------------------------------------------------------------------
# Cleaning: every dropped row counted by reason, good rows kept in order
# --------------------------------------------------------------------------------------------


def test_cleaning_counts_each_reason_and_keeps_good_rows_in_order():
    rows = [
        PAIRS[0],
        {"prompt": "   \n", "chosen": " a", "rejected": " b"},  # empty prompt
        {"prompt": "Q", "chosen": "", "rejected": " b"},  # empty response
        {"prompt": "Q", "chosen": " a", "rejected": "  \n "},  # empty response
        {"prompt": "Q", "chosen": " same", "rejected": "same  "},  # identical after stripping
        PAIRS[1],
        {"prompt": "Q", "chosen": " a"},  # missing field
        {"prompt": "Q", "chosen": 5, "rejected": " b"},  # number
        {"prompt": None, "chosen": " a", "rejected": " b"},  # null
        ["Q", " a", " b"],  # not an object
        "Q a b",  # not an object
        PAIRS[2],
    ]
    adapter = SOURCES["Dahoas/rm-static"].adapter
    examples, dropped = clean(tagged(rows), adapter, "src", bad_rows="skip")
    assert as_tuples(examples) == EXPECTED
    assert [ex["source"] for ex in examples] == ["src"] * 3
    assert dropped == Counter({"empty prompt": 1, "empty response": 2, "chosen identical to rejected": 1,
                               "missing field 'rejected'": 1, "field 'chosen' is a number": 1,
                               "field 'prompt' is null": 1, "row is not an object": 2})
    # By default the first malformed row stops the run, named by file, line and field.
    message = user_error(clean, tagged(rows), adapter, "src")
    assert message.startswith("test.jsonl, line 7: missing field 'rejected'") and "--bad_rows skip" in message


def test_cleaning_hh_layout_reasons():
    rows = [HH_ROWS[0], {"chosen": 3, "rejected": "x"}, {"chosen": "Human: hi", "rejected": "Human: ho"},
            {"rejected": "x"}, {"chosen": HH_ROWS[1]["chosen"], "rejected": HH_ROWS[1]["chosen"]}, HH_ROWS[2]]
    examples, dropped = clean(tagged(rows), SOURCES["Anthropic/hh-rlhf"].adapter, "hh", bad_rows="skip")
    assert as_tuples(examples) == [EXPECTED[0], EXPECTED[2]]
    assert dropped["field 'chosen' is a number"] == 1
    assert dropped["missing field 'chosen'"] == 1
    assert dropped["chosen identical to rejected"] == 1
    assert sum(count for reason, count in dropped.items() if "Assistant" in reason) == 1
    assert sum(dropped.values()) == 4


# --------------------------------------------------------------------------------------------
# DeepSpeed-Chat --data_split
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, data_split, seed", [(100, "2,4,4", 1234), (100, "2,4,4", 0), (7, "1,1,1", 42),
                                                    (10, "1,1,2", 3), (1001, "6,2,2", 1234), (3, "2,4,4", 5)])
def test_phase_indices_match_deepspeed_chat_reference(size, data_split, seed):
    slices = [phase_indices(size, data_split, phase, seed) for phase in range(3)]
    assert slices == [reference_phase(size, data_split, phase, seed) for phase in range(3)]
    flat = [i for s in slices for i in s]
    assert sorted(flat) == list(range(size))  # disjoint and covering


def test_split_bounds_by_hand():
    assert split_bounds([2, 4, 4], 100) == [0, 20, 60, 100]
    # 33+33+33 = 99: the undershoot is given to every bound after the first.
    assert split_bounds([1, 1, 1], 100) == [0, 34, 67, 100]
    # 2.5 -> 2 (round half to even), 2.5 -> 2, 5: 9 rows, one short.
    assert split_bounds([1, 1, 2], 10) == [0, 3, 5, 10]


def test_phase_indices_are_cached_as_npy_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = phase_indices(100, "2,4,4", 1, 1234, str(cache), "src")
    assert first == reference_phase(100, "2,4,4", 1, 1234)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1
    assert np.load(files[0], allow_pickle=False).tolist() == first

    class NoShuffle:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the cached indices should have been used")

    monkeypatch.setattr(split_module.np.random, "RandomState", NoShuffle)
    with pytest.raises(AssertionError):  # the patch is live: an uncached call reaches it
        phase_indices(100, "2,4,4", 1, 1234, None)
    assert phase_indices(100, "2,4,4", 1, 1234, str(cache), "src") == first


@pytest.mark.parametrize("bad", ["2,4", "2,4,4,1", "a,b,c", "1,-1,2", "0,0,0", "", "2;4;4"])
def test_parse_split_rejects_bad_strings(bad):
    with pytest.raises(UserError, match="data_split"):
        parse_split(bad)


def test_parse_split_accepts_three_numbers():
    assert parse_split("2,4,4") == [2.0, 4.0, 4.0]
    assert parse_split("0,10,0") == [0.0, 10.0, 0.0]


def test_shuffle_order_is_the_seeded_permutation():
    expected = np.arange(50, dtype=np.uint32)
    np.random.RandomState(seed=7).shuffle(expected)
    assert shuffle_order(50, 7) == expected.tolist()


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def test_special_affixes_per_family(tokenizers):
    opt = tokenizers["opt"]
    assert special_affixes(opt) == ([opt.convert_tokens_to_ids("</s>")], [])
    assert special_affixes(tokenizers["gpt2"]) == ([], [])
    assert special_affixes(tokenizers["gpt_neox"]) == ([], [])
    llama = tokenizers["llama"]
    assert special_affixes(llama) == ([llama.convert_tokens_to_ids("<s>")], [])


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenize_examples_is_prefix_prompt_response_eot(tokenizers, family):
    tok = tokenizers[family]
    prefix = {"opt": ["</s>"], "llama": ["<s>"]}.get(family, [])
    prefix_ids = tok.convert_tokens_to_ids(prefix)
    examples = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "source": "a" if i < 2 else "b"}
                for i, p in enumerate(PAIRS)]
    out = tokenize_examples(examples, tok, 512, EOT)
    assert len(out) == 3 and out.truncated == 0 and out.too_long == 0
    assert out.sources == [0, 0, 1] and out.source_names == ["a", "b"]
    for i, p in enumerate(PAIRS):
        assert out.prompts[i].tolist() == prefix_ids + ids(tok, p["prompt"])
        assert [r.tolist() for r in out.responses[i]] == [ids(tok, p["chosen"] + EOT), ids(tok, p["rejected"] + EOT)]


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_long_prompt_is_cut_from_the_left_by_the_same_amount(tokenizers, family):
    tok = tokenizers[family]
    prefix, _ = special_affixes(tok)
    prompt = "\n\nHuman: " + " ".join(["Tell me something about cats and boats and music."] * 6) + "\n\nAssistant:"
    chosen, rejected = " Here is a fact: purr.", " Here is a fact: sail and anchor go with waves and deck."
    prompt_ids, chosen_ids, rejected_ids = ids(tok, prompt), ids(tok, chosen + EOT), ids(tok, rejected + EOT)
    keep = 5
    assert len(prompt_ids) > keep + 10 and len(rejected_ids) > len(chosen_ids)
    max_seq_len = len(prefix) + len(rejected_ids) + keep
    short = PAIRS[0]
    examples = [{"prompt": prompt, "responses": [chosen, rejected], "source": "s"},
                {"prompt": short["prompt"], "responses": [short["chosen"], short["rejected"]], "source": "s"}]
    out = tokenize_examples(examples, tok, max_seq_len, EOT)
    assert out.truncated == 1 and out.too_long == 0 and len(out) == 2
    # One prompt for both responses: the same left cut for chosen and rejected.
    assert out.prompts[0].tolist() == prefix + prompt_ids[-keep:]
    assert [r.tolist() for r in out.responses[0]] == [chosen_ids, rejected_ids]
    sequences = [np.concatenate([out.prompts[0], r]).tolist() for r in out.responses[0]]
    assert len(sequences[1]) == max_seq_len and len(sequences[0]) < max_seq_len
    assert sequences[0][-len(chosen_ids):] == chosen_ids and sequences[1][-len(rejected_ids):] == rejected_ids
    # The short example is untouched.
    assert out.prompts[1].tolist() == prefix + ids(tok, short["prompt"])


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_response_that_cannot_fit_is_dropped_and_counted(tokenizers, family):
    tok = tokenizers[family]
    prefix, _ = special_affixes(tok)
    long_response = " " + " ".join(["Here is a fact: whiskers and kitten go with mouse."] * 4)
    exact = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "responses": [" Yes.", " No, never ever."], "source": "s"}
    room = len(prefix) + len(ids(tok, " No, never ever." + EOT))  # longest response fits, with no prompt at all
    examples = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "responses": [" Yes.", long_response], "source": "t"},
                exact,
                {"prompt": "\n\nHuman: Hi\n\nAssistant:", "responses": [long_response, " No."], "source": "t"}]
    out = tokenize_examples(examples, tok, room, EOT)
    assert out.too_long == 2 and len(out) == 1
    assert out.truncated == 1  # the exact one keeps its answers and loses the whole prompt
    assert out.prompts[0].tolist() == prefix
    assert out.responses[0][1].tolist() == ids(tok, " No, never ever." + EOT)
    assert out.source_names == ["s"] and out.sources == [0]


def test_save_and_load_tokenized_round_trip_exactly(tmp_path, tokenizers):
    tok = tokenizers["gpt2"]
    examples = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "source": f"src{i % 2}"}
                for i, p in enumerate(PAIRS)]
    out = tokenize_examples(examples, tok, 512, EOT)
    out.prompts[1] = out.prompts[1][:0]  # an empty prompt must survive too
    out.truncated, out.too_long = 4, 7
    path = str(tmp_path / "tok.npz")
    save_tokenized(out, path)
    assert sorted(os.listdir(tmp_path)) == ["tok.npz"]  # no temporary file left behind
    back = load_tokenized(path)
    assert len(back) == len(out)
    for a, b in zip(out.prompts, back.prompts, strict=True):
        assert a.dtype == b.dtype and a.tolist() == b.tolist()
    for ra, rb in zip(out.responses, back.responses, strict=True):
        assert len(ra) == len(rb)
        for a, b in zip(ra, rb, strict=True):
            assert a.dtype == b.dtype and a.tolist() == b.tolist()
    assert back.sources == out.sources == [0, 1, 0]
    assert back.source_names == ["src0", "src1"]
    assert (back.truncated, back.too_long) == (4, 7)


# --------------------------------------------------------------------------------------------
# Collator and eval sharding
# --------------------------------------------------------------------------------------------


def hand_tokenized(lengths: list[tuple[int, int, int]]) -> TokenizedExamples:
    """Examples with prompt/chosen/rejected of the given lengths; token values encode (example, part)."""
    out = TokenizedExamples()
    for i, (p, c, r) in enumerate(lengths):
        out.prompts.append(np.arange(p, dtype=np.int32) + 1000 * (i + 1))
        out.responses.append([np.arange(c, dtype=np.int32) + 1000 * (i + 1) + 100,
                              np.arange(r, dtype=np.int32) + 1000 * (i + 1) + 200])
        out.ranks.append(np.array([0, 1], dtype=np.int32))
        out.margins.append(0.0)
        out.sources.append(0)
    out.source_names = ["hand"]
    return out


@pytest.mark.parametrize("lengths, width", [([(3, 4, 2), (5, 6, 1), (1, 1, 1)], 16),
                                           ([(8, 4, 4), (2, 1, 3)], 16),
                                           ([(1, 1, 2)], 8),
                                           ([(20, 5, 8), (3, 2, 2)], 32)])
def test_collator_stacks_chosen_then_rejected_padded_to_multiple_of_8(lengths, width):
    dataset = PairDataset(hand_tokenized(lengths))
    items = [dataset[i] for i in range(len(dataset))]
    pad = 7
    batch = PairCollator(pad)(items)
    inputs, ranking = batch.inputs, batch.targets
    n = len(items)
    assert inputs.input_ids.shape == (2 * n, width) and inputs.attention_mask.shape == (2 * n, width)
    assert inputs.input_ids.dtype == torch.long
    for i, (p, c, r) in enumerate(lengths):
        base = 1000 * (i + 1)
        prompt = [base + k for k in range(p)]
        for row, (length, offset) in ((i, (c, 100)), (n + i, (r, 200))):
            real = prompt + [base + offset + k for k in range(length)]
            assert inputs.input_ids[row, :len(real)].tolist() == real
            assert inputs.input_ids[row, len(real):].tolist() == [pad] * (width - len(real))
            assert inputs.attention_mask[row].tolist() == [1] * len(real) + [0] * (width - len(real))
    assert ranking.group.tolist() == list(range(n)) * 2 and ranking.rank.tolist() == [0] * n + [1] * n
    assert ranking.margin.tolist() == [0.0] * n
    assert batch.real is None and batch.index.tolist() == list(range(n))


def test_collator_ranked_lists_of_different_lengths():
    tokenized = hand_tokenized([(2, 1, 1), (1, 2, 2)])
    tokenized.responses[1].append(np.array([2300, 2301, 2302], dtype=np.int32))
    tokenized.ranks[1] = np.array([0, 1, 1], dtype=np.int32)  # best of three, the others unordered
    tokenized.margins = [0.5, 0.0]
    dataset = PairDataset(tokenized)
    batch = PairCollator(0)([dataset[0], dataset[1]])
    ranking = batch.targets
    assert ranking.group.tolist() == [0, 1, 0, 1, 1] and ranking.rank.tolist() == [0, 0, 1, 1, 1]
    assert ranking.margin.tolist() == [0.5, 0.0] and batch.source.tolist() == [0, 0]
    assert batch.inputs.input_ids[4, :4].tolist() == [2000, 2300, 2301, 2302]
    assert batch.inputs.attention_mask.sum(-1).tolist() == [3, 3, 3, 3, 4]


@pytest.mark.parametrize("size", [1, 5, 7, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shard_covers_every_index_exactly_once_as_real(size, world_size):
    dataset = PairDataset(hand_tokenized([(1, 1, 1)] * size))
    shards = [EvalShard(dataset, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1  # every rank runs as many batches
    assert len(shards[0]) == math.ceil(size / world_size)
    real, repeats = Counter(), 0
    for shard in shards:
        for j in range(len(shard)):
            item = shard[j]
            index = int(item["prompt"][0]) // 1000 - 1
            if item["is_real"]:
                real[index] += 1
            else:
                repeats += 1
    assert real == Counter(range(size))
    assert repeats == len(shards[0]) * world_size - size


def test_collator_passes_is_real_flags():
    dataset = PairDataset(hand_tokenized([(1, 1, 1)] * 3))
    shard = EvalShard(dataset, rank=1, world_size=2)  # positions 1 and 3: the second is a repeat
    batch = PairCollator(0)([shard[0], shard[1]])
    assert batch.real.tolist() == [True, False] and batch.index.tolist() == [1, 0]
    assert batch.inputs.input_ids.shape[0] == 4


# --------------------------------------------------------------------------------------------
# create_reward_datasets end to end, with its cache
# --------------------------------------------------------------------------------------------


def make_source(folder, train: int, evaluation: int, tag: str = "") -> tuple[str, list[dict], list[dict]]:
    train_rows, eval_rows = numbered_rows(train, tag + "train "), numbered_rows(evaluation, tag + "eval ")
    write_jsonl(os.path.join(folder, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(folder, "eval.jsonl"), eval_rows)
    return str(folder), train_rows, eval_rows


def build(paths, out, tokenizer, max_seq_len=128, data_split="2,4,4", seed=1234, repo_root=None):
    source = DataSource(tuple(paths), data_split, seed, str(out), str(repo_root or out), log=QUIET)
    return create_reward_datasets(source, tokenizer, max_seq_len, EOT)


def prompt_lists(dataset) -> list[list[int]]:
    return [dataset[i]["prompt"].tolist() for i in range(len(dataset))]


def cache_files(out) -> set[str]:
    return {name for name in os.listdir(out) if name.endswith(".npz")}


def test_create_reward_datasets_returns_the_phase_2_slices(tmp_path, tokenizers):
    tok = tokenizers["opt"]
    folder, train_rows, eval_rows = make_source(tmp_path / "src", 60, 20)
    train, evaluation = build([folder], tmp_path / "out", tok)
    assert isinstance(train, PairDataset) and isinstance(evaluation, PairDataset)
    prefix = [tok.convert_tokens_to_ids("</s>")]
    for dataset, rows in ((train, train_rows), (evaluation, eval_rows)):
        expected = [rows[i] for i in reference_phase(len(rows), "2,4,4", 1, 1234)]
        assert len(dataset) == len(expected)
        assert prompt_lists(dataset) == [prefix + ids(tok, row["prompt"]) for row in expected]
        item = dataset[0]
        assert [r.tolist() for r in item["responses"]] == [ids(tok, expected[0]["chosen"] + EOT),
                                                           ids(tok, expected[0]["rejected"] + EOT)]


def test_single_file_source_carves_eval_out_of_train(tmp_path, tokenizers):
    tok = tokenizers["gpt2"]
    rows = numbered_rows(50)
    name = write_jsonl(tmp_path / "pairs.jsonl", rows)
    train, evaluation = build([name], tmp_path / "out", tok, data_split="0,1,0")
    # A tenth of the file is held out (seeded 9:1 split), then --data_split applies to each part.
    carved = [[rows[i] for i in reference_phase(50, "9,1,0", part, 1234)] for part in (0, 1)]
    expected_train, expected_eval = ([part[i] for i in reference_phase(len(part), "0,1,0", 1, 1234)]
                                     for part in carved)
    assert prompt_lists(train) == [ids(tok, row["prompt"]) for row in expected_train]
    assert prompt_lists(evaluation) == [ids(tok, row["prompt"]) for row in expected_eval]
    assert len(train) == 45 and len(evaluation) == 5
    assert not {tuple(p) for p in prompt_lists(train)} & {tuple(p) for p in prompt_lists(evaluation)}


def test_create_reward_datasets_reuses_its_cache(tmp_path, tokenizers, monkeypatch):
    folder, _, _ = make_source(tmp_path / "src", 40, 10)
    out = tmp_path / "out"
    first_train, _ = build([folder], out, tokenizers["opt"])
    files = cache_files(out)
    assert len(files) == 2
    stamps = {name: os.stat(out / name).st_mtime_ns for name in files}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(build_module, "load_examples", no_rebuild)
    second_train, _ = build([folder], out, tokenizers["opt"])
    assert cache_files(out) == files
    assert {name: os.stat(out / name).st_mtime_ns for name in files} == stamps
    assert prompt_lists(second_train) == prompt_lists(first_train)


def test_changed_inputs_give_a_new_cache_file(tmp_path, tokenizers):
    folder, _, _ = make_source(tmp_path / "src", 40, 10)
    out = tmp_path / "out"
    build([folder], out, tokenizers["opt"])
    seen = cache_files(out)
    assert len(seen) == 2

    def new_files(**kwargs) -> set[str]:
        nonlocal seen
        build([folder], out, **kwargs)
        now = cache_files(out)
        added = now - seen
        seen = now
        return added

    assert len(new_files(tokenizer=tokenizers["opt"], max_seq_len=96)) == 2
    gpt2_files = new_files(tokenizer=tokenizers["gpt2"])
    assert len(gpt2_files) == 2
    train_file = os.path.join(folder, "train.jsonl")
    stat = os.stat(train_file)
    os.utime(train_file, (stat.st_atime, stat.st_mtime + 100))
    assert len(new_files(tokenizer=tokenizers["gpt2"])) == 2


def test_multiple_data_paths_are_concatenated_and_shuffled(tmp_path, tokenizers):
    tok = tokenizers["gpt2"]
    sources = [make_source(tmp_path / "a", 30, 10, "alpha "), make_source(tmp_path / "b", 45, 15, "beta ")]
    train, evaluation = build([s[0] for s in sources], tmp_path / "out", tok)
    for dataset, part in ((train, 1), (evaluation, 2)):
        pieces = [[rows[i] for i in reference_phase(len(rows), "2,4,4", 1, 1234)]
                  for rows in (source[part] for source in sources)]
        assert len(dataset) == len(pieces[0]) + len(pieces[1])
        joined = pieces[0] + pieces[1]
        order = np.arange(len(joined), dtype=np.uint32)
        np.random.RandomState(seed=1234).shuffle(order)
        assert prompt_lists(dataset) == [ids(tok, joined[i]["prompt"]) for i in order]
        names = {dataset[i]["source"] for i in range(len(dataset))}
        assert names == {0, 1}


def test_max_seq_len_too_small_for_any_pair_is_a_user_error(tmp_path, tokenizers):
    folder, _, _ = make_source(tmp_path / "src", 20, 10)
    with pytest.raises(UserError, match="max_seq_len") as err:
        build([folder], tmp_path / "out", tokenizers["opt"], max_seq_len=3)
    assert "\n" not in str(err.value)


def test_create_reward_datasets_with_only_identical_pairs_is_a_user_error(tmp_path, tokenizers):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["chosen"]} for r in numbered_rows(30)]
    name = write_jsonl(tmp_path / "src" / "train.jsonl", rows)
    write_jsonl(tmp_path / "src" / "eval.jsonl", rows[:10])
    with pytest.raises(UserError, match="no usable pairs") as err:
        build([str(tmp_path / "src")], tmp_path / "out", tokenizers["opt"])
    assert name in str(err.value) and "identical" in str(err.value)


# `local/jsonfile` reads <repo_root>/data/*.json: editing those files must rebuild the tokenised cache.
def test_local_jsonfile_edit_rebuilds_cache(tmp_path, tokenizers):
    tok = tokenizers["gpt2"]
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(numbered_rows(40)))
    (data / "eval.json").write_text(json.dumps(numbered_rows(20, "eval ")))
    out = tmp_path / "out"
    train, _ = build(["local/jsonfile"], out, tok, data_split="0,1,0", repo_root=tmp_path / "repo")
    assert len(train) == 40
    (data / "train.json").write_text(json.dumps(numbered_rows(60, "new ")))
    stat = os.stat(data / "train.json")
    os.utime(data / "train.json", (stat.st_atime, stat.st_mtime + 100))
    train, _ = build(["local/jsonfile"], out, tok, data_split="0,1,0", repo_root=tmp_path / "repo")
    assert len(train) == 60


# --------------------------------------------------------------------------------------------
# The real Anthropic HH-RLHF sample (beside the repository only)
# --------------------------------------------------------------------------------------------


def test_real_hh_rlhf_sample_becomes_pairs(tmp_path):
    path = needs_shared_data("hh_rlhf_harmless_sample.jsonl.gz")
    raw = load_source(str(path), str(tmp_path))
    assert len(raw.train) == 1000 and raw.eval is None
    examples, _ = summarised(raw)
    assert len(examples) > 950
    for example in examples:
        assert example["prompt"].endswith("\n\nAssistant:")
        assert example["prompt"].startswith("\n\nHuman:")
        chosen, rejected = example["responses"]
        assert chosen.strip() != rejected.strip()
    by_text = {(row["chosen"], row["rejected"]) for _, row in raw.train}
    for example in examples:
        chosen, rejected = example["responses"]
        assert (example["prompt"] + chosen, example["prompt"] + rejected) in by_text
