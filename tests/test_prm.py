"""Process reward models: step-wise rows, their tokenisation and batches, step scores, metrics, and learning.

Expected values are written by hand or computed by calling the tokenizer on the pieces directly, never by the
function under test. The learning test trains a tiny model on a synthetic step task and checks it on held-out
rows.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, needs_shared_data, objective_forward, rounding_tolerance
from rlhf_reward.utils.data.collate import EvalShard
from rlhf_reward.utils.data.examples import tally
from rlhf_reward.utils.data.sources import load_source
from rlhf_reward.utils.data.steps import (
    StepCollator,
    StepDataset,
    StepExample,
    TokenizedSteps,
    judge_step_rows,
    load_steps,
    save_steps,
    tokenize_steps,
)
from rlhf_reward.utils.data.synthetic import make_step_rows
from rlhf_reward.utils.data.tokenize import special_affixes
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.tiny import tiny_config, train_tokenizer
from transformers import AutoModel

from step2_reward_model.heldout import batch_rows, held_out_table
from step2_reward_model.model import RewardModel
from step2_reward_model.objectives.process import Process, step_counts

SEP = "\n\n"
EXAMPLES = [
    StepExample(prompt="What is 2 plus 3 and then 4 plus 5?", steps=["2 plus 3 is 5.", "4 plus 5 is 9."],
                labels=[1, 0], source="math"),
    StepExample(prompt="Tell me something about cats.", steps=["Cats purr.", "They have fur.", "Boats sail."],
                labels=[1, 1, None], source="cats"),
]


def tagged(rows: list) -> list[tuple[str, object]]:
    return [(f"steps.jsonl:line {i + 1}", row) for i, row in enumerate(rows)]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def step_text(rows: list[dict]) -> list[str]:
    return [row["prompt"] + SEP + "".join(step + SEP for step in row["steps"]) for row in rows]


# ---------------------------------------------------------------- cleaning

def test_label_conventions_and_neutral_policy():
    rows = [{"prompt": "p", "steps": ["a", "b", "c"], "labels": [True, False, None]},
            {"prompt": "p", "completions": ["a", "b", "c", "d"], "labels": [1, 0, -1, None]},
            {"prompt": "p", "steps": ["a", "b"], "labels": [1.0, -1.0]}]
    for neutral, zero in (("positive", 1), ("negative", 0), ("ignore", None)):
        examples, dropped = tally(judge_step_rows(tagged(rows), "src", neutral=neutral))
        assert dropped == Counter()
        assert [ex["labels"] for ex in examples] == [[1, 0, None], [1, zero, 0, None], [1, 0]]
    assert examples[1] == {"prompt": "p", "steps": ["a", "b", "c", "d"], "labels": [1, None, 0, None], "source": "src"}
    with pytest.raises(ValueError, match="neutral"):
        judge_step_rows(tagged(rows), "src", neutral="maybe")


def test_every_drop_reason_is_counted():
    rows = [["a list"], "text",
            {"steps": ["a"], "labels": [1]}, {"prompt": "p", "labels": [1]}, {"prompt": "p", "steps": ["a"]},
            {"prompt": 3, "steps": ["a"], "labels": [1]}, {"prompt": "p", "steps": "a", "labels": [1]},
            {"prompt": "p", "steps": ["a"], "labels": 1}, {"prompt": "p", "steps": [1], "labels": [1]},
            {"prompt": "p", "steps": ["a", "b"], "labels": [1]},
            {"prompt": " \n", "steps": ["a"], "labels": [1]},
            {"prompt": "p", "steps": [], "labels": []},
            {"prompt": "p", "steps": ["a", " "], "labels": [1, 1]},
            {"prompt": "p", "steps": ["a"], "labels": [2]}, {"prompt": "p", "steps": ["a"], "labels": ["good"]},
            {"prompt": "p", "steps": ["a", "b"], "labels": [None, None]},
            {"prompt": "p", "steps": ["a"], "labels": [1]}]
    examples, dropped = tally(judge_step_rows(tagged(rows), "src", bad_rows="skip"))
    assert len(examples) == 1
    assert dropped == Counter({"row is not an object": 2, "missing field 'prompt'": 1, "missing field 'steps'": 1,
                               "missing field 'labels'": 1, "field 'prompt' is a number": 1,
                               "field 'steps' is text": 1, "field 'labels' is a number": 1,
                               "an item of field 'steps' is a number": 1,
                               "fields 'labels' and 'steps' differ in length": 1, "empty prompt": 1, "no steps": 1,
                               "empty step": 1,
                               "an item of field 'labels' is not a step label": 2, "no labelled step": 1})
    with pytest.raises(UserError, match=r"^steps\.jsonl, line 1: row is not an object \(it is a list\)"):
        judge_step_rows(tagged(rows), "src")
    neutral_only = [{"prompt": "p", "steps": ["a", "b"], "labels": [0, None]}]
    outcomes = judge_step_rows(tagged(neutral_only), "src", neutral="ignore")
    assert tally(outcomes) == ([], Counter({"no labelled step": 1}))


def test_prm800k_sample(tokenizers):
    path = needs_shared_data("prm800k_phase1_test_steps.jsonl.gz")
    raw = load_source(str(path), str(REPO_ROOT))
    assert raw.eval is None
    examples, dropped = tally(judge_step_rows(raw.train, raw.name))
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    rated = [row for row in rows if any(label is not None for label in row["labels"])]
    assert dropped == Counter({"no labelled step": len(rows) - len(rated)}) and len(examples) == len(rated) > 3000
    raw_labels = Counter(label for row in rated for label in row["labels"])
    labels = Counter(label for ex in examples for label in ex["labels"])
    assert labels == {1: raw_labels[1] + raw_labels[0], 0: raw_labels[-1], None: raw_labels[None]}
    assert 0.3 < sum(0 in ex["labels"] for ex in examples) / len(examples) < 0.7  # trajectories end at an error
    for ex in examples:  # a bad step is always the last rated one
        rated_steps = [label for label in ex["labels"] if label is not None]
        assert 0 not in rated_steps[:-1]
    tokenized = tokenize_steps(examples[:300], tokenizers["opt"], 256)
    assert len(tokenized) + tokenized.too_long == 300 and tokenized.truncated > 0
    for sequence, positions in zip(tokenized.sequences, tokenized.positions, strict=True):
        assert len(sequence) <= 256 and positions[-1] < len(sequence)


# ---------------------------------------------------------------- tokenisation

@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_positions_are_the_last_token_of_each_step(tokenizers, family):
    tokenizer = tokenizers[family]
    prefix, suffix = special_affixes(tokenizer)
    assert tokenizer.convert_ids_to_tokens(prefix) == (["</s>"] if family == "opt" else [])
    out = tokenize_steps(EXAMPLES, tokenizer, 128)
    assert (len(out), out.truncated, out.too_long) == (2, 0, 0)
    assert out.sources == [0, 1] and out.source_names == ["math", "cats"]
    assert [lab.tolist() for lab in out.labels] == [[1.0, 0.0], [1.0, 1.0, -1.0]]
    for ex, sequence, positions in zip(EXAMPLES, out.sequences, out.positions, strict=True):
        pieces = [ids(tokenizer, ex["prompt"] + SEP)] + [ids(tokenizer, step + SEP) for step in ex["steps"]]
        assert sequence.tolist() == prefix + [i for piece in pieces for i in piece] + suffix
        ends = len(prefix) + np.cumsum([len(piece) for piece in pieces])
        assert positions.tolist() == (ends[1:] - 1).tolist()
        for step, position in zip(ex["steps"], positions, strict=True):
            assert tokenizer.decode(sequence[:position + 1]).endswith(step + SEP)


def test_truncation_cuts_the_prompt_then_whole_steps(tokenizers):
    tokenizer = tokenizers["opt"]
    example = StepExample(prompt="What is 2 plus 3, then 4 plus 5, then both?",
                          steps=["2 plus 3 is 5.", "4 plus 5 is 9.", "5 and 9 make 14."], labels=[1, 1, 0], source="s")
    prompt = ids(tokenizer, example["prompt"] + SEP)
    steps = [ids(tokenizer, step + SEP) for step in example["steps"]]
    everything = [i for step in steps for i in step]
    bos = [tokenizer.bos_token_id]

    exact = tokenize_steps([example], tokenizer, 1 + len(prompt) + len(everything))
    assert exact.truncated == 0 and exact.sequences[0].tolist() == bos + prompt + everything

    cut_prompt = tokenize_steps([example], tokenizer, 1 + 3 + len(everything))
    assert cut_prompt.truncated == 1 and cut_prompt.sequences[0].tolist() == bos + prompt[-3:] + everything
    assert cut_prompt.labels[0].tolist() == [1.0, 1.0, 0.0]

    two_steps = tokenize_steps([example], tokenizer, len(bos + steps[0] + steps[1]))
    assert two_steps.truncated == 1 and two_steps.sequences[0].tolist() == bos + steps[0] + steps[1]
    assert two_steps.positions[0].tolist() == [len(steps[0]), len(steps[0]) + len(steps[1])]
    assert two_steps.labels[0].tolist() == [1.0, 1.0]
    room = len(steps[2]) - 1  # a dropped step's room goes back to the prompt
    assert room < len(prompt)
    freed = tokenize_steps([example], tokenizer, len(bos + everything) - 1)
    assert freed.sequences[0].tolist() == bos + prompt[-room:] + steps[0] + steps[1]

    nothing_fits = tokenize_steps([example], tokenizer, len(steps[0]))
    assert (len(nothing_fits), nothing_fits.too_long) == (0, 1)
    unlabelled_head = StepExample(**{**example, "labels": [None, 1, 0]})
    only_unlabelled = tokenize_steps([unlabelled_head, example], tokenizer, 1 + len(steps[0]))
    assert (len(only_unlabelled), only_unlabelled.too_long) == (1, 1)
    assert only_unlabelled.sequences[0].tolist() == bos + steps[0]


def test_last_step_only(tokenizers):
    tokenizer = tokenizers["gpt2"]
    example = StepExample(prompt="Count to three.", steps=["One.", "Two.", "Four."], labels=[1, 0, None], source="s")
    out = tokenize_steps([example], tokenizer, 64, last_step_only=True)
    assert out.labels[0].tolist() == [-1.0, 0.0, -1.0]
    first_step = len(ids(tokenizer, "One." + SEP))
    assert tokenize_steps([example], tokenizer, first_step).labels[0].tolist() == [1.0]
    dropped = tokenize_steps([example], tokenizer, first_step, last_step_only=True)
    assert (len(dropped), dropped.too_long) == (0, 1)  # its label was the last step's, which does not fit


def test_npz_round_trip(tmp_path, tokenizers):
    tokenized = tokenize_steps(EXAMPLES, tokenizers["opt"], 128)
    tokenized.truncated, tokenized.too_long = 3, 4
    for original in (tokenized, TokenizedSteps()):
        path = str(tmp_path / "steps.npz")
        save_steps(original, path)
        assert os.listdir(tmp_path) == ["steps.npz"]
        loaded = load_steps(path)
        assert (loaded.sources, loaded.source_names, loaded.truncated, loaded.too_long) == (
            original.sources, original.source_names, original.truncated, original.too_long)
        for name in ("sequences", "positions", "labels"):
            assert len(getattr(loaded, name)) == len(getattr(original, name))
            for got, expected in zip(getattr(loaded, name), getattr(original, name), strict=True):
                np.testing.assert_array_equal(got, expected)
                assert got.dtype == expected.dtype


# ---------------------------------------------------------------- batches and step scores

def test_collator(tokenizers):
    tokenizer = tokenizers["opt"]
    dataset = StepDataset(tokenize_steps(EXAMPLES, tokenizer, 128))
    batch = StepCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    lengths = [len(dataset[i]["input_ids"]) for i in range(2)]
    width = 8 * -(-max(lengths) // 8)
    inputs, steps = batch.inputs, batch.targets
    assert inputs.input_ids.shape == inputs.attention_mask.shape == (2, width)
    assert inputs.attention_mask.sum(-1).tolist() == lengths
    assert inputs.input_ids[0, lengths[0]:].eq(tokenizer.pad_token_id).all()
    assert steps.rows.tolist() == [0, 0, 1, 1, 1]
    assert steps.positions.tolist() == dataset[0]["positions"].tolist() + dataset[1]["positions"].tolist()
    assert steps.labels.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert steps.mask.tolist() == [True, True, True, True, False]
    assert steps.rows.dtype == steps.positions.dtype == torch.long
    assert steps.labels.dtype == torch.float32 and steps.mask.dtype == torch.bool
    assert batch.real is None and batch.index.tolist() == [0, 1]
    shards = [EvalShard(dataset, rank, world_size=3)[0] for rank in (0, 2)]  # rank 2's only item is a repeat
    assert StepCollator(None)(shards).real.tolist() == [True, False]


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_step_logits_are_the_values_at_step_ends(tokenizers, family):
    """Each step's logit is the end score of the sequence cut right after that step: what step 3's
    `forward_value` reads, whatever padding or later steps surround it."""
    tokenizer = tokenizers[family]
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(tiny_config(family, tokenizer))).eval()
    torch.nn.init.normal_(model.v_head.weight)
    dataset = StepDataset(tokenize_steps(EXAMPLES, tokenizer, 128))
    batch = StepCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    with torch.no_grad():
        logits = objective_forward(model, batch, Process())["scores"]
        expected = [model.forward_value(torch.from_numpy(item["input_ids"][:position + 1]).long()[None])
                    ["chosen_end_scores"][0] for item in (dataset[0], dataset[1]) for position in item["positions"]]
    assert logits.shape == (5,)
    torch.testing.assert_close(logits, torch.stack(expected), atol=rounding_tolerance(*expected), rtol=0)
    assert logits.unique().numel() == 5


def test_step_metrics_by_hand():
    unlabelled = None
    rows = [  # (labels, logits); hand-counted below
        ([1, 1, 1], [2.0, 1.0, 3.0]),  # no error, predicted so: 3 of 3 steps, solution right, first error right
        ([1, 1, 0], [1.0, -1.0, -2.0]),  # error predicted one step early: 2 of 3, solution right, first error wrong
        ([1, 0, unlabelled, unlabelled], [0.5, -0.5, 5.0, -5.0]),  # unlabelled tail ignored: 2 of 2, right, right
        ([unlabelled], [-1.0]),  # no labelled step: not a solution
        ([1, 0], [1.0, 1.0]),  # error missed: 1 of 2, solution wrong, first error wrong
        ([0], [0.0]),  # sigmoid(0) = 0.5 is not > 0.5, so predicted bad: 1 of 1, right, right
    ]
    table = np.array([(logit, solution, label, step) for solution, (labels, logits) in enumerate(rows)
                      for step, (label, logit) in enumerate(zip(labels, logits, strict=True)) if label is not None],
                     dtype=np.float64)
    shuffled = table[np.random.default_rng(0).permutation(len(table))]  # rows of several ranks come in any order
    for rows_in_some_order in (table, shuffled):
        assert step_counts(rows_in_some_order) == {
            "steps": 11, "steps_correct": 9, "solutions": 5, "solutions_correct": 4, "first_error_correct": 3}


# ---------------------------------------------------------------- learning

def test_a_tiny_prm_learns_to_spot_wrong_steps(tokenizers):
    """A 64-wide, 2-layer model trained as --process_reward trains it (StepCollator batches into RewardModel.forward,
    whose step loss is backpropagated) finds wrong steps of held-out rows, read from forward's step logits."""
    train_rows, held_out_rows = make_step_rows(4000, seed=0), make_step_rows(400, seed=1, held_out=True)
    assert not {json.dumps(row) for row in train_rows} & {json.dumps(row) for row in held_out_rows}
    tokenizer = train_tokenizer(step_text(make_step_rows(500, seed=2)), "opt")

    def tokenized(rows: list[dict]) -> TokenizedSteps:
        examples, dropped = tally(judge_step_rows(tagged(rows), "synthetic"))
        assert not dropped
        return tokenize_steps(examples, tokenizer, 64)

    train, held_out = tokenized(train_rows), tokenized(held_out_rows)
    collate = StepCollator(tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(tiny_config("opt", tokenizer, hidden=64, layers=2)))
    updates = 500
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=updates, pct_start=0.1)
    loader = torch.utils.data.DataLoader(StepDataset(train), batch_size=32, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    done = 0
    while done < updates:
        for batch in loader:
            if done == updates:
                break
            loss = objective_forward(model, batch, Process())["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1

    model.eval()
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(StepDataset(held_out), batch_size=100, collate_fn=collate)
        local = batch_rows(lambda batch: model(batch.inputs, batch.layout), Process(), model, loader,
                           torch.device("cpu"))
    totals = step_counts(held_out_table(local))
    labels = np.concatenate(held_out.labels)
    majority = max((labels == 1).sum(), (labels == 0).sum()) / (labels >= 0).sum()
    step_accuracy = totals["steps_correct"] / totals["steps"]
    print(f"held-out: step accuracy {step_accuracy:.3f} (majority {majority:.3f}), "
          f"first error {totals['first_error_correct'] / totals['solutions']:.3f}, "
          f"solution {totals['solutions_correct'] / totals['solutions']:.3f}, {int(totals['steps'])} labelled steps")
    assert step_accuracy >= 0.85 and step_accuracy > majority + 0.1
