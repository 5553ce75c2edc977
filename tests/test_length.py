"""Rewards that do not pay for length: ODIN's loss terms (`--length_head`) by hand, their statistic over
ranks, the same loss in every batch layout, the length diagnostics, and the synthetic data whose
preference is confounded with length."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from conftest import forward_backward, rounding_tolerance
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.data.synthetic import FILLER, make_length_confounded_pairs
from test_prefix_sharing import CONFIGS, make_items
from transformers import AutoModel

from step2_reward_model.losses import across_ranks, length_decorrelation_loss, orthogonality_loss, pearson
from step2_reward_model.model import QUALITY_AND_LENGTH, RewardModel
from step2_reward_model.objectives.preference import LENGTH, LENGTH_REWARD, SCORE, Preference
from step2_reward_model.report import length_bias


def test_length_loss_is_the_papers_terms_by_hand():
    """|rho(r_Q, L)| + 1 - rho(r_L, L), rho the Pearson correlation; 0 for a constant side."""
    rng = np.random.default_rng(0)
    quality, length_reward, lengths = rng.normal(size=(3, 40))
    loss = length_decorrelation_loss(*(torch.tensor(x) for x in (quality, length_reward, lengths)))
    expected = abs(np.corrcoef(quality, lengths)[0, 1]) + 1 - np.corrcoef(length_reward, lengths)[0, 1]
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert pearson(torch.tensor(quality), torch.full((40,), 7.0, dtype=torch.float64)).item() == 0.0
    perfect = length_decorrelation_loss(torch.zeros(40, dtype=torch.float64), torch.tensor(2 * lengths + 1),
                                        torch.tensor(lengths))
    assert perfect.item() == pytest.approx(0.0, abs=1e-9)


def test_orthogonality_loss_is_the_cosine_of_the_two_heads():
    head = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert orthogonality_loss(head).item() == pytest.approx(2 ** -0.5)
    scaled = head * torch.tensor([[10.0], [0.1]], dtype=torch.float64)
    assert orthogonality_loss(scaled).item() == pytest.approx(2 ** -0.5)
    assert orthogonality_loss(torch.tensor([[1.0, 0.0], [0.0, -4.0]])).item() == 0.0


def _rank_gradients(rank: int, world: int, init: str, parts: list, out: str) -> None:
    """One rank: its part of (x, y) joined with the others', their correlation backward; saves its gradient."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x, y = (torch.tensor(values, dtype=torch.float64, requires_grad=True) for values in parts[rank])
    joined_x, joined_y = across_ranks(x, y)
    pearson(joined_x, joined_y).backward()
    torch.save({"x": x.grad, "y": y.grad, "joined": joined_x.detach()}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_across_ranks_gives_the_whole_batch_statistic_and_its_gradient():
    """Two ranks with parts of different sizes see the whole batch's correlation, and the mean of their
    gradients (what data-parallel training applies) is the gradient of that correlation, in float64."""
    import torch.multiprocessing as mp
    from rlhf_reward.utils.runtime import free_port

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 8))
    parts = [(x[:3].tolist(), y[:3].tolist()), (x[3:].tolist(), y[3:].tolist())]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_gradients, args=(2, f"tcp://127.0.0.1:{free_port()}", parts, out), nprocs=2,
                           start_method="spawn")
        saved = [torch.load(os.path.join(out, f"{rank}.pt"), weights_only=True) for rank in range(2)]
    whole_x, whole_y = (torch.tensor(values, requires_grad=True) for values in (x, y))
    pearson(whole_x, whole_y).backward()
    for rank, (start, stop) in enumerate(((0, 3), (3, 8))):
        torch.testing.assert_close(saved[rank]["joined"], torch.tensor(x))
        torch.testing.assert_close(saved[rank]["x"] / 2, whole_x.grad[start:stop], atol=1e-12, rtol=0)
        torch.testing.assert_close(saved[rank]["y"] / 2, whole_y.grad[start:stop], atol=1e-12, rtol=0)


def length_head_model() -> RewardModel:
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(CONFIGS["opt"]()).double(), attributes=QUALITY_AND_LENGTH)
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    return model.double()


@pytest.mark.numerics
@pytest.mark.parametrize("loss,responses", [("per_token", 2), ("end_token", 4), ("plackett_luce", 3)])
def test_the_length_head_loss_is_the_same_in_every_batch_layout(loss, responses):
    """One row per answer, prompts shared, and documents packed into token-budget rows give the same ODIN
    loss and gradients (float64), and its terms are really in the loss."""
    model, items = length_head_model(), make_items(responses)
    objective = Preference(loss_name=loss, length_head=True)
    results = {name: forward_backward(model, PairCollator(1, share_prompt=share, arrangement=arrangement)(items),
                                      objective)
               for name, share, arrangement in (("rows", False, None), ("shared", True, None),
                                                ("packed", True, "flat"))}
    (whole, grads) = results["rows"]
    for name in ("shared", "packed"):
        out, other = results[name]
        tolerance = rounding_tolerance(whole["loss"], dtype=torch.float64)
        torch.testing.assert_close(out["loss"], whole["loss"], atol=tolerance, rtol=0, msg=name)
        for grad, expected in zip(other, grads, strict=True):
            torch.testing.assert_close(grad, expected, atol=rounding_tolerance(expected, dtype=torch.float64),
                                       rtol=0, msg=name)
    plain, _ = forward_backward(model, PairCollator(1)(items), Preference(loss_name=loss))
    assert abs(whole["loss"].item() - plain["loss"].item()) > 1e-3


def test_the_held_out_table_has_each_answers_length_and_length_reward():
    model, items = length_head_model(), make_items(4)
    batch = PairCollator(1)(items)
    with torch.no_grad():
        table = Preference(length_head=True).table_rows(model, model(batch.inputs, batch.layout), batch)
        ends = model.end_outputs(model(batch.inputs, batch.layout))
    placed = [(g, k) for k in range(4) for g, item in enumerate(items) if k < len(item["responses"])]
    assert table[:, LENGTH].tolist() == [len(items[g]["responses"][k]) for g, k in placed]
    torch.testing.assert_close(table[:, SCORE], ends[:, 0])  # the reward is the quality head alone
    torch.testing.assert_close(table[:, LENGTH_REWARD], ends[:, 1])
    assert Preference().table_rows(model, model(batch.inputs, batch.layout), batch)[:, LENGTH_REWARD].isnan().all()


def test_a_reward_that_counts_tokens_is_at_chance_on_a_length_balanced_set():
    rows = make_length_confounded_pairs(200, seed=3, chosen_longer=0.5, held_out=True)
    chosen_lengths = np.array([len(row["chosen"]) for row in rows])
    rejected_lengths = np.array([len(row["rejected"]) for row in rows])
    bias = length_bias(chosen_lengths, rejected_lengths, chosen_lengths, rejected_lengths)
    assert (bias["accuracy_chosen_longer"], bias["accuracy_chosen_shorter"]) == (1.0, 0.0)
    assert bias["balanced_accuracy"] == 0.5 and bias["longer_preferred_by_data"] == 0.5


@pytest.mark.parametrize("share", [0.8, 0.5])
def test_confounded_pairs_pad_the_chosen_answer_in_the_given_share(share):
    rows = make_length_confounded_pairs(100, seed=0, chosen_longer=share)
    longer = [row["chosen"].count(FILLER) > row["rejected"].count(FILLER) for row in rows]
    assert sum(longer) == round(100 * share)
    assert all(row["chosen"].count(FILLER) != row["rejected"].count(FILLER) for row in rows)
    assert len({row["chosen"].count(FILLER) + row["rejected"].count(FILLER) for row in rows}) > 4


def test_zero3_two_ranks_with_token_budgets_train_and_hand_on_the_quality_head(tmp_path, model_dirs, capsys):
    """`--length_head` on two ZeRO-3 ranks, in token-budget batches (so the ranks hold
    different numbers of answers each step): the length head learns length and the quality head is far less
    correlated with it on a length-balanced held-out set; step 3's `v_head` is the quality row of the whole head
    beside it; rw_eval.py reports both heads; training's and rw_eval.py's metrics agree."""
    import json

    from conftest import launcher, launcher_env, run_ranks, rw_eval_output
    from rlhf_reward.utils.data.synthetic import write_jsonl
    from safetensors.torch import load_file

    data = tmp_path / "data"
    write_jsonl(make_length_confounded_pairs(600, seed=0, chosen_longer=0.75), str(data / "train.jsonl"))
    write_jsonl(make_length_confounded_pairs(200, seed=1, chosen_longer=0.5, held_out=True), str(data / "eval.jsonl"))
    out = tmp_path / "out"
    result = run_ranks([*launcher(2), "step2_reward_model/main.py", "--model_name_or_path", model_dirs["opt"],
                       "--data_path", str(data), "--data_split", "0,1,0", "--data_output_path", str(tmp_path / "cache"),
                       "--output_dir", str(out), "--zero_stage", "3", "--max_tokens_per_batch", "1536",
                       "--max_seq_len", "192", "--loss", "end_token", "--length_head", "--learning_rate", "1e-3",
                       "--num_train_epochs", "2", "--num_warmup_steps", "5", "--dtype", "fp32", "--deepspeed"],
                      env=launcher_env(2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout and "ZeRO stage 3" in result.stdout
    manifest = json.loads((out / "reward_model.json").read_text())
    assert manifest["length_head"] is True and manifest["attributes"]["names"] == ["quality", "length"]
    final = manifest["final_eval"]
    assert final["length/length_head_pearson"] > 0.8
    assert abs(final["length/pearson"]) < 0.5 * final["length/length_head_pearson"]
    head = load_file(str(out / "attribute_head.safetensors"))["weight"]
    step3 = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)["v_head.weight"]
    assert step3.shape == (1, head.shape[1]) and torch.equal(step3[0], head[0])
    text = rw_eval_output(["--model_path", str(out), "--data_path", str(data), "--data_split", "0,1,0",
                           "--data_output_path", str(tmp_path / "cache"), "--report", str(tmp_path / "r.json")], capsys)
    assert "Length head (ODIN)" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["length_head"]["length head"]["pearson"] == pytest.approx(final["length/length_head_pearson"])
    for key in ("accuracy", "length/pearson", "length/balanced_accuracy"):
        assert report["held_out"][key] == pytest.approx(final[key]), key
    # hf/ holds the quality head alone, and evaluates as OUTPUT's reward does
    text = rw_eval_output(["--model_path", str(out / "hf"), "--data_path", str(data), "--data_split", "0,1,0",
                           "--data_output_path", str(tmp_path / "cache"), "--report", str(tmp_path / "hf.json")],
                          capsys)
    exported = json.loads((tmp_path / "hf.json").read_text())
    assert "Length head" not in text and "length_head" not in exported
    assert exported["held_out"]["length/pearson"] == pytest.approx(final["length/pearson"], abs=1e-4)


def test_length_head_flags_are_checked(capsys):
    """The head needs compared answers and unsorted batches; its batches are unsorted by default."""
    from step2_reward_model.flags import parse_training_args

    assert parse_training_args(["--model_name_or_path", "m", "--length_head"]).length_grouping_steps == 0
    assert parse_training_args(["--model_name_or_path", "m"]).length_grouping_steps == 32
    for extra, message in ((["--length_grouping_steps", "8"], "leave out --length_grouping_steps"),
                           (["--objective", "regression"], "--length_head needs --objective preference"),
                           (["--process_reward"], "--length_head needs --objective preference"),
                           (["--length_loss_coefficient", "-1"], "at least 0.0")):
        with pytest.raises(SystemExit) as stopped:
            parse_training_args(["--model_name_or_path", "m", "--length_head", *extra])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
