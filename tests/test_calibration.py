"""Post-hoc length calibration (`export.py --length_calibration`, step2_reward_model/calibration.py): the fit,
and the calibrated reward reaching every consumer that scores through `Scorer` (rw_eval.py, its server's
/score and /get_reward, TRL's RewardFunction, verl's compute_score), while loaders of the raw weights
(DeepSpeed-Chat's step 3, `hf/`) get the uncalibrated reward, as docs/output.md says."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import rounding_tolerance
from rlhf_reward.benchmarks.consumers import openrlhf_queries, serving, verl_custom_function
from rlhf_reward.utils.data.synthetic import write_jsonl
from test_consumers import assistant, close, conversation, conversations, save_chat_model, save_with_stats
from test_handoff import step3_load

from step2_reward_model.calibration import LengthCalibration, fit_length_calibration, local_linear
from step2_reward_model.export import main as export_main
from step2_reward_model.heldout import length_columns
from step2_reward_model.integrations import RewardFunction
from step2_reward_model.objectives.regression import Regression
from step2_reward_model.output import STATS_NAME, load_manifest, reward_mean_std
from step2_reward_model.report import with_length
from step2_reward_model.scoring import load_scorer

WORDS = "the sea is wide and blue and full of fish that swim".split()


def test_local_linear_is_a_tricube_weighted_least_squares_fit():
    """One LOWESS estimate against numpy's weighted polyfit on the same window, in float64."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 500).astype(float)
    rewards = 0.02 * lengths + np.sin(lengths / 30) + rng.normal(0, 0.3, 500)
    at, fraction = 73.0, 0.3
    distance = np.abs(lengths - at)
    width = np.sort(distance)[int(np.ceil(fraction * 500)) - 1] * (1 + 1e-9)
    weight = np.clip(1 - (distance / width) ** 3, 0, None) ** 3
    slope, intercept = np.polyfit(lengths, rewards, 1, w=np.sqrt(weight))
    assert local_linear(lengths, rewards, at, fraction) == pytest.approx(slope * at + intercept, abs=1e-9)


def test_the_calibrated_reward_no_longer_follows_length_and_keeps_the_quality_signal():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 400, 4000).astype(float)
    quality = rng.normal(0, 1, 4000)
    rewards = quality + 2 * np.log(lengths) + 0.002 * lengths
    calibration = fit_length_calibration(lengths, rewards, "test")
    calibrated = calibration.apply(rewards, lengths)
    before, after = (with_length({"r": r}, lengths)["r"]["pearson"] for r in (rewards, calibrated))
    assert before > 0.8 and abs(after) < 0.05
    assert np.corrcoef(calibrated, quality)[0, 1] > 0.95
    assert calibrated.mean() == pytest.approx(rewards.mean(), abs=0.05)  # the offsets are centred
    # flat beyond the knots, linear between them
    assert calibration.offset([0, 1e6]).tolist() == [calibration.offsets[0], calibration.offsets[-1]]
    middle = (calibration.lengths[3] + calibration.lengths[4]) / 2
    assert calibration.offset([middle])[0] == pytest.approx((calibration.offsets[3] + calibration.offsets[4]) / 2)
    assert LengthCalibration.from_manifest({"length_calibration": calibration.manifest()}) == calibration


def test_calibration_refuses_what_it_cannot_fit_or_read():
    with pytest.raises(Exception, match="answers of different lengths"):
        fit_length_calibration(np.full(10, 7.0), np.arange(10.0))
    with pytest.raises(Exception, match="ascending 'lengths'"):
        LengthCalibration.from_manifest({"length_calibration": {"lengths": [3, 2], "offsets": [0, 1]}})
    with pytest.raises(Exception, match="for preference models.*--objective regression"):
        length_columns(Regression())


def calibration_rows(count: int = 60, first: int = 0) -> list[dict]:
    """Chat pairs whose answers run from 1 to 40 words, so the fit has lengths to follow."""
    rows = []
    for index in range(first, first + count):
        words = [WORDS[(index + k) % len(WORDS)] for k in range(1 + (index - first) * 39 // count)]
        rows.append({"prompt": conversation(f"Tell me something, number {index}."),
                     "chosen": [assistant(" ".join(words) + ".")],
                     "rejected": [assistant(" ".join(reversed(words[: 1 + len(words) // 2])) + "?")]})
    return rows


@pytest.fixture(scope="module", params=["llama_chat", "opt"])
def calibrated(request, model_dirs, tmp_path_factory) -> dict[str, str]:
    """A random-headed model saved raw and again with a length calibration fitted on chat pairs: a ChatML
    Llama whose template writes the bos (where a query's prompt is hardest to find), and a tiny OPT in
    DeepSpeed-Chat's layout."""
    root = tmp_path_factory.mktemp("calibration")
    if request.param == "opt":
        raw = save_with_stats(str(root / "raw"), model_dirs["opt"])
    else:
        save_chat_model(str(root / "tiny"), "llama")
        raw = save_with_stats(str(root / "raw"), str(root / "tiny"))
    data = str(root / "data")
    write_jsonl(calibration_rows(first=1000), os.path.join(data, "train.jsonl"))
    write_jsonl(calibration_rows(), os.path.join(data, "eval.jsonl"))
    folders = {"raw": raw, "calibrated": str(root / "calibrated"), "raw_on_data": str(root / "raw_on_data"),
               "data": data, "cache": str(root / "cache")}
    data_flags = ["--data_path", data, "--data_split", "0,1,0", "--data_output_path", folders["cache"]]
    for name, flags in (("calibrated", ["--length_calibration"]), ("raw_on_data", [])):
        shutil.copytree(raw, folders[name])
        assert export_main([folders[name], *flags, *data_flags]) == 0
    return folders


def answer_lengths(out: str, prompts: list, answers: list) -> np.ndarray:
    """Each answer's tokens after its prompt, counted here from the two renderings."""
    tokenizer = load_scorer(out).tokenizer
    lengths = []
    for prompt, answer in zip(prompts, answers, strict=True):
        whole = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        start = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        lengths.append(len(tokenizer(whole, add_special_tokens=False)["input_ids"])
                       - len(tokenizer(start, add_special_tokens=False)["input_ids"]))
    return np.asarray(lengths)


@pytest.mark.numerics
def test_the_export_stores_the_calibration_and_rw_eval_applies_it(calibrated):
    raw, out = calibrated["raw"], calibrated["calibrated"]
    fields = load_manifest(out)["length_calibration"]
    assert fields["method"] == "lowess" and fields["answers"] == 120 and "held-out split" in fields["data"]
    assert load_manifest(os.path.join(out, "hf"))["length_calibration"] == fields
    calibration = LengthCalibration.from_manifest(load_manifest(out))
    prompts, answers = conversations()
    expected = calibration.apply(load_scorer(raw).score_ids(load_scorer(raw).encode_pairs(prompts, answers)),
                                 answer_lengths(out, prompts, answers))
    for folder in (out, os.path.join(out, "hf")):
        scorer = load_scorer(folder)
        close(scorer.score_ids(scorer.encode_pairs(prompts, answers)), expected)
    # the statistics are the calibrated rewards': about the same mean (centred offsets), less spread, as
    # the length part is gone
    (mean, std), (raw_mean, raw_std) = reward_mean_std(out), reward_mean_std(calibrated["raw_on_data"])
    assert mean == pytest.approx(raw_mean, abs=0.1 * raw_std) and std < raw_std
    assert json.load(open(os.path.join(out, STATS_NAME)))["all"]["count"] == 120


@pytest.mark.numerics
def test_every_scorer_consumer_gets_the_calibrated_reward_and_raw_loaders_do_not(calibrated):
    """The server (pairs; OpenRLHF's queries with their prompts), TRL's RewardFunction and verl's
    compute_score equal rw_eval.py's calibrated reward; step 3's loader and hf/'s classifier give the
    raw one, which cannot carry it (docs/output.md)."""
    raw, out = calibrated["raw"], calibrated["calibrated"]
    prompts, answers = conversations()
    scorer = load_scorer(out)
    expected = scorer.score_ids(scorer.encode_pairs(prompts, answers))
    unchanged = load_scorer(raw).score_ids(load_scorer(raw).encode_pairs(prompts, answers))
    assert max(abs(a - b) for a, b in zip(expected, unchanged, strict=True)) > 1e-3  # the calibration does something
    close(RewardFunction(out)(prompts=prompts, completions=answers), expected)
    got, reference = verl_custom_function(out, prompts, answers, torch.float32)
    close(got, expected)
    close(reference, expected)
    queries, texts = openrlhf_queries(out, prompts, answers)
    import http.client

    with serving(out) as port:
        def post(path: str, body: dict) -> tuple[int, dict]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        status, reply = post("/get_reward", {"query": queries, "prompts": texts, "labels": [None] * len(texts)})
        assert status == 200, reply
        close(reply["rewards"], expected)
        status, reply = post("/score", {"pairs": [{"prompt": p[0]["content"], "answer": a[0]["content"]}
                                                  for p, a in zip(prompts, answers, strict=True)]})
        assert status == 200
        pairs = scorer.encode_pairs([p[0]["content"] for p in prompts], [a[0]["content"] for a in answers])
        close(reply["rewards"], scorer.score_ids(pairs))
        status, reply = post("/get_reward", {"query": queries})
        assert status == 400 and "length-calibrated" in reply["error"] and "prompt" in reply["error"]
        status, reply = post("/score", {"texts": ["Hello"]})
        assert status == 400 and "length-calibrated" in reply["error"]
        status, reply = post("/get_reward", {"query": queries[:1], "prompts": ["something else"]})
        assert status == 400 and "does not begin with its prompt" in reply["error"]
    step3 = step3_load(out)
    with torch.no_grad():
        served = [step3.forward_value(torch.as_tensor(row)[None])["chosen_end_scores"].item()
                  for row in scorer.encode_pairs(prompts, answers).sequences]
    assert served == pytest.approx(unchanged, abs=rounding_tolerance(unchanged))


def test_removing_the_calibration_gives_the_raw_reward_back(calibrated, tmp_path):
    folder = str(tmp_path / "out")
    shutil.copytree(calibrated["calibrated"], folder)
    assert export_main([folder, "--remove_length_calibration"]) == 0
    assert "length_calibration" not in load_manifest(folder) and not os.path.exists(os.path.join(folder, STATS_NAME))
    prompts, answers = conversations()
    scorer, raw = load_scorer(folder), load_scorer(calibrated["raw"])
    close(scorer.score_ids(scorer.encode_pairs(prompts, answers)), raw.score_ids(raw.encode_pairs(prompts, answers)))
    assert export_main([folder, "--length_calibration"]) == 2  # it needs held-out data


def test_rw_eval_reports_what_the_calibration_did(calibrated, capsys):
    from rw_eval import main as rw_eval_main

    report = os.path.join(calibrated["cache"], "report.json")
    assert rw_eval_main(["--model_path", calibrated["calibrated"], "--data_path", calibrated["data"],
                         "--data_split", "0,1,0", "--data_output_path", calibrated["cache"],
                         "--report", report]) == 0
    assert "== Length calibration" in capsys.readouterr().out
    effect = json.load(open(report))["length_calibration"]
    before, after = effect["before calibration"]["pearson"], effect["after calibration (the reward)"]["pearson"]
    assert abs(after) < 0.2 and abs(after) < abs(before)
