"""Each training objective end to end through main.py on the CPU: ranked lists (InstructGPT and
Plackett-Luce), margins, centering, sampling weights, conversational data and process reward
models, each learnt by a tiny model to a held-out accuracy well above chance."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import REPO_ROOT, rw_eval_output
from rlhf_reward.utils.data.build import DataOptions, DataSource, create_reward_datasets
from rlhf_reward.utils.data.chat import TRIM_MARK
from rlhf_reward.utils.data.synthetic import make_pairs, make_ranked_rows, write_jsonl
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from test_train import train

from step2_reward_model.flags import parse_training_args
from step2_reward_model.objectives import objective_for
from step2_reward_model.output import load_reward_model
from step2_reward_model.scoring import Scorer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_source(folder, train_rows: list[dict], eval_rows: list[dict]) -> str:
    write_jsonl(train_rows, os.path.join(folder, "train.jsonl"))
    write_jsonl(eval_rows, os.path.join(folder, "eval.jsonl"))
    return str(folder)


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, model_dirs):
    """Ranked lists (every fourth best-of-N) beside pairs with a margin column, weighted 1:1, with
    the InstructGPT loss, centering and at most three responses per prompt."""
    tmp_path = tmp_path_factory.mktemp("ranked")
    ranked = write_source(tmp_path / "ranked", make_ranked_rows(1200, 0), make_ranked_rows(120, 1, held_out=True))
    margin_rows = [{**row, "margin": 1.0} for row in make_pairs(3000, 0)]
    pairs = write_source(tmp_path / "pairs", margin_rows, [{**row, "margin": 1.0} for row in
                                                           make_pairs(150, 1, held_out=True)])
    out, meta, log = train(tmp_path, model_dirs["opt"], ranked, "--data_path", ranked, pairs,
                           "--data_weights", "1", "1", "--loss", "end_token", "--center_rewards_coefficient", "0.01",
                           "--max_responses_per_prompt", "3", "--num_train_epochs", "2")
    return tmp_path, out, meta, log, ranked, pairs


def test_instructgpt_loss_learns_ranked_lists_with_margins_centering_and_weights(ranked_run):
    tmp_path, out, meta, log, ranked, pairs = ranked_run
    final = meta["final_eval"]
    assert final["pairs"] == 120 + 150  # prompts in the held-out splits
    assert final["accuracy"] >= 0.8, log[-3000:]  # every ordered pair of every prompt
    assert final["top1_accuracy"] >= 0.8, log[-3000:]
    assert final[f"accuracy/{ranked}"] >= 0.8 and f"accuracy/{pairs}" in final
    assert "train examples per source after --data_weights" in log
    with open(out / "reward_stats.json") as handle:
        stats = json.load(handle)
    # centring keeps the rewards near zero relative to their spread
    assert abs(stats["all"]["mean"]) < 0.5 * stats["all"]["std"], stats["all"]


def test_rw_eval_reports_ranking_metrics(ranked_run, capsys):
    tmp_path, out, meta, _, ranked, _ = ranked_run
    report_path = tmp_path / "ranked_report.json"
    rw_eval_output(["--model_path", str(out), "--data_path", ranked, "--data_split", "0,1,0", "--data_output_path",
                    str(tmp_path / "eval_cache"), "--report", str(report_path)], capsys)
    ranking = json.loads(report_path.read_text())["ranking"]
    # every held-out list, all four answers: 6 ordered pairs when strict, 3 for best-of-N
    assert ranking["ordered_pairs"] == sum(6 if len(set(r["ranks"])) == 4 else 3
                                           for r in make_ranked_rows(120, 1, held_out=True))
    assert ranking["pairwise_accuracy"] >= 0.8 and ranking["top1_accuracy"] >= 0.8


def test_plackett_luce_learns_conversational_ranked_lists(tmp_path, model_dirs):
    data = write_source(tmp_path / "chat", make_ranked_rows(1200, 0, conversational=True),
                        make_ranked_rows(120, 1, held_out=True, conversational=True))
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    out, meta, log = train(tmp_path, model_dirs["opt"], data, "--loss", "plackett_luce", "--chat_template",
                           str(template), "--num_train_epochs", "2")
    assert meta["final_eval"]["accuracy"] >= 0.8, log[-3000:]
    assert meta["final_eval"]["top1_accuracy"] >= 0.8, log[-3000:]
    tokenizer = load_hf_tokenizer(str(out))
    # saved with the model (trimmed after the last turn: utils.data.chat.scoring_template), hashed in the manifest
    assert tokenizer.chat_template.startswith(TRIM_MARK) and CHAT_TEMPLATE in tokenizer.chat_template
    assert meta["chat_template_sha256"] is not None
    # the saved model scores the conversation through that template as training did
    scorer = Scorer(load_reward_model(str(out)), tokenizer, 128, "<|endoftext|>")
    row = make_ranked_rows(1, 1, held_out=True, conversational=True)[0]
    prompt = [{"role": "user", "content": row["conversation"][0]["text"]}]
    answers = [[{"role": "assistant", "content": r}] for r in row["ranked_responses"]]
    rewards = scorer.score_ids(scorer.encode_pairs([prompt] * len(answers), answers))
    assert int(np.argmax(rewards)) == 0


@pytest.mark.parametrize("loss, flags, data, expected", [
    ("per_token", [], "ranked", "--loss per_token compares two answers token by token and cannot use ranked lists"),
    ("per_token", [], "margins", "--loss per_token compares two answers token by token and cannot use margins"),
    ("per_token", ["--center_rewards_coefficient", "0.1"], "pairs", "cannot use --center_rewards_coefficient"),
    ("plackett_luce", [], "margins", "--loss plackett_luce has no margin"),
    ("plackett_luce", ["--margin_source", "none"], "margins", None),
    ("end_token", ["--center_rewards_coefficient", "0.1"], "ranked", None),
    ("end_token", [], "margins", None),
    ("per_token", [], "pairs", None),
])
def test_objective_and_data_mismatch_is_one_line_error(loss, flags, data, expected, tmp_path, tokenizers):
    """The preference objective's data check, on the examples the data module builds, before any model is loaded."""
    rows = {"ranked": lambda seed, **kw: make_ranked_rows(40, seed, **kw),
            "margins": lambda seed, **kw: [{**row, "margin": 1.0} for row in make_pairs(40, seed, **kw)],
            "pairs": lambda seed, **kw: make_pairs(40, seed, **kw)}[data]
    folder = write_source(tmp_path / data, rows(0), rows(1, held_out=True))
    args = parse_training_args(["--model_name_or_path", "m", "--data_path", folder, "--loss", loss, *flags])
    options = DataOptions(margin_source=args.margin_source)
    source = DataSource((folder,), "0,1,0", 1234, str(tmp_path / "cache"), str(REPO_ROOT))
    train_set, _ = create_reward_datasets(source, tokenizers["opt"], 128, END_OF_CONVERSATION_TOKEN, options=options)
    if expected is None:
        objective_for(args).check_data(train_set.data)
        return
    with pytest.raises(UserError) as excinfo:
        objective_for(args).check_data(train_set.data)
    assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_process_reward_model_trains_saves_and_scores_steps(tmp_path, capsys):
    """--process_reward through main.py: held-out step, first-error and solution accuracy well above
    always predicting "correct", then rw_eval scores a step list with the saved model."""
    from rlhf_reward.utils.data.synthetic import make_step_rows
    from rlhf_reward.utils.tiny import save_tiny_model

    model_dir = str(tmp_path / "model")
    save_tiny_model(model_dir, [" ".join([r["prompt"], *r["steps"]]) for r in make_step_rows(500, 2)], "opt")
    data = write_source(tmp_path / "steps", make_step_rows(4000, 0), make_step_rows(400, 1, held_out=True))
    out, meta, log = train(tmp_path, model_dir, data, "--process_reward", "--max_seq_len", "64",
                           "--per_device_train_batch_size", "32", "--learning_rate", "3e-3",
                           "--num_train_epochs", "4")
    final = meta["final_eval"]
    held_out = make_step_rows(400, 1, held_out=True)
    labels = [label for row in held_out for label in row["labels"] if label is not None]
    always_correct = sum(label == 1 for label in labels) / len(labels)
    assert final["steps"] == len(labels) and final["solutions"] == 400
    assert final["accuracy"] >= max(0.85, always_correct + 0.1), log[-3000:]
    assert final["first_error_accuracy"] >= 0.8 and final["solution_accuracy"] >= 0.8, final
    assert meta["process_reward"] is True and meta["step_separator"] == "\n\n"

    row = next(r for r in held_out if -1 in r["labels"])
    wrong = row["labels"].index(-1)
    stdout = rw_eval_output(["--model_path", str(out), "--prompt", row["prompt"], "--steps",
                             *row["steps"][:wrong + 1]], capsys)
    probabilities = [float(p) for p in re.findall(r"p\(correct\) ([\d.]+)", stdout)]
    assert len(probabilities) == wrong + 1
    assert probabilities[wrong] < 0.5 and all(p > 0.5 for p in probabilities[:wrong]), stdout
