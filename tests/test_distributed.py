"""Two ranks under ZeRO-3 with `--eval_interval`, as the deepspeed launcher starts them: evaluation runs
mid-training (under no_grad, since inference mode breaks ZeRO-3's parameter gathering) and
training goes on; on ranked lists of mixed lengths and on step-labelled solutions the two ranks
score different numbers of rows, and the gathered metrics count every held-out example once,
exactly as a one-rank computation with the saved model over the same split."""

from __future__ import annotations

import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, rounding_tolerance
from rlhf_reward.utils.data.build import DataSource, StepOptions, create_reward_datasets, create_step_datasets
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.data.sampler import LengthGroupedBatches
from rlhf_reward.utils.data.steps import UNLABELLED, StepCollator
from rlhf_reward.utils.data.synthetic import CONTENT, POLITE, REQUESTS, RUDE, is_held_out, make_pairs, make_ranked_rows
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from test_objectives import write_source
from test_train import COMMON, assert_reproduces, train, trained_dtype
from torch.utils.data import DataLoader

from step2_reward_model.flags import parse_training_args
from step2_reward_model.heldout import batch_rows, held_out_table
from step2_reward_model.main import make_loaders
from step2_reward_model.objectives import objective_for
from step2_reward_model.objectives.base import Datasets
from step2_reward_model.objectives.process import Process, step_counts
from step2_reward_model.output import load_reward_model
from step2_reward_model.training import Placement

RANKS, BATCH, EVAL_INTERVAL = 2, 8, 10
FLAGS = ["--zero_stage", "3", "--per_device_train_batch_size", str(BATCH), "--eval_interval", str(EVAL_INTERVAL),
         "--print_loss"]
STEP_FLAGS = ["--process_reward", "--max_seq_len", "64", "--learning_rate", "3e-3"]


def mixed_rows(ranked: int, pairs: int, seed: int, held_out: bool) -> list[dict]:
    """Ranked lists of four answers (every fourth best-of-N, with ties), a third of them cut to three
    by dropping a worst answer, some with their two best answers tied, and plain pairs, shuffled
    together: examples of 2, 3 and 4 rows."""
    rows = make_ranked_rows(ranked, seed, held_out=held_out)
    for row in rows[1::3]:
        worst = row["ranks"].index(max(row["ranks"]))
        del row["responses"][worst], row["ranks"][worst]
    for row in rows[2::5]:  # the two best answers tie: a list with no one best
        if 2 in row["ranks"]:
            row["ranks"] = [0 if rank == 1 else rank for rank in row["ranks"]]
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
    return {"out": out, "final": meta["final_eval"], "log": log, "stats": stats, "args": args, "data": data,
            "tokenizer": tokenizer, "train_set": train_set, "eval_set": eval_set}


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, model_dirs) -> dict:
    return run(tmp_path_factory, "ranked", model_dirs["opt"], mixed_rows(300, 300, 0, False),
               mixed_rows(45, 30, 1, True), "--loss", "end_token")


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
    objective = objective_for(args)
    data = Datasets(result["train_set"], result["eval_set"], [], objective)
    counts = []
    for rank in range(RANKS):
        _, _, loader = make_loaders(args, data, collator(result["tokenizer"].pad_token_id), False,
                                    Placement(rank, RANKS, torch.device("cpu")))
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
    row_counts = rows_per_rank(ranked_run, lambda batch: int(batch.real[batch.targets.group].sum()))
    ranks = eval_set.data.ranks
    assert len(eval_set) % RANKS == 1  # the last shard is padded with a repeat
    assert row_counts[0] != row_counts[1] and sum(row_counts) == sum(map(len, ranks))
    assert {len(r) for r in ranks} == {2, 3, 4} and any(len(set(r)) < len(r) for r in ranks)  # lengths, ties
    assert any((r == r.min()).sum() > 1 for r in ranks)  # ties at the top

    ordered_pairs = sum(int((r[:, None] < r[None, :]).sum()) for r in ranks)
    assert (final["pairs"], final["ordered_pairs"]) == (len(eval_set), ordered_pairs)
    best = sum(int((r == r.min()).sum()) for r in ranks)  # answers at their list's best rank (ties at the top)
    worst = sum(int((r == r.max()).sum()) for r in ranks)  # best-of-N lists tie at the worst rank
    assert (stats["pairs"], stats["all"]["count"], stats["chosen"]["count"], stats["rejected"]["count"]) == (
        len(eval_set), sum(map(len, ranks)), best, worst)


def assert_same_numbers(trained, again, dtype: torch.dtype, pairs: int, key: str = "") -> None:
    """Two computations of the same held-out numbers: counts and labels equal, an accuracy within one
    pair scored the other way round (a near tie may flip with rounding), rewards to `dtype`'s rounding."""
    if isinstance(trained, dict):
        assert trained.keys() == again.keys(), key
        for name in trained:
            assert_same_numbers(trained[name], again[name], dtype, pairs, f"{key}/{name}")
    elif isinstance(trained, float) and "accuracy" in key:
        assert again == pytest.approx(trained, abs=1.5 / pairs), key
    elif isinstance(trained, float):
        assert again == pytest.approx(trained, abs=rounding_tolerance(trained, dtype=dtype)), key
    else:
        assert again == trained, key


def test_training_rw_eval_and_export_compute_the_same_held_out_numbers(ranked_run, tmp_path):
    """One held-out path: training's final evaluation on two ranks, `rw_eval.py --data_path` and
    `export.py --data_path` on the saved model give the same metrics and reward_stats.json, on ranked
    lists of 2, 3 and 4 answers with ties at the top and at the bottom."""
    import rw_eval
    from step2_reward_model import export

    out, final, stats, data = ranked_run["out"], ranked_run["final"], ranked_run["stats"], ranked_run["data"]
    flags = ["--data_path", data, "--data_split", ranked_run["args"].data_split, "--data_output_path",
             str(tmp_path / "cache")]
    assert rw_eval.main(["--model_path", str(out), *flags, "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    (copy / "reward_stats.json").unlink()
    assert export.main([str(copy), *flags]) == 0
    exported = json.loads((copy / "reward_stats.json").read_text())
    dtype, pairs = trained_dtype(RANKS), int(final["ordered_pairs"])
    assert_same_numbers(final, report["held_out"], dtype, pairs)
    assert_same_numbers(stats, report["reward_stats"], dtype, pairs)
    assert_same_numbers(stats, exported, dtype, pairs)
    assert report["ranking"]["ordered_pairs"] == final["ordered_pairs"]
    assert report["summary"]["pairs"] == stats["pairs"] == len(ranked_run["eval_set"])


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
    row_counts = rows_per_rank(step_run, lambda batch: int((batch.targets.mask &
                                                             batch.real[batch.targets.rows]).sum()))
    labels = labelled_steps(eval_set)
    assert len(eval_set) % RANKS == 1  # the last shard is padded with a repeat
    assert row_counts[0] != row_counts[1] and sum(row_counts) == len(labels)
    assert (final["solutions"], final["steps"]) == (len(eval_set), len(labels))
    assert (stats["all"]["count"], stats["chosen"]["count"]) == (len(labels), int((labels == 1).sum()))

    model = load_reward_model(str(step_run["out"]))
    loader = DataLoader(eval_set, batch_size=32, collate_fn=StepCollator(step_run["tokenizer"].pad_token_id))
    table = held_out_table(batch_rows(lambda batch: model(batch.inputs, batch.layout), Process(), model, loader,
                                      torch.device("cpu")))
    sums = step_counts(table)
    assert (sums["solutions"], sums["steps"]) == (final["solutions"], final["steps"])
    logits = table[np.argsort(table[:, 1], kind="stable"), 0]  # in the data set's order, as `labels`
    # Steps as pairs: the step accuracy, and the mean logit of good and of bad steps (reward_stats.json).
    assert_reproduces({"pairs": final["steps"], "accuracy": final["accuracy"], "chosen": stats["chosen"]["mean"],
                       "rejected": stats["rejected"]["mean"]},
                      {"pairs": sums["steps"], "accuracy": sums["steps_correct"] / sums["steps"],
                       "chosen": logits[labels == 1].mean(), "rejected": logits[labels == 0].mean()},
                      trained_dtype(RANKS))
    for key, name in (("first_error_accuracy", "first_error_correct"), ("solution_accuracy", "solutions_correct")):
        assert final[key] == pytest.approx(sums[name] / sums["solutions"], abs=1.5 / final["solutions"]), key
