"""Two ranks under ZeRO-3 with `--eval_interval`, through the deepspeed launcher: evaluation runs
mid-training (under no_grad, since inference mode breaks ZeRO-3's parameter gathering) and
training goes on; on ranked lists of mixed lengths and on step-labelled solutions the two ranks
score different numbers of rows, and the gathered metrics count every held-out example once,
exactly as a one-rank computation with the saved model over the same split."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_objectives import write_source
from test_train import COMMON, assert_reproduces, train, trained_dtype
from torch.utils.data import DataLoader

from step2_reward_model.evaluate import ranking_summary
from step2_reward_model.flags import parse_training_args
from step2_reward_model.main import make_loaders
from step2_reward_model.metrics import step_metrics
from step2_reward_model.output import load_reward_model
from utils.data.build import DataSource, StepOptions, create_reward_datasets, create_step_datasets
from utils.data.collate import PairCollator
from utils.data.sampler import LengthGroupedBatches
from utils.data.steps import UNLABELLED, StepCollator
from utils.data.synthetic import CONTENT, POLITE, REQUESTS, RUDE, is_held_out, make_pairs, make_ranked_rows
from utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer

RANKS, BATCH, EVAL_INTERVAL = 2, 8, 10
FLAGS = ["--zero_stage", "3", "--per_device_train_batch_size", str(BATCH), "--eval_interval", str(EVAL_INTERVAL),
         "--print_loss"]
STEP_FLAGS = ["--process_reward", "--max_seq_len", "64", "--learning_rate", "3e-3"]


def mixed_rows(ranked: int, pairs: int, seed: int, held_out: bool) -> list[dict]:
    """Ranked lists of four answers (every fourth best-of-N, with ties), a third of them cut to three
    by dropping a worst answer, and plain pairs, shuffled together: examples of 2, 3 and 4 rows."""
    rows = make_ranked_rows(ranked, seed, held_out=held_out)
    for row in rows[1::3]:
        worst = row["ranks"].index(max(row["ranks"]))
        del row["responses"][worst], row["ranks"][worst]
    rows += make_pairs(pairs, seed, held_out=held_out)
    random.Random(seed).shuffle(rows)
    return rows


def rude_step_rows(count: int, seed: int, held_out: bool = False) -> list[dict]:
    """Step-labelled answers to the synthetic requests: a rude sentence is the wrong step (-1), the
    steps after it unlabelled (null), as in PRM800K. Unlike utils.data.steps' addition chains
    (about 500 updates to learn), a tiny model learns this within an epoch."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        n = rng.randint(2, 4)
        wrong_at = rng.randrange(n) if rng.random() < 0.6 else None
        steps = [rng.choice(RUDE) if k == wrong_at else rng.choice(POLITE + CONTENT) for k in range(n)]
        labels = [None if wrong_at is not None and k > wrong_at else -1 if k == wrong_at else 1 for k in range(n)]
        row = {"prompt": f"\n\nHuman: {rng.choice(REQUESTS)}\n\nAssistant:", "steps": steps, "labels": labels}
        if is_held_out(row) == held_out:
            rows.append(row)
    return rows


def run(tmp_path_factory, name: str, model_dir: str, train_rows: list[dict], eval_rows: list[dict],
        *flags: str) -> dict:
    """Train on two ranks, and rebuild in-process the data sets the run used (from its cache)."""
    tmp_path = tmp_path_factory.mktemp(name)
    data = write_source(tmp_path / "data", train_rows, eval_rows)
    out, meta, log = train(tmp_path, model_dir, data, *FLAGS, *flags, ranks=RANKS)
    with open(out / "reward_stats.json") as handle:
        stats = json.load(handle)
    tokenizer = load_hf_tokenizer(model_dir)
    args = parse_training_args(["--model_name_or_path", model_dir, "--data_path", data, "--data_output_path",
                                str(tmp_path / "cache"), *COMMON, *FLAGS, *flags])  # as train() passes them
    source = DataSource((data,), args.data_split, args.seed, args.data_output_path, str(REPO_ROOT))
    if args.process_reward:
        steps = StepOptions(args.step_separator, args.prm_neutral, args.train_on_last_step_only)
        train_set, eval_set = create_step_datasets(source, tokenizer, args.max_seq_len, steps)
    else:
        train_set, eval_set = create_reward_datasets(source, tokenizer, args.max_seq_len, END_OF_CONVERSATION_TOKEN)
    return {"out": out, "final": meta["final_eval"], "log": log, "stats": stats, "args": args,
            "tokenizer": tokenizer, "train_set": train_set, "eval_set": eval_set}


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, model_dirs) -> dict:
    return run(tmp_path_factory, "ranked", model_dirs["opt"], mixed_rows(300, 300, 0, False),
               mixed_rows(46, 30, 1, True), "--loss", "end_token")


@pytest.fixture(scope="module")
def step_run(tmp_path_factory, model_dirs) -> dict:
    return run(tmp_path_factory, "steps", model_dirs["opt"], rude_step_rows(600, 0), rude_step_rows(75, 1, True),
               *STEP_FLAGS)


def assert_evaluated_mid_training(result: dict, unit: str, count: int) -> None:
    """An "Iter N" report every EVAL_INTERVAL steps, each over the whole held-out set, with training
    going on after each (a loss logged at a later step)."""
    log, train_set = result["log"], result["train_set"]
    steps = len(LengthGroupedBatches(train_set.lengths(), BATCH, 0, RANKS))
    reports = re.findall(rf"^Iter (\d+): .*\((\d+) held-out {unit}", log, re.MULTILINE)
    assert reports == [(str(step), str(count)) for step in range(EVAL_INTERVAL, steps + 1, EVAL_INTERVAL)], log[-3000:]
    assert len(reports) >= 2
    for step, _ in reports[:-1]:
        after = log[log.index(f"\nIter {step}: "):]
        assert f"epoch 1 step {int(step) + EVAL_INTERVAL}: loss" in after
    assert "Epoch 1/1 with loss" in log[log.index(f"\nIter {reports[-1][0]}: "):]


def rows_per_rank(result: dict, count_rows) -> list[int]:
    """How many rows each rank scores in evaluation (its real examples only), from main's own loaders."""
    args, collator = result["args"], (StepCollator if result["args"].process_reward else PairCollator)
    counts = []
    for rank in range(RANKS):
        _, _, loader = make_loaders(args, result["train_set"], result["eval_set"],
                                    collator(result["tokenizer"].pad_token_id), False, rank, RANKS,
                                    torch.device("cpu"))
        counts.append(sum(count_rows(batch) for batch in loader))
    return counts


def labelled_steps(eval_set) -> np.ndarray:
    """The labels (1 good, 0 bad) of every labelled step of the held-out solutions."""
    labels = np.concatenate(eval_set.data.labels)
    return labels[labels != UNLABELLED]


def test_ranked_lists_zero3_evaluate_mid_training_and_learn(ranked_run):
    final = ranked_run["final"]
    assert_evaluated_mid_training(ranked_run, "pairs", len(ranked_run["eval_set"]))
    assert final["accuracy"] >= 0.8 and final["top1_accuracy"] >= 0.75, ranked_run["log"][-3000:]


@torch.no_grad()
def test_ranked_lists_two_rank_metrics_count_every_list_once(ranked_run):
    final, stats, eval_set = ranked_run["final"], ranked_run["stats"], ranked_run["eval_set"]
    row_counts = rows_per_rank(ranked_run, lambda batch: int(batch["is_real"][batch["group"]].sum()))
    ranks = eval_set.data.ranks
    assert len(eval_set) % RANKS == 1  # the last shard is padded with a repeat
    assert row_counts[0] != row_counts[1] and sum(row_counts) == sum(map(len, ranks))
    assert {len(r) for r in ranks} == {2, 3, 4} and any(len(set(r)) < len(r) for r in ranks)  # lengths, ties

    ordered_pairs = sum(int((r[:, None] < r[None, :]).sum()) for r in ranks)
    assert (final["pairs"], final["ordered_pairs"]) == (len(eval_set), ordered_pairs)
    worst = sum(int((r == r.max()).sum()) for r in ranks)  # best-of-N lists tie at the worst rank
    assert (stats["all"]["count"], stats["chosen"]["count"], stats["rejected"]["count"]) == (
        sum(map(len, ranks)), len(eval_set), worst)

    model = load_reward_model(str(ranked_run["out"]))
    table, seen = [], 0
    loader = DataLoader(eval_set, batch_size=32, collate_fn=PairCollator(ranked_run["tokenizer"].pad_token_id))
    for batch in loader:
        source = batch.pop("source")
        scores = model.forward_value(batch["input_ids"], batch["attention_mask"])["chosen_end_scores"].double()
        table.append(torch.stack([scores, (batch["group"] + seen).double(), batch["rank"].double(),
                                  source[batch["group"]].double()], 1))
        seen += len(source)
    one_rank = ranking_summary(torch.cat(table), eval_set.data.source_names)
    assert one_rank["ordered_pairs"] == final["ordered_pairs"]
    assert_reproduces(final, one_rank, trained_dtype(RANKS))  # pairs, accuracy, chosen and rejected means
    assert final["top1_accuracy"] == pytest.approx(one_rank["top1_accuracy"], abs=1.5 / final["pairs"])


def test_steps_zero3_evaluate_mid_training_and_learn(step_run):
    final, eval_set = step_run["final"], step_run["eval_set"]
    assert_evaluated_mid_training(step_run, "solutions", len(eval_set))
    labels = labelled_steps(eval_set)
    always_correct = float((labels == 1).mean())
    assert final["accuracy"] >= max(0.9, always_correct + 0.15), step_run["log"][-3000:]
    assert final["first_error_accuracy"] >= 0.8 and final["solution_accuracy"] >= 0.8, final


@torch.no_grad()
def test_steps_two_rank_metrics_count_every_solution_once(step_run):
    final, stats, eval_set = step_run["final"], step_run["stats"], step_run["eval_set"]
    row_counts = rows_per_rank(step_run, lambda batch: int((batch["step_mask"] &
                                                             batch["is_real"][batch["step_rows"]]).sum()))
    labels = labelled_steps(eval_set)
    assert len(eval_set) % RANKS == 1  # the last shard is padded with a repeat
    assert row_counts[0] != row_counts[1] and sum(row_counts) == len(labels)
    assert (final["solutions"], final["steps"]) == (len(eval_set), len(labels))
    assert (stats["all"]["count"], stats["chosen"]["count"]) == (len(labels), int((labels == 1).sum()))

    model = load_reward_model(str(step_run["out"]))
    sums, logits = {}, []
    for batch in DataLoader(eval_set, batch_size=32, collate_fn=StepCollator(step_run["tokenizer"].pad_token_id)):
        with torch.no_grad():
            batch_logits = model(**batch)["step_logits"]
        counts = step_metrics(batch_logits, batch["step_labels"], batch["step_mask"], batch["step_rows"],
                              len(batch["input_ids"]))
        sums = {name: sums.get(name, 0.0) + float(value) for name, value in counts.items()}
        logits.append(batch_logits[batch["step_mask"]].double())
    assert (sums["solutions"], sums["steps"]) == (final["solutions"], final["steps"])
    logits = torch.cat(logits).numpy()
    # Steps as pairs: the step accuracy, and the mean logit of good and of bad steps (reward_stats.json).
    assert_reproduces({"pairs": final["steps"], "accuracy": final["accuracy"], "chosen": stats["chosen"]["mean"],
                       "rejected": stats["rejected"]["mean"]},
                      {"pairs": sums["steps"], "accuracy": sums["steps_correct"] / sums["steps"],
                       "chosen": logits[labels == 1].mean(), "rejected": logits[labels == 0].mean()},
                      trained_dtype(RANKS))
    for key, name in (("first_error_accuracy", "first_error_correct"), ("solution_accuracy", "solutions_correct")):
        assert final[key] == pytest.approx(sums[name] / sums["solutions"], abs=1.5 / final["solutions"]), key
