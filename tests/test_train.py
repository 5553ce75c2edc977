"""Training end to end through DeepSpeed on the CPU, as a user runs it: learn the synthetic task to a
held-out accuracy well above chance, save, reload from disk alone and reproduce the scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO_ROOT,
    launcher,
    launcher_env,
    objective_forward,
    rounding_tolerance,
    run_cli,
    run_ranks,
    rw_eval_output,
    shared_memory_left,
    training_device,
)
from rlhf_reward.utils.data.build import DataSource, create_reward_datasets
from rlhf_reward.utils.data.collate import EvalShard, PairCollator
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from torch.utils.data import DataLoader

from step2_reward_model.output import load_reward_model

VENV_BIN = os.path.dirname(sys.executable)
COMMON = ["--data_split", "0,1,0", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
          "--max_seq_len", "128", "--learning_rate", "1e-3", "--num_warmup_steps", "10", "--eval_iters", "1000",
          "--num_train_epochs", "1", "--weight_decay", "0.1", "--deepspeed"]
# Chance is 0.5; after one epoch the tiny model gets the topic and manners kinds (two thirds of the
# pairs) nearly always right. The demo's longer recipe reaches >= 0.90.
MIN_ACCURACY = 0.72
PACKED = "batches: one packed row per prompt, computing it once, padded to their longest, "


def trained_dtype(ranks: int = 1) -> torch.dtype:
    """--dtype is left at DeepSpeed-Chat's default, fp16: a GPU trains and evaluates in it, the CPU in fp32."""
    return torch.float16 if training_device(ranks) == "cuda" else torch.float32


def train(tmp_path, model_dir: str, data_dir: str, *extra: str, ranks: int | None = None,
          through_launcher: bool = False):
    """main.py on one rank, or through the deepspeed launcher on `ranks` (forked as the ranks it starts,
    run_ranks, unless the launcher itself is asked for): OUTPUT, its manifest and the log."""
    out = tmp_path / "out"
    script = ["step2_reward_model/main.py", "--model_name_or_path", model_dir, "--data_path", data_dir,
              "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out), *COMMON, *extra]
    env = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", **launcher_env(ranks or 1)}
    command = [*launcher(ranks), *script] if ranks else [sys.executable, *script]
    result = run_ranks(command, env=env) if ranks and not through_launcher else run_cli(command, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if ranks:
        assert shared_memory_left(command) == []
    with open(out / "reward_model.json") as handle:
        return out, json.load(handle), result.stdout + result.stderr


@torch.no_grad()
def rescore(out, data_dir: str, cache: str, batch_size: int = 32) -> dict[str, float]:
    """Score the eval split with the model rebuilt from OUTPUT alone, batched as in training."""
    model = load_reward_model(str(out))
    tokenizer = load_hf_tokenizer(str(out))
    _, eval_set = create_reward_datasets(DataSource((data_dir,), "0,1,0", 1234, cache, str(REPO_ROOT)), tokenizer,
                                         128, END_OF_CONVERSATION_TOKEN)
    loader = DataLoader(EvalShard(eval_set, 0, 1), batch_size=batch_size,
                        collate_fn=PairCollator(tokenizer.pad_token_id))
    chosen, rejected = [], []
    for batch in loader:
        result = objective_forward(model, batch)
        chosen.append(result["chosen_mean_scores"])
        rejected.append(result["rejected_mean_scores"])
    chosen, rejected = torch.cat(chosen).double(), torch.cat(rejected).double()
    return {"accuracy": (chosen > rejected).double().mean().item(), "chosen": chosen.mean().item(),
            "rejected": rejected.mean().item(), "pairs": len(chosen)}


def assert_reproduces(saved: dict, rescored: dict, dtype: torch.dtype) -> None:
    """Rescored in fp32 from OUTPUT, the training-time evaluation (in `dtype`) is reproduced to the
    rounding of `dtype`: a tie may flip in fp32, and in fp16 any pair closer than its rounding."""
    assert rescored["pairs"] == saved["pairs"]
    flips = 1.5 if dtype == torch.float32 else 0.02 * saved["pairs"]
    assert rescored["accuracy"] == pytest.approx(saved["accuracy"], abs=flips / saved["pairs"])
    tolerance = rounding_tolerance(saved["chosen"], saved["rejected"], dtype=dtype)
    assert rescored["chosen"] == pytest.approx(saved["chosen"], abs=tolerance)
    assert rescored["rejected"] == pytest.approx(saved["rejected"], abs=tolerance)


@torch.no_grad()
def assert_hf_export_matches(out) -> None:
    """OUTPUT/hf, loaded by transformers alone, gives the rewards of the step-3 checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(str(out / "hf")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "hf"))
    texts = ["\n\nHuman: What is 2 plus 2?\n\nAssistant: 4" + END_OF_CONVERSATION_TOKEN,
             "\n\nHuman: Hello\n\nAssistant: Hi, how can I help you today?" + END_OF_CONVERSATION_TOKEN]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ours = load_reward_model(str(out)).forward_value(batch["input_ids"], batch["attention_mask"])
    expected = ours["chosen_end_scores"].tolist()
    assert classifier(**batch).logits[:, 0].tolist() == pytest.approx(expected, abs=rounding_tolerance(expected))


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, model_dirs, synthetic_dir):
    """One plain run (ZeRO 0, one rank, no launcher), shared by the tests that read its output."""
    tmp_path = tmp_path_factory.mktemp("zero0")
    out, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--zero_stage", "0", "--enable_tensorboard",
                           "--tensorboard_path", str(tmp_path / "tb"))
    return tmp_path, out, meta, log


def test_zero0_one_rank_learns_saves_and_reloads_exactly(zero0_run, synthetic_dir):
    tmp_path, out, meta, log = zero0_run
    final = meta["final_eval"]
    assert final["pairs"] == 300
    assert final["accuracy"] >= MIN_ACCURACY, log[-2000:]
    if training_device() == "cpu":  # --dtype defaults to fp16, which the CPU cannot run
        assert "warning: --dtype fp16 needs a GPU; training in fp32 on the CPU" in log and "dtype fp32" in log
    else:
        assert "dtype fp16" in log and "training in fp32" not in log
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "v_head.weight" in state and all(k == "v_head.weight" or k.startswith("rwtransformer.") for k in state)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert not [p for p in os.listdir(out) if p.startswith(".saving")]
    # Same batches as the training-time evaluation: the reloaded model gives the same numbers.
    assert_reproduces(final, rescore(out, synthetic_dir, str(tmp_path / "cache")), trained_dtype())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "step2_tensorboard"))
    events.Reload()
    assert {"eval/accuracy", "train/loss"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(final["accuracy"])


def test_zero2_end_token_loss_with_accumulation_and_checkpointing(tmp_path, model_dirs, synthetic_dir):
    """One epoch (COMMON's) of 8-pair micro-batches, two to a step: 0.82 held-out accuracy on this
    machine, where a second epoch doubled the test's time to prove the same things."""
    out, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--zero_stage", "2", "--loss", "end_token",
                           "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8",
                           "--gradient_checkpointing", "--step3_key_prefix", "rwtranrsformer", "--no_hf_export")
    assert meta["loss"] == "end_token" and PACKED in log
    state = torch.load(out / "pytorch_model.bin", weights_only=True)  # as the newest DeepSpeed-Chat names it
    assert all(k == "v_head.weight" or k.startswith("rwtranrsformer.") for k in state)
    assert not (out / "hf").exists() and meta["hf_export"] is None
    assert meta["final_eval"]["accuracy"] >= MIN_ACCURACY, log[-2000:]
    assert_reproduces(meta["final_eval"], rescore(out, synthetic_dir, str(tmp_path / "cache")), trained_dtype())


def test_zero3_two_ranks_through_the_launcher(tmp_path, model_dirs, synthetic_dir, capsys):
    """Two ranks under ZeRO-3 learn, gather and save weights that reload and score as in training; the
    run also scores a public benchmark at every evaluation, as rw_eval.py scores it on the saved model
    (test_public_benchmarks.py's checks, on this run so that one two-rank run serves both)."""
    from test_public_benchmarks import check_training_scores_benchmark_as_rw_eval, small_rewardbench2

    benchmark = small_rewardbench2(tmp_path)
    out, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--zero_stage", "3",
                           "--per_device_train_batch_size", "8", "--eval_benchmark", f"rewardbench2:{benchmark}",
                           "--eval_interval", "40", ranks=2, through_launcher=True)
    assert "2 rank(s)" in log and "ZeRO stage 3" in log and PACKED in log
    assert meta["final_eval"]["pairs"] == 300  # each eval pair counted once across the two ranks
    assert meta["final_eval"]["accuracy"] >= MIN_ACCURACY, log[-2000:]
    # Gathered from both ranks' shards: full-size tensors that reload and score as in training.
    assert_reproduces(meta["final_eval"], rescore(out, synthetic_dir, str(tmp_path / "cache")), trained_dtype(2))
    assert_hf_export_matches(out)
    check_training_scores_benchmark_as_rw_eval(out, meta, log, benchmark, trained_dtype(2), tmp_path, capsys)


def test_unshared_plain_batches_reach_the_same_accuracy(zero0_run, tmp_path, model_dirs, synthetic_dir):
    """The fast defaults (prefix sharing, length grouping) change how batches are laid out, not
    what the model learns: DeepSpeed-Chat-style batches reach the same held-out accuracy."""
    _, _, fast, fast_log = zero0_run
    _, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--zero_stage", "0", "--no_prefix_sharing",
                         "--length_grouping_steps", "0")
    unshared = "batches: one row per response, padded to their longest, 16 per device and step, in plain shuffled"
    assert PACKED in fast_log and unshared in log
    # One run each, 300 held-out pairs: the difference of two accuracies near 0.8 has a standard error
    # of about 0.034, so 0.1 is three of them (a different first batch moved it from 0.02 to 0.06).
    assert meta["final_eval"]["accuracy"] == pytest.approx(fast["final_eval"]["accuracy"], abs=0.1)


def test_a_model_without_prefix_sharing_falls_back_and_learns(tmp_path, model_dirs, synthetic_dir):
    out, meta, log = train(tmp_path, model_dirs["gpt_neox"], synthetic_dir, "--zero_stage", "0")
    assert "note: prefix sharing is off (model type gpt_neox is not among" in log
    assert "batches: one row per response" in log
    assert meta["final_eval"]["accuracy"] >= MIN_ACCURACY, log[-2000:]
    assert_reproduces(meta["final_eval"], rescore(out, synthetic_dir, str(tmp_path / "cache")), trained_dtype())


def test_lora_only_adapters_train_and_are_merged_into_the_saved_weights(tmp_path, model_dirs, synthetic_dir):
    out, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--zero_stage", "0", "--lora_dim", "8",
                           "--lora_module_name", "decoder.layers.", "--only_optimize_lora",
                           "--lora_learning_rate", "1e-2")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert not [k for k in state if "lora" in k or "base_layer" in k]
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_dirs["opt"]).state_dict()
    layer = "decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[f"rwtransformer.{layer}"], base[layer])  # the adapter was folded in
    embed = state["rwtransformer.decoder.embed_tokens.weight"]
    assert torch.equal(embed[: base["decoder.embed_tokens.weight"].shape[0]], base["decoder.embed_tokens.weight"])
    assert meta["final_eval"]["accuracy"] > 0.6, log[-2000:]
    assert_reproduces(meta["final_eval"], rescore(out, synthetic_dir, str(tmp_path / "cache")), trained_dtype())


def test_rw_eval_scores_what_training_saved(zero0_run, capsys):
    out = zero0_run[1]
    prompt = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    stdout = rw_eval_output(["--model_path", str(out), "--prompt", prompt,
                             "--chosen", " Gladly, here you go. Put it in hot water for ten minutes.",
                             "--rejected", " Whatever, not my problem. Put it in hot water for ten minutes."], capsys)
    assert "preferred: chosen" in stdout
    rewards = [float(line.split(":")[1]) for line in stdout.splitlines() if "reward:" in line]
    model = load_reward_model(str(out))
    tokenizer = load_hf_tokenizer(str(out))
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] + tokenizer(
        " Gladly, here you go. Put it in hot water for ten minutes." + END_OF_CONVERSATION_TOKEN,
        add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.forward_value(torch.tensor([ids]))["chosen_end_scores"].item()
    assert rewards[0] == pytest.approx(expected, abs=1e-4)


def bad_run(tmp_path, model_dir: str, data: list[str], *extra: str) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "step2_reward_model/main.py", "--model_name_or_path", model_dir,
                    "--data_path", *data, "--data_output_path", str(tmp_path / "cache"), *COMMON, *extra],
                   env={"HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", ["missing_file", "missing_model"])
def test_bad_input_is_one_clear_line(case, tmp_path, model_dirs, synthetic_dir):
    """main.py turns an error in the data or the model into one `error:` line and exit status 2. Each
    error's wording is tested in-process where it is raised (tests/test_data.py, test_model.py,
    test_hostile_data.py): unknown ids, the hub offline, missing columns, nothing left after
    cleaning, --max_seq_len too small."""
    model, data, expected = model_dirs["opt"], [synthetic_dir], None
    if case == "missing_file":
        data, expected = [str(tmp_path / "nope.jsonl")], "nope.jsonl"
    elif case == "missing_model":
        model, expected = str(tmp_path / "no_model"), "no_model"
    result = bad_run(tmp_path, model, data)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


def test_demo_assets_are_built_offline(tmp_path):
    result = run_cli([sys.executable, "training_scripts/cpu/prepare_demo.py", str(tmp_path / "demo"),
                      "--train_pairs", "30", "--eval_pairs", "9"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "base_model" / "config.json").is_file()
    lines = (tmp_path / "demo" / "data" / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 9 and {"prompt", "chosen", "rejected"} == set(json.loads(lines[0]))
    shutil.rmtree(tmp_path / "demo")


def test_step3_style_critic_load(zero0_run):
    """Play DeepSpeed-Chat's step 3: model from the saved config alone, embeddings resized to the
    tokenizer's length rounded up to 8, then the whole state dict loaded strictly, tensors only."""
    import math

    from transformers import AutoConfig, AutoModel

    out = zero0_run[1]
    tokenizer = load_hf_tokenizer(str(out))
    backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(out)))
    backbone.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    critic = torch.nn.Module()
    critic.rwtransformer = backbone
    critic.v_head = torch.nn.Linear(backbone.config.word_embed_proj_dim, 1, bias=False)
    critic.load_state_dict(torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True), strict=True)
    ours = load_reward_model(str(out))
    assert torch.equal(critic.v_head.weight, ours.v_head.weight)


def test_saved_stats_and_full_evaluation_match_training(zero0_run, synthetic_dir, capsys):
    """rw_eval's full evaluation of the held-out split reproduces training's final numbers, and
    reward_stats.json describes the same rewards."""
    tmp_path, out, meta, _ = zero0_run
    final = meta["final_eval"]
    with open(out / "reward_stats.json") as handle:
        stats = json.load(handle)
    assert stats["pairs"] == final["pairs"] == 300 and stats["all"]["count"] == 600
    tolerance = rounding_tolerance(final["chosen"], final["rejected"], dtype=trained_dtype())
    assert stats["chosen"]["mean"] == pytest.approx(final["chosen"], abs=tolerance)
    assert stats["rejected"]["mean"] == pytest.approx(final["rejected"], abs=tolerance)
    assert stats["all"]["min"] <= stats["all"]["q25"] <= stats["all"]["median"] <= stats["all"]["max"]
    assert (out / "hf" / "model.safetensors").is_file() and meta["hf_export"] == "hf"

    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    stdout = rw_eval_output(["--model_path", str(out), "--data_path", synthetic_dir, "--data_split", "0,1,0",
                             "--data_output_path", str(tmp_path / "cache"), "--report", str(report_path),
                             "--plots", str(plots), "--batch_size", "32"], capsys)
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    assert summary["pairs"] == 300
    assert_reproduces(final, {"pairs": summary["pairs"], "accuracy": summary["accuracy"],
                              "chosen": summary["chosen_mean"], "rejected": summary["rejected_mean"]}, trained_dtype())
    assert report["rewards"]["all"]["mean"] == pytest.approx(stats["all"]["mean"], abs=tolerance)
    assert [source["pairs"] for source in report["by_source"].values()] == [300]
    assert sum(bucket["pairs"] for bucket in report["by_length"]) == 300
    assert 0 <= report["calibration"]["ece"] <= 1 and report["calibration"]["brier"] < 0.25
    assert f"{summary['accuracy']:.4f}" in stdout
    assert sorted(os.listdir(plots)) == ["reliability.png", "reward_histogram.png", "reward_vs_length.png"]


@pytest.mark.parametrize("layout", [["--no_prefix_sharing"], [], ["--max_tokens_per_batch", "512"]])
def test_a_max_seq_len_past_the_position_table_is_one_line_at_start(layout, tmp_path, synthetic_dir, capsys):
    """OPT's learned position table has 64 rows here: --max_seq_len 128 stops before any data is read,
    with one line naming both numbers and the flag, whether rows are padded, share prompts or are packed."""
    from rlhf_reward.utils.data.synthetic import make_pairs
    from rlhf_reward.utils.tiny import save_tiny_model

    from step2_reward_model.main import main

    model_dir = str(tmp_path / "opt64")
    save_tiny_model(model_dir, [row["prompt"] + row["chosen"] for row in make_pairs(100, 0)], "opt",
                    max_positions=64)
    cache = tmp_path / "cache"
    argv = ["--model_name_or_path", model_dir, "--data_path", synthetic_dir, "--data_output_path", str(cache),
            *COMMON, *layout]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = "--max_seq_len 128 is longer than the 64 positions of model type opt: pass --max_seq_len 64 or less"
    assert [text for text in err.splitlines() if text.startswith("error:")] == [f"error: {line}"], err
    assert "Traceback" not in err and not cache.exists()


def test_rw_eval_refuses_a_max_seq_len_past_the_position_table(zero0_run, capsys):
    from rw_eval import main as rw_eval_main

    out = zero0_run[1]
    assert rw_eval_main(["--model_path", str(out), "--max_seq_len", "1024"]) == 2
    assert capsys.readouterr().err == ("error: --max_seq_len 1024 is longer than the 512 positions of model type "
                                       "opt: pass --max_seq_len 512 or less\n")
