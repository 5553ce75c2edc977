"""Multi-attribute regression reward models (--objective regression): rated rows in each layout,
masked labels, the loss and its layouts, the collapsed step-3 head, and learning end to end.

Expected values are written by hand, or computed by a route other than the code under test (loops
over rated cells and pairs, a model with the plain one-output head). Comparisons of two computations
run in float64.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO_ROOT,
    launcher,
    launcher_env,
    objective_forward,
    rounding_tolerance,
    run_cli,
    run_ranks,
    rw_eval_output,
)
from rlhf_reward.utils.data.attributes import (
    AttributeDataset,
    AttributeScale,
    attribute_names,
    group_by_prompt,
    judge_rated_rows,
    parse_weights,
)
from rlhf_reward.utils.data.build import AttributeOptions, DataSource, create_attribute_datasets
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.data.examples import tally
from rlhf_reward.utils.data.synthetic import make_attribute_rows, write_jsonl
from rlhf_reward.utils.data.tokenize import load_tokenized, save_tokenized, tokenize_examples
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN
from rlhf_reward.utils.tiny import tiny_config, train_tokenizer
from test_server import call, running
from transformers import AutoModel

from step2_reward_model.heldout import score_split
from step2_reward_model.model import Attributes, RewardModel
from step2_reward_model.objectives import saved_objective
from step2_reward_model.objectives.base import DataRequest
from step2_reward_model.objectives.regression import Regression
from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer
from step2_reward_model.report import attribute_report
from step2_reward_model.scoring import Scorer

PROMPT = "\n\nHuman: Tell me about item 5.\n\nAssistant:"


def tagged(rows: list) -> list[tuple[str, object]]:
    return [(f"data.jsonl:line {i + 1}", row) for i, row in enumerate(rows)]


def judged(rows: list[dict], bad_rows: str = "error") -> tuple[list[dict], dict]:
    examples, dropped = tally(judge_rated_rows(tagged(rows), "data", bad_rows))
    return examples, dict(dropped)


def test_three_layouts_read_the_same_ratings():
    """Generic attributes, HelpSteer's columns (as CSV text too) and UltraFeedback's annotations."""
    generic = {"prompt": "Q", "response": "A", "attributes": {"helpfulness": 3, "verbosity": 1.5}}
    helpsteer = {"prompt": "Q", "response": "A", "helpfulness": 3, "correctness": None, "verbosity": 1.5}
    csv = {"prompt": "Q", "response": "A", "helpfulness": "3", "correctness": "", "verbosity": "1.5"}
    ultrafeedback = {"instruction": "Q", "completions": [
        {"response": "A", "annotations": {"helpfulness": {"Rating": "3", "Rationale": "fine"},
                                          "honesty": {"Rating": "N/A"}, "instruction_following": 5}},
        {"response": "B", "annotations": {"helpfulness": {"Rating": "1"}, "honesty": {"Rating": "2"}}}]}
    examples, dropped = judged([generic, helpsteer, csv, ultrafeedback])
    assert not dropped
    assert examples[0]["ratings"] == [{"helpfulness": 3.0, "verbosity": 1.5}]
    assert examples[1]["ratings"] == examples[2]["ratings"] == [
        {"helpfulness": 3.0, "correctness": None, "verbosity": 1.5}]
    assert examples[3]["responses"] == ["A", "B"]
    assert examples[3]["ratings"] == [{"helpfulness": 3.0, "honesty": None, "instruction_following": 5.0},
                                      {"helpfulness": 1.0, "honesty": 2.0}]
    chat = {"prompt": [{"role": "user", "content": "Q"}], "response": [{"role": "assistant", "content": "A"}],
            "attributes": {"helpfulness": 2}}
    assert judged([chat])[0][0]["prompt"] == [{"role": "user", "content": "Q"}]


def test_bad_rows_name_file_line_and_field_or_are_counted():
    rows = [{"prompt": "Q", "response": "A", "helpfulness": 3},
            {"prompt": "Q", "response": "B", "helpfulness": "good"},
            {"prompt": "Q", "response": "C", "attributes": {"helpfulness": True}},
            {"prompt": "", "response": "D", "helpfulness": 1},
            {"prompt": "Q", "response": "E", "helpfulness": None, "verbosity": "N/A"},
            {"prompt": "Q", "response": "F"}]
    with pytest.raises(UserError, match=r"data.jsonl, line 2: field 'helpfulness' is not a number \(found text "
                                        r"'good'\)"):
        judged(rows)
    examples, dropped = judged(rows, "skip")
    assert [example["responses"] for example in examples] == [["A"]]
    assert dropped == {"field 'helpfulness' is not a number": 1,
                       "attribute 'helpfulness' of field 'attributes' is not a number": 1, "empty prompt": 1,
                       "no labelled attribute": 1, "missing field 'attributes'": 1}


def test_names_come_from_the_data_or_from_attributes():
    examples, _ = judged([{"prompt": "Q", "response": "A", "helpfulness": None, "correctness": 2},
                          {"prompt": "Q", "response": "B", "helpfulness": 1, "coherence": None}])
    assert attribute_names(examples, None) == ["helpfulness", "correctness"]  # coherence is never rated
    assert attribute_names(examples, ["correctness", "helpfulness"]) == ["correctness", "helpfulness"]
    with pytest.raises(UserError, match="--attributes coherence: no row rates it"):
        attribute_names(examples, ["coherence"])


def test_responses_group_by_prompt_with_unrated_attributes_masked():
    """Rows sharing a prompt become one example; an attribute a row does not rate is NaN, never 0; a
    response rating none of the chosen attributes is dropped and counted."""
    examples, _ = judged([{"prompt": "Q1", "response": "A", "helpfulness": 0, "verbosity": None},
                          {"prompt": "Q2", "response": "B", "helpfulness": 2, "verbosity": 4},
                          {"prompt": "Q1", "response": "C", "helpfulness": None, "verbosity": 3},
                          {"prompt": "Q1", "response": "D", "correctness": 1}])
    grouped, dropped = group_by_prompt(examples, ["helpfulness", "verbosity"])
    assert dropped == {"no labelled attribute": 1}
    assert [(g["prompt"], g["responses"]) for g in grouped] == [("Q1", ["A", "C"]), ("Q2", ["B"])]
    np.testing.assert_array_equal(grouped[0]["labels"], [[0.0, np.nan], [np.nan, 3.0]])


def test_tokenised_labels_follow_their_responses(tmp_path):
    """An over-long answer leaves its prompt's list with its label; the labels survive the cache."""
    tokenizer = train_tokenizer(["a b c d e f g h"] * 20, "opt")
    example = {"prompt": "a b", "responses": [" c", " d e f g h " * 40, " e"], "ranks": [0, 0, 0],
               "labels": [[1.0, np.nan], [2.0, 2.0], [np.nan, 3.0]], "source": "s"}
    tokenized = tokenize_examples([example], tokenizer, 32, END_OF_CONVERSATION_TOKEN)
    assert tokenized.responses_dropped == 1
    np.testing.assert_array_equal(tokenized.labels[0], [[1.0, np.nan], [np.nan, 3.0]])
    pair = {**example, "responses": example["responses"][:2], "ranks": [0, 0], "labels": example["labels"][:2]}
    kept = tokenize_examples([pair], tokenizer, 32, END_OF_CONVERSATION_TOKEN)  # rated answers stand alone
    assert kept.responses_dropped == 1 and len(kept.responses[0]) == 1
    np.testing.assert_array_equal(kept.labels[0], [[1.0, np.nan]])
    tokenized.attribute_names = ["helpfulness", "verbosity"]
    save_tokenized(tokenized, str(tmp_path / "set.npz"))
    loaded = load_tokenized(str(tmp_path / "set.npz"))
    np.testing.assert_array_equal(loaded.labels[0], tokenized.labels[0])
    assert loaded.attribute_names == ["helpfulness", "verbosity"]
    assert load_tokenized(str(tmp_path / "set.npz")).labels[0].dtype == np.float32


def test_weights_and_scales():
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert parse_weights(None, names) == [0.2] * 5
    assert parse_weights(["helpsteer2"], names) == [0.3, 0.74, 0.46, 0.47, -0.33]
    assert parse_weights(["verbosity=-1", "helpfulness=2"], names) == [2.0, 0.0, 0.0, 0.0, -1.0]
    for specs, message in ((["honesty=1"], "no attribute 'honesty'"), (["verbosity"], "expected name=number"),
                           (["verbosity=0"], "every weight is 0"), (["helpsteer2"], "has no attribute")):
        with pytest.raises(UserError, match=message):
            parse_weights(specs, names if specs != ["helpsteer2"] else names[:2])
    labels = [np.array([[1.0, np.nan], [5.0, 2.0]]), np.array([[3.0, 2.0]])]
    scale = AttributeScale.of("minmax", labels, 2)
    assert scale == AttributeScale((1.0, 2.0), (5.0, 3.0))  # a single value keeps its unit
    np.testing.assert_array_equal(scale.apply(labels[0]), [[0.0, np.nan], [1.0, 0.0]])
    np.testing.assert_allclose(scale.invert(scale.apply(labels[0]).astype(np.float64)), labels[0])
    assert AttributeScale.of("none", labels, 2).apply(labels[1]).tolist() == [[3.0, 2.0]]


def float64_model(tokenizer, attributes: Attributes) -> RewardModel:
    torch.manual_seed(0)
    backbone = AutoModel.from_config(tiny_config("opt", tokenizer, hidden=32, layers=2))
    return RewardModel(backbone, attributes=attributes).double()


def regression(attributes: Attributes, pair_loss_coefficient: float = 0.0) -> Regression:
    return Regression(head=attributes, pair_loss_coefficient=pair_loss_coefficient)


def rated_items(tokenizer) -> list[dict]:
    """Three prompts with 2, 1 and 3 rated responses of different lengths; NaN cells are unrated."""
    def ids(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    labels = [np.array([[1.0, 2.0], [np.nan, 0.5]]), np.array([[3.0, np.nan]]),
              np.array([[0.0, 1.0], [2.0, 1.0], [2.0, np.nan]])]
    return [{"prompt": ids(f"Human: question {g} please answer"), "margin": 0.0, "source": 0,
             "responses": [ids(" word" * (2 + 3 * k + g)) for k in range(len(label))],
             "ranks": np.arange(len(label)), "labels": label.astype(np.float32)}
            for g, label in enumerate(labels)]


@pytest.mark.numerics
def test_masked_labels_add_nothing_to_loss_or_gradient(tokenizers):
    """The loss is the mean over rated cells, computed here cell by cell; an unrated cell's prediction
    gets exactly zero gradient; and rescaled by `loss_denominator` it is their sum over it."""
    tokenizer = tokenizers["opt"]
    attributes = Attributes(("helpfulness", "verbosity"), (0.5, 0.5))
    model = float64_model(tokenizer, attributes)
    batch = PairCollator(tokenizer.pad_token_id)(rated_items(tokenizer))
    out = objective_forward(model, batch, regression(attributes))
    predicted, labels = out["attributes"], batch.targets.labels.double()
    cells = [(r, k) for r in range(labels.shape[0]) for k in range(2) if not math.isnan(labels[r, k])]
    expected = sum((predicted[r, k] - labels[r, k]) ** 2 for r, k in cells) / len(cells)
    tolerance = rounding_tolerance(expected, dtype=torch.float64)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=tolerance)
    assert len(cells) == 9 < labels.numel()
    gradient, = torch.autograd.grad(out["loss"], predicted)
    assert (gradient[labels.isnan()] == 0).all() and (gradient[~labels.isnan()] != 0).all()
    scaled = objective_forward(model, replace(batch, loss_denominator=4.0), regression(attributes))
    assert scaled["loss"].item() == pytest.approx(expected.item() * len(cells) / 4.0, abs=tolerance)
    np.testing.assert_array_equal(AttributeDataset(_tokenized(rated_items(tokenizer)), AttributeScale.of(
        "none", [], 2)).loss_units(), [3, 1, 5])


def _tokenized(items: list[dict]):
    from rlhf_reward.utils.data.tokenize import TokenizedExamples

    return TokenizedExamples(prompts=[item["prompt"] for item in items],
                             responses=[item["responses"] for item in items], ranks=[item["ranks"] for item in items],
                             margins=[0.0] * len(items), sources=[0] * len(items), source_names=["s"],
                             labels=[item["labels"] for item in items])


@pytest.mark.numerics
def test_pair_loss_compares_responses_whose_combined_labels_differ(tokenizers):
    """With --pair_loss_coefficient, the loss adds c times the Bradley-Terry loss of the reward over
    the pairs of one prompt with known, different weighted labels: averaged per prompt, then over
    prompts, computed here pair by pair. Prompt 0's second response lacks a weighted label."""
    tokenizer = tokenizers["opt"]
    weights = (2.0, -1.0)
    attributes = Attributes(("helpfulness", "verbosity"), weights)
    model = float64_model(tokenizer, attributes)
    batch = PairCollator(tokenizer.pad_token_id)(rated_items(tokenizer))
    mse = objective_forward(model, batch, regression(attributes))
    out = objective_forward(model, batch, regression(attributes, pair_loss_coefficient=0.7))
    scores, labels = out["scores"], batch.targets.labels.double()
    target = labels @ torch.tensor(weights, dtype=torch.float64)  # NaN where a weighted label is missing
    per_prompt = []
    for g in range(3):
        rows = [r for r in range(len(scores)) if batch.targets.group[r] == g and not math.isnan(target[r])]
        terms = [-F.logsigmoid(scores[i] - scores[j]) for i in rows for j in rows if target[i] > target[j]]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    assert len(per_prompt) == 1  # prompt 2: labels 0*2-1, 2*2-1 differ; prompt 0 has one known; prompt 1 one row
    expected = mse["loss"] + 0.7 * per_prompt[0]
    assert out["loss"].item() == pytest.approx(expected.item(), abs=rounding_tolerance(expected, dtype=torch.float64))
    torch.testing.assert_close(out["scores"], out["attributes"] @ torch.tensor(weights, dtype=torch.float64))


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["unshared", "packed"])
def test_attributes_are_the_same_in_every_batch_layout(tokenizers, layout):
    """Shared prompts (one row per prompt), one row per response, and token-budget packing give the
    same attributes, loss and gradients."""
    tokenizer = tokenizers["opt"]
    attributes = Attributes(("helpfulness", "verbosity"), (1.0, 1.0))
    model, objective = float64_model(tokenizer, attributes), regression(attributes, 0.5)
    items = rated_items(tokenizer)
    options = {"unshared": {}, "packed": {"arrangement": "fit"}}[layout]
    results = []
    for collate in (PairCollator(tokenizer.pad_token_id, share_prompt=True), PairCollator(tokenizer.pad_token_id,
                                                                                          **options)):
        batch = collate(items)
        model.zero_grad()
        out = objective_forward(model, batch, objective)
        out["loss"].backward()
        results.append((out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (shared, shared_grad), (other, other_grad) = results
    tolerance = rounding_tolerance(shared["attributes"], shared["loss"], dtype=torch.float64)
    torch.testing.assert_close(other["attributes"], shared["attributes"], atol=tolerance, rtol=0)
    torch.testing.assert_close(other["loss"], shared["loss"], atol=tolerance, rtol=0)
    torch.testing.assert_close(other_grad, shared_grad, atol=rounding_tolerance(shared_grad, dtype=torch.float64),
                               rtol=0)


def test_metrics_by_hand():
    predicted = np.array([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0], [4.0, 2.0]])
    labels = np.array([[1.0, np.nan], [3.0, 4.0], [2.0, 0.0], [5.0, np.nan]])
    report = attribute_report(predicted, labels, ["a", "b"], rewards=[1.0, 2.0, 3.0, 0.0], prompts=[0, 0, 1, 1],
                              targets=[1.0, 2.0, np.nan, 0.0])
    assert report["attributes"]["a"]["mse"] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert report["attributes"]["a"]["spearman"] == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4
    assert report["attributes"]["b"]["rated"] == 2 and report["attributes"]["b"]["spearman"] == pytest.approx(1.0)
    assert report["comparisons"] == 1 and report["pairwise_accuracy"] == 1.0  # prompt 1 has one known target


COMMON = ["--data_split", "0,1,0", "--per_device_train_batch_size", "16", "--max_seq_len", "128",
          "--learning_rate", "1e-3", "--num_warmup_steps", "10", "--num_train_epochs", "1", "--weight_decay", "0.1",
          "--objective", "regression", "--deepspeed"]
# A perfect predictor of a two-valued attribute (correctness: 0 or 4, half each) reaches a Spearman
# of about 0.87 against it; the trained model comes within 0.01 of that, verbosity and helpfulness
# above 0.95. An untrained head, or one whose outputs are swapped, stays below 0.3.
MIN_SPEARMAN = 0.75


@pytest.fixture(scope="module")
def rated_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("rated")
    write_jsonl(make_attribute_rows(3000, 0), str(folder / "train.jsonl"))
    write_jsonl(make_attribute_rows(400, 1, held_out=True), str(folder / "eval.jsonl"))
    return str(folder)


def rated_source(rated_dir: str, cache) -> DataSource:
    """All of `rated_dir`'s rows to this phase, cached under `cache`, quietly."""
    return DataSource((rated_dir,), "0,1,0", 1234, str(cache), str(REPO_ROOT), log=lambda _: None)


def train(tmp_path, model_dir: str, rated_dir: str, *extra: str, ranks: int = 0):
    """A regression run as a user starts it (on `ranks` ranks, as the deepspeed launcher starts them): its
    OUTPUT, manifest and log."""
    out = tmp_path / "out"
    script = ["step2_reward_model/main.py", "--model_name_or_path", model_dir, "--data_path", rated_dir,
              "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out), *COMMON, *extra]
    env = launcher_env(ranks or 1)
    result = run_ranks([*launcher(ranks), *script], env=env) if ranks else run_cli([sys.executable, *script], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, load_manifest(str(out)), result.stdout + result.stderr


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, model_dirs, rated_dir):
    tmp_path = tmp_path_factory.mktemp("regression")
    return tmp_path, *train(tmp_path, model_dirs["opt"], rated_dir, "--pair_loss_coefficient", "0.5",
                            "--attribute_weights", "correctness=0.5", "verbosity=0.25", "helpfulness=0.25")


def rescored(out, rated_dir: str, cache: str) -> dict:
    path = str(out)
    manifest = load_manifest(path)
    scorer = Scorer(load_reward_model(path), load_scoring_tokenizer(path), manifest["max_seq_len"],
                    manifest["end_of_conversation_token"], scale=AttributeScale.from_manifest(manifest))
    source = DataSource((rated_dir,), "0,1,0", 1234, cache, str(REPO_ROOT), log=lambda _: None)
    held_out = score_split(scorer, saved_objective(manifest), DataRequest(source, scorer.max_seq_len), "eval")
    table = held_out.table
    predicted, labels = held_out.objective.split(table)
    return {"predicted": predicted, "labels": labels, "rewards": table[:, 0], "prompts": table[:, 1],
            "targets": table[:, 2]}


def test_a_tiny_model_learns_attributes_to_held_out_spearman(regression_run, rated_dir):
    """Verbosity is the answer's length, correctness a marker word, helpfulness their mean (rated for
    two answers in three): the trained heads rank held-out answers by each, and a head with its
    outputs swapped, scored the same way, cannot."""
    tmp_path, out, manifest, log = regression_run
    final = manifest["final_eval"]
    assert manifest["attributes"]["names"] == ["helpfulness", "correctness", "verbosity"]
    assert final["responses"] == 400 and final["comparisons"] > 50
    for name in manifest["attributes"]["names"]:
        assert final[f"spearman/{name}"] >= MIN_SPEARMAN, log[-2000:]
    assert final["pairwise_accuracy"] >= 0.9
    before = float(log.split("Epoch 0 (before training): mean Spearman ")[1].split(",")[0])
    assert before < 0.3
    scored = rescored(out, rated_dir, str(tmp_path / "cache"))
    names = manifest["attributes"]["names"]
    again = attribute_report(scored["predicted"], scored["labels"], names, scored["rewards"], scored["prompts"],
                             scored["targets"])
    for name in names:  # rebuilt from OUTPUT alone, the same numbers
        assert again["attributes"][name]["spearman"] == pytest.approx(final[f"spearman/{name}"], abs=0.01)
    swapped = attribute_report(scored["predicted"][:, [1, 2, 0]], scored["labels"], names, scored["rewards"],
                               scored["prompts"], scored["targets"])
    assert swapped["attributes"]["correctness"]["spearman"] < 0.3


@torch.no_grad()
def test_zero3_two_ranks_with_token_budgets(tmp_path, model_dirs, rated_dir):
    """ZeRO-3 on two ranks, packed token-budget batches: each held-out answer
    is counted once across the ranks, the model learns as on one rank, and the head gathered from
    the shards saves whole (loading checks its collapse against the step-3 head)."""
    out, manifest, log = train(tmp_path, model_dirs["opt"], rated_dir, "--zero_stage", "3",
                               "--max_tokens_per_batch", "1024", "--attribute_scale", "minmax", ranks=2)
    assert "2 rank(s)" in log and "ZeRO stage 3" in log and "1024 tokens per device and step" in log
    final = manifest["final_eval"]
    assert final["responses"] == 400
    assert min(final[f"spearman/{name}"] for name in manifest["attributes"]["names"]) >= MIN_SPEARMAN, log[-2000:]
    assert manifest["attributes"]["scale"] == {"kind": "minmax", "low": [0.0, 0.0, 0.0], "high": [4.0, 4.0, 4.0]}
    model = load_reward_model(str(out))
    assert model.v_head.weight.shape == (3, 64) and model.attributes.weights == (1 / 3, 1 / 3, 1 / 3)


def test_step3_head_is_the_weighted_sum_of_the_attributes(regression_run):
    """DeepSpeed-Chat's step 3 builds a one-output head and loads pytorch_model.bin strictly: its
    reward equals the weighted sum of the attributes that attribute_head.safetensors and the HF
    export (one label per attribute) score, in float64."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _, out, manifest, _ = regression_run
    tokenizer = load_scoring_tokenizer(str(out))
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(out)))
    backbone.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    critic = RewardModel(backbone)
    critic.load_state_dict(torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True), strict=True)
    ours = load_reward_model(str(out))
    assert ours.attributes.names == tuple(manifest["attributes"]["names"])
    assert ours.attributes.weights == (0.25, 0.5, 0.25)
    texts = [PROMPT + " verified alpha beta" + END_OF_CONVERSATION_TOKEN, PROMPT + " gamma" + END_OF_CONVERSATION_TOKEN]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    step3 = critic.double().forward_value(batch["input_ids"], batch["attention_mask"])["chosen_end_scores"]
    attributes = ours.double().forward_value(batch["input_ids"], batch["attention_mask"])["end_attributes"]
    weighted = attributes @ torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(step3, weighted, atol=rounding_tolerance(weighted), rtol=0)
    classifier = AutoModelForSequenceClassification.from_pretrained(str(out / "hf")).double().eval()
    assert classifier.config.id2label == dict(enumerate(manifest["attributes"]["names"]))
    exported = load_scoring_tokenizer(str(out / "hf"))(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(classifier(**exported).logits, attributes, atol=rounding_tolerance(attributes), rtol=0)


def test_export_collapses_other_weights_without_retraining(regression_run, tmp_path, capsys):
    """The converter and rw_eval run in-process (their main); a bad weight goes through the command line."""
    import shutil

    from step2_reward_model import export

    _, out, _, _ = regression_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert export.main([str(copy), "--attribute_weights", "verbosity=1"]) == 0
    assert "removed reward_stats.json" in capsys.readouterr().out and not (copy / "reward_stats.json").exists()
    assert load_manifest(str(copy))["attributes"]["weights"] == [0.0, 0.0, 1.0]
    head = load_reward_model(str(copy)).v_head.weight
    saved = torch.load(copy / "pytorch_model.bin", map_location="cpu", weights_only=True)["v_head.weight"]
    torch.testing.assert_close(saved, head[2:3], atol=0, rtol=0)
    stdout = rw_eval_output(["--model_path", str(copy), "--prompt", PROMPT, "--answer", " alpha beta"], capsys)
    lines = dict(line.strip().split(": ") for line in stdout.splitlines() if line.startswith("  "))
    assert set(lines) == {"reward", "helpfulness", "correctness", "verbosity"}
    assert lines["reward"] == lines["verbosity"]
    bad = run_cli([sys.executable, "step2_reward_model/export.py", str(copy), "--attribute_weights", "honesty=1"])
    assert bad.returncode != 0 and "no attribute 'honesty'" in bad.stderr


def test_rw_eval_reports_each_attribute_and_the_server_returns_them(regression_run, rated_dir, capsys):
    tmp_path, out, manifest, _ = regression_run
    stdout = rw_eval_output(["--model_path", str(out), "--data_path", rated_dir, "--data_split", "0,1,0",
                             "--data_output_path", str(tmp_path / "cache"), "--report", str(tmp_path / "report.json"),
                             "--plots", str(tmp_path / "plots")], capsys)
    assert "== Attributes ==" in stdout and "== Length bias ==" in stdout
    assert (tmp_path / "plots" / "reward_vs_length.png").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    verbosity = report["attributes"]["attributes"]["verbosity"]
    assert verbosity["spearman"] == pytest.approx(manifest["final_eval"]["spearman/verbosity"], abs=0.01)
    assert verbosity["length_spearman_labelled"] > 0.8  # verbosity is length, and the model learned as much
    assert report["summary"]["pairs"] > 50
    path = str(out)
    scorer = Scorer(load_reward_model(path), load_scoring_tokenizer(path), manifest["max_seq_len"],
                    manifest["end_of_conversation_token"], scale=AttributeScale.from_manifest(manifest))
    answers = [" verified alpha", " beta gamma delta"]
    rewards, attributes = scorer.rate_answers(PROMPT, answers)
    with running(scorer) as port:
        status, body, _ = call(port, "POST", "/score", {"pairs": [{"prompt": PROMPT, "answer": a} for a in answers]},
                               token=None)
    assert status == 200 and body["rewards"] == rewards.tolist()
    assert body["attributes"] == [dict(zip(manifest["attributes"]["names"], row, strict=True))
                                  for row in attributes.tolist()]


def test_regression_flags_are_checked(tmp_path, tokenizers, rated_dir, capsys):
    """Flags of the other objective are refused before anything loads; an attribute no row rates
    is one line once the data is read."""
    from step2_reward_model.flags import parse_training_args

    for extra, message in ((["--attributes", "verbosity"], "--attributes needs --objective regression"),
                           (["--objective", "regression", "--process_reward"], "two different objectives"),
                           (["--objective", "regression", "--pair_loss_coefficient", "-1"], "at least 0.0"),
                           (["--objective", "regression", "--loss", "end_token"], "--loss applies to --objective "
                                                                                   "preference, not regression")):
        with pytest.raises(SystemExit) as stopped:
            parse_training_args(["--model_name_or_path", "m", *extra])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(UserError, match="--attributes honesty: no row rates it"):
        create_attribute_datasets(rated_source(rated_dir, tmp_path), tokenizers["opt"], 128,
                                  END_OF_CONVERSATION_TOKEN, AttributeOptions(("honesty",)))


def test_attribute_sets_are_built_and_cached(tmp_path, tokenizers, rated_dir):
    tokenizer = tokenizers["opt"]
    train, held_out = create_attribute_datasets(rated_source(rated_dir, tmp_path), tokenizer, 128,
                                                END_OF_CONVERSATION_TOKEN, AttributeOptions(("verbosity",)))
    assert train.attribute_names == held_out.attribute_names == ["verbosity"]
    assert sum(map(len, train.labels)) == 3000 and all(labels.shape[1] == 1 for labels in train.labels)
    assert all(len(responses) == 2 for responses in train.responses)  # two answers per prompt, grouped
