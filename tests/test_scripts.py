"""The shipped launch scripts, run unchanged through the real `deepspeed` launcher with `--dry_run`,
resolve to the flags and DeepSpeed config they promise; and main.py accepts every DeepSpeed-Chat
step-2 flag. The scripts run in parallel (each launcher run takes ~10 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = os.path.dirname(sys.executable)
FOUR_DATASETS = ["Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
                 "yitingxie/rlhf-reward-datasets"]
FP16_WARNING = "warning: --dtype fp16 needs a GPU; training in fp32 on the CPU"
TIMEOUT = 300
# DeepSpeed picks the CUDA accelerator when there is a GPU; on this CPU-only machine fp16 falls back.
CPU_ONLY = not torch.cuda.is_available()

# name -> (script, ZERO_STAGE passed as the second argument: never the script's default)
SCRIPTS = {
    "opt_single_gpu": ("training_scripts/opt/single_gpu/run_350m.sh", 2),
    "opt_single_node": ("training_scripts/opt/single_node/run_350m.sh", 1),
    "opt_multi_node": ("training_scripts/opt/multi_node/run_350m.sh", 3),
    "opt_helpsteer2": ("training_scripts/opt/single_gpu/run_350m_helpsteer2.sh", 1),
    "llama2_7b": ("training_scripts/llama2/run_llama2_7b.sh", 2),
    "llama2_7b_lora": ("training_scripts/llama2/run_llama2_7b_lora.sh", 1),
}

# With a hostfile, deepspeed's runner checks `ssh <first host> hostname` (and asks `hostname -I`
# for the master address) even when the file names one host; this machine runs no sshd, so a stub
# answers those two questions. One host then takes the launcher's local path, as on one node.
SSH_STUB = """#!/bin/sh
for arg; do last=$arg; done
case "$last" in
  hostname) echo localhost ;;
  -I) echo 127.0.0.1 ;;
  *) echo "ssh stub: unexpected command: $*" >&2; exit 255 ;;
esac
"""


def base_env(extra: dict | None = None) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PATH": VENV_BIN + os.pathsep + env.get("PATH", ""), "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1"})
    env.update(extra or {})
    return env


def dry_run_json(text: str) -> dict:
    """The JSON object the dry run prints: it starts at a line that is exactly '{'."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == "{"]
    assert starts, f"no dry-run JSON in:\n{text[-3000:]}"
    obj, _ = json.JSONDecoder().raw_decode("".join(lines[starts[0]:]))
    return obj


MAIN_FLAGS_ARGV = [
    "--data_path", "a", "b",
    "--data_split", "6,2,2",
    "--data_output_path", "/tmp/rm-cache/",
    "--num_padding_at_beginning", "0",
    "--per_device_train_batch_size", "3",
    "--per_device_eval_batch_size", "5",
    "--max_seq_len", "256",
    "--learning_rate", "1e-4",
    "--weight_decay", "0.05",
    "--num_train_epochs", "2",
    "--gradient_accumulation_steps", "2",
    "--lr_scheduler_type", "linear",
    "--num_warmup_steps", "7",
    "--output_dir", "out-dir",
    "--seed", "42",
    "--local_rank", "0",
    "--gradient_checkpointing",
    "--dropout", "0.3",
    "--offload",
    "--dtype", "bf16",
    "--zero_stage", "3",
    "--lora_dim", "16",
    "--lora_module_name", "h.",
    "--only_optimize_lora",
    "--lora_learning_rate", "1e-3",
    "--eval_interval", "10",
    "--eval_iters", "4",
    "--compute_fp32_loss",
    "--enable_tensorboard",
    "--tensorboard_path", "tb-dir",
    "--add_eot_token",
    "--deepspeed",
    "--disable_dropout",
    "--print_loss",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every script (and a plain `python main.py --dry_run`) started at once, then awaited."""
    root = tmp_path_factory.mktemp("scripts")
    stub_dir = root / "stub-bin"
    stub_dir.mkdir()
    (stub_dir / "ssh").write_text(SSH_STUB)
    (stub_dir / "ssh").chmod(0o755)
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n")

    started = {}
    for name, (script, stage) in SCRIPTS.items():
        out = root / name
        extra = {}
        if name == "opt_multi_node":
            extra = {"HOSTFILE": str(hostfile), "PATH": f"{stub_dir}{os.pathsep}{VENV_BIN}{os.pathsep}"
                                                        f"{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(["bash", script, str(out), str(stage), "--dry_run"], cwd=REPO_ROOT,
                                env=base_env(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        started[name] = (proc, {"out": out, "stage": stage})
    argv = [sys.executable, "step2_reward_model/main.py", "--model_name_or_path", "X", "--dry_run", *MAIN_FLAGS_ARGV]
    started["main_all_flags"] = (subprocess.Popen(argv, cwd=REPO_ROOT, env=base_env(), stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True, start_new_session=True), {})

    results = {}
    try:
        for name, (proc, info) in started.items():
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            results[name] = {**info, "returncode": proc.returncode, "stdout": stdout or "", "stderr": stderr or ""}
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:  # timed out: end the launcher and the ranks it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name in SCRIPTS:
        log = Path(results[name]["out"]) / "training.log"
        results[name]["log"] = log.read_text() if log.exists() else ""
    return results


def script_run(runs: dict, name: str) -> tuple[dict, str, dict]:
    run = runs[name]
    assert run["returncode"] == 0, f"{name} exited {run['returncode']}:\n{run['stdout']}\n{run['log'][-4000:]}"
    assert run["log"], f"{name} wrote no {run['out']}/training.log"
    assert run["stdout"] == "", "the script sends everything to training.log"
    return run, run["log"], dry_run_json(run["log"])


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_runs_through_the_launcher(name, runs):
    run, log, resolved = script_run(runs, name)
    args, ds = resolved["args"], resolved["deepspeed_config"]
    # It really went through the deepspeed launcher, which passes --local_rank and sets WORLD_SIZE.
    assert "launch.py" in log and "--local_rank=0" in log
    assert args["local_rank"] == 0
    assert resolved["world_size"] == 1
    assert args["dry_run"] is True and args["deepspeed"] is True
    assert args["output_dir"] == str(run["out"])
    assert args["zero_stage"] == run["stage"] == ds["zero_optimization"]["stage"]
    assert args["data_split"] == ("0,1,0" if name == "opt_helpsteer2" else "2,4,4")  # all of HelpSteer2's train
    assert args["weight_decay"] == 0.1
    assert args["seed"] == 1234 and args["lr_scheduler_type"] == "cosine"
    assert ds["train_micro_batch_size_per_gpu"] == args["per_device_train_batch_size"]
    assert ds["gradient_accumulation_steps"] == args["gradient_accumulation_steps"]
    assert ds["train_batch_size"] == (args["per_device_train_batch_size"] * resolved["world_size"]
                                      * args["gradient_accumulation_steps"])


@pytest.mark.parametrize("name", ["opt_single_gpu", "opt_single_node", "opt_multi_node"])
def test_opt_scripts(name, runs):
    _, log, resolved = script_run(runs, name)
    args, ds = resolved["args"], resolved["deepspeed_config"]
    assert args["model_name_or_path"] == "facebook/opt-350m"
    assert args["num_padding_at_beginning"] == 1
    assert args["dropout"] == 0.0
    assert "bf16" not in ds
    if CPU_ONLY:  # fp16 (the default) without a GPU: trains in fp32, and says so
        assert args["dtype"] == "fp32"
        assert FP16_WARNING in log.splitlines()
        assert "fp16" not in ds
    else:
        assert args["dtype"] == "fp16" and ds["fp16"]["enabled"] is True
    assert args["offload"] is False and ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert args["lora_dim"] == 0


def test_opt_single_gpu(runs):
    run, _, resolved = script_run(runs, "opt_single_gpu")
    args, ds = resolved["args"], resolved["deepspeed_config"]
    out = str(run["out"])
    assert args["data_path"] == ["Dahoas/rm-static"]
    assert args["gradient_accumulation_steps"] == 4
    assert args["enable_tensorboard"] is True and args["tensorboard_path"] == out
    assert ds["tensorboard"]["enabled"] is True
    assert ds["tensorboard"]["output_path"].startswith(out)
    assert args["per_device_train_batch_size"] == 16
    assert ds["train_batch_size"] == 16 * 1 * 4


def test_opt_single_node(runs):
    _, _, resolved = script_run(runs, "opt_single_node")
    args, ds = resolved["args"], resolved["deepspeed_config"]
    assert args["data_path"] == FOUR_DATASETS
    assert args["max_seq_len"] == 512
    assert args["learning_rate"] == 5e-5
    assert args["per_device_train_batch_size"] == 8 and args["per_device_eval_batch_size"] == 8
    assert args["gradient_accumulation_steps"] == 1
    assert args["enable_tensorboard"] is False and ds["tensorboard"]["enabled"] is False
    assert ds["train_batch_size"] == 8


def test_opt_multi_node(runs):
    _, log, resolved = script_run(runs, "opt_multi_node")
    args, ds = resolved["args"], resolved["deepspeed_config"]
    assert "Unable to find hostfile" not in log, "HOSTFILE was not used"
    assert args["data_path"] == FOUR_DATASETS
    assert args["per_device_train_batch_size"] == 2 and args["max_seq_len"] == 512
    assert ds["train_batch_size"] == 2


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_7b_lora"])
def test_llama_scripts(name, runs):
    _, log, resolved = script_run(runs, name)
    args, ds = resolved["args"], resolved["deepspeed_config"]
    assert args["model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert args["data_path"] == ["Dahoas/rm-static"]
    assert args["num_padding_at_beginning"] == 0
    assert args["learning_rate"] == 9.65e-6
    assert args["per_device_train_batch_size"] == 8 and args["max_seq_len"] == 512
    assert args["offload"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert args["gradient_checkpointing"] is True
    # bf16 is kept (only fp16 falls back on the CPU).
    assert args["dtype"] == "bf16" and ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert FP16_WARNING not in log
    assert args["dropout"] is None
    if name == "llama2_7b_lora":
        assert args["lora_dim"] == 128 and args["lora_module_name"] == "layers."
    else:
        assert args["lora_dim"] == 0


def test_main_accepts_every_deepspeed_chat_flag(runs):
    run = runs["main_all_flags"]
    assert run["returncode"] == 0, run["stderr"]
    resolved = dry_run_json(run["stdout"])
    args, ds = resolved["args"], resolved["deepspeed_config"]
    expected = {
        "data_path": ["a", "b"], "data_split": "6,2,2", "data_output_path": "/tmp/rm-cache/",
        "model_name_or_path": "X", "num_padding_at_beginning": 0, "per_device_train_batch_size": 3,
        "per_device_eval_batch_size": 5, "max_seq_len": 256, "learning_rate": 1e-4, "weight_decay": 0.05,
        "num_train_epochs": 2, "gradient_accumulation_steps": 2, "lr_scheduler_type": "linear",
        "num_warmup_steps": 7, "output_dir": "out-dir", "seed": 42, "local_rank": 0,
        "gradient_checkpointing": True, "offload": True, "dtype": "bf16", "zero_stage": 3, "lora_dim": 16,
        "lora_module_name": "h.", "only_optimize_lora": True, "lora_learning_rate": 1e-3, "eval_interval": 10,
        "eval_iters": 4, "compute_fp32_loss": True, "enable_tensorboard": True, "tensorboard_path": "tb-dir",
        "add_eot_token": True, "deepspeed": True, "disable_dropout": True, "print_loss": True, "dry_run": True,
        "dropout": 0.0,  # --disable_dropout (the older spelling) wins over --dropout 0.3
    }
    assert {key: args.get(key) for key in expected} == expected
    assert resolved["world_size"] == 1
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}
    assert ds["tensorboard"]["enabled"] is True and ds["tensorboard"]["output_path"].startswith("tb-dir")
    assert ds["train_batch_size"] == 3 * 1 * 2



def test_opt_helpsteer2(runs):
    """The multi-attribute recipe: regression on all of HelpSteer2's train split, its five attributes
    combined with NVIDIA's recommended weights for step 3."""
    _, _, resolved = script_run(runs, "opt_helpsteer2")
    args = resolved["args"]
    assert args["data_path"] == ["nvidia/HelpSteer2"] and args["data_split"] == "0,1,0"
    assert args["objective"] == "regression" and args["attribute_weights"] == ["helpsteer2"]
    assert args["max_seq_len"] == 2048 and args["gradient_checkpointing"] is True
