"""Runs that survive: checkpoints every N steps, exact resume after a real signal or a kill in the
middle of a save, NaN/inf losses skipped up to a bound, and checkpoints that carry code refused.
Every run is a real `main.py` process on the tiny model, compared with an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, launcher, launcher_env, run_cli, run_ranks, shared_memory_left
from rlhf_reward.utils.errors import UserError

from step2_reward_model import checkpoints
from step2_reward_model.flags import parse_training_args

VENV_BIN = os.path.dirname(sys.executable)
ENV = {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
# Dropout on, so that a resume that lost the random states would train differently; fp32 on every
# device, so that a run means the same on a GPU as on the CPU (where fp16 falls back to it).
FLAGS = ["--dtype", "fp32", "--data_split", "0,1,0", "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "32", "--max_seq_len", "128", "--learning_rate", "1e-3",
         "--num_warmup_steps", "5", "--num_train_epochs", "2", "--dropout", "0.1", "--eval_iters", "2", "--seed", "5",
         "--enable_tensorboard", "--print_loss", "--deepspeed"]
STEPS = 2 * 38  # 300 training pairs, 8 per step, 2 epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from rlhf_reward.utils.data.synthetic import write_dataset

    folder = tmp_path_factory.mktemp("resume_data")
    write_dataset(str(folder), train=300, evaluation=64)
    return str(folder)


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> str:
    """Log the loss at every step (DeepSpeed's steps_per_print), so runs compare step by step."""
    path = tmp_path_factory.mktemp("ds") / "ds_config.json"
    path.write_text(json.dumps({"steps_per_print": 1}))
    return str(path)


def command(out: Path, model_dir: str, data: str, ds_config: str, *extra: str, ranks: int = 0) -> list[str]:
    args = ["--model_name_or_path", model_dir, "--data_path", data, "--data_output_path", str(out.parent / "cache"),
            "--output_dir", str(out), "--tensorboard_path", str(out) + "-tb", *FLAGS,
            "--deepspeed_config", ds_config, *extra]
    if ranks:
        return [*launcher(ranks), "step2_reward_model/main.py", *args]
    return [sys.executable, "step2_reward_model/main.py", *args]


def ranks(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--num_gpus") + 1]) if "--num_gpus" in cmd else 1


def run(cmd: list[str], expect: int = 0) -> str:
    """`cmd` run to its end (a launcher command as the ranks it starts, run_ranks); its output."""
    env = {**ENV, **launcher_env(ranks(cmd))}
    result = run_ranks(cmd, env) if "--num_gpus" in cmd else run_cli(cmd, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == expect, log[-4000:]
    return log


def losses(out: Path) -> dict[int, float]:
    """train/loss by optimizer step, from every TensorBoard file the run (and its resumptions) wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out) + "-tb/step2_tensorboard")
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "pytorch_model.bin", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6, msg=key)


def signal_when(process: subprocess.Popen, log: Path, text: str, signum: int, group: bool = False) -> None:
    """Send `signum` once `text` shows in the run's log (the run is then mid-training)."""
    deadline = time.time() + 300
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.05)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV, **launcher_env(ranks(cmd)), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_for_group(process: subprocess.Popen, timeout: float = 120) -> None:
    """Until every process of the launcher's group (the ranks too) has exited."""
    process.wait(timeout=timeout)  # the launcher itself dies at once
    pgid, deadline = process.pid, time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError("ranks still running")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dirs, data, ds_config) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    run(command(out, model_dirs["opt"], data, ds_config, "--save_interval", "10", "--keep_last", "0"))
    return out


def test_checkpoints_every_interval_complete_and_pruned(uninterrupted, tmp_path, model_dirs, data, ds_config):
    steps = [step for step, _ in checkpoints.saved_steps(checkpoints.checkpoint_folder(str(uninterrupted)))]
    assert steps == [*range(10, STEPS, 10), STEPS]  # every 10 steps, and the end
    state = json.loads((uninterrupted / "checkpoints" / "step-000040" / checkpoints.STATE).read_text())
    assert state["progress"]["update"] == 40 and state["progress"]["epoch"] == 1  # epoch 2, 2 batches in
    assert state["progress"]["batch"] == 2
    out = tmp_path / "out"
    run(command(out, model_dirs["opt"], data, ds_config, "--save_interval", "10", "--keep_last", "2",
                "--num_train_epochs", "1"))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000030", "step-000038"]


def test_sigterm_saves_and_resume_matches_uninterrupted_run(uninterrupted, tmp_path, model_dirs, data, ds_config):
    out = tmp_path / "out"
    cmd = command(out, model_dirs["opt"], data, ds_config)
    log = tmp_path / "stopped.log"
    process = start(cmd, log)
    signal_when(process, log, "epoch 1 step 20:", signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "SIGTERM: finishing this step, then saving a checkpoint" in text
    (stopped_at, path), = checkpoints.saved_steps(checkpoints.checkpoint_folder(str(out)))
    assert f"stopped by SIGTERM after step {stopped_at} " in text and f"saved {path}" in text
    assert 0 < stopped_at < STEPS
    assert not (out / "pytorch_model.bin").exists()

    resumed = run(cmd + ["--resume"])
    assert f"resumed from {path}: step {stopped_at}" in resumed
    reference, ours = losses(uninterrupted), losses(out)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # before the stop, and after the resume
        assert ours[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert_same_weights(out, uninterrupted)
    # The finished run saved its last step, so resuming it again trains nothing.
    again = run(cmd + ["--resume"])
    assert f"resumed from {checkpoints.checkpoint_folder(str(out))}/step-{STEPS:06d}" in again


def test_without_resume_earlier_checkpoints_are_not_overwritten(uninterrupted, tmp_path):
    with pytest.raises(UserError, match="holds checkpoints of an earlier run .*pass --resume"):
        checkpoints.resume_path(None, str(uninterrupted))
    assert checkpoints.resume_path("auto", str(tmp_path)) is None  # nothing yet: start from the beginning


def test_resume_refuses_changed_settings(uninterrupted, model_dirs, data, ds_config):
    """A checkpoint keeps the settings of the command that wrote it; the same command resumes from
    it, and a change to any of them is an error naming the flag, raised before anything is loaded."""
    path = str(uninterrupted / "checkpoints" / "step-000010")
    saved = json.loads((Path(path) / checkpoints.STATE).read_text())["settings"]
    argv = command(uninterrupted, model_dirs["opt"], data, ds_config, "--save_interval", "10", "--keep_last", "0")[2:]

    def settings(*extra: str, world_size: int = 1) -> dict:
        return checkpoints.run_settings(parse_training_args([*argv, *extra]), world_size, saved["train_examples"])

    checkpoints.check_settings(saved, settings(), path)
    with pytest.raises(UserError) as excinfo:
        checkpoints.load(None, path, 0, settings("--learning_rate", "2e-3"))
    assert str(excinfo.value).startswith(f"--resume {path}: the run's settings changed since this checkpoint "
                                         "(learning_rate 0.001 -> 0.002): ")
    changes = {"seed": ["--seed", "6"], "per_device_train_batch_size": ["--per_device_train_batch_size", "4"],
               "zero_stage": ["--zero_stage", "2"], "loss": ["--loss", "end_token"],
               "prefix_sharing": ["--no_prefix_sharing"], "dropout": ["--dropout", "0.2"]}
    for flag, extra in changes.items():
        with pytest.raises(UserError, match=rf"\({flag} "):
            checkpoints.check_settings(saved, settings(*extra), path)
    with pytest.raises(UserError, match=r"\(world_size 1 -> 2\)"):
        checkpoints.check_settings(saved, settings(world_size=2), path)
    for flag in checkpoints.RUN_FLAGS:  # every flag that changes the computation is compared
        with pytest.raises(UserError, match=rf"\({flag} .* -> 'changed'\)"):
            checkpoints.check_settings(saved, {**settings(), flag: "changed"}, path)


KILL_IN_SAVE = """
import os, signal, sys, torch
save = torch.save
def dying_save(obj, path, *args, **kwargs):
    if ".partial-step-000020" in str(path) and str(path).endswith("_states.pt"):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path, *args, **kwargs)
torch.save = dying_save
sys.argv = ["main.py", *sys.argv[1:]]
from step2_reward_model.main import main
sys.exit(main())
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint(uninterrupted, tmp_path, model_dirs, data, ds_config):
    out = tmp_path / "out"
    cmd = command(out, model_dirs["opt"], data, ds_config, "--save_interval", "10")
    result = run_cli([sys.executable, "-c", KILL_IN_SAVE, *cmd[2:]], env=ENV)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    folder = out / "checkpoints"
    assert sorted(os.listdir(folder)) == [".partial-step-000020", "step-000010"]
    assert [step for step, _ in checkpoints.saved_steps(str(folder))] == [10]

    log = run(cmd + ["--resume"])
    assert f"resumed from {folder}/step-000010: step 10" in log
    assert not [name for name in os.listdir(folder) if name.startswith(".partial")]
    assert_same_weights(out, uninterrupted)


def test_incomplete_checkpoints_are_never_chosen(uninterrupted, tmp_path):
    import shutil

    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        name = checkpoints.step_name(step)
        shutil.copytree(uninterrupted / "checkpoints" / name, folder / name)
    (folder / "step-000030" / checkpoints.MARKER).unlink()  # killed before the marker (cannot happen: renamed last)
    with open(folder / "step-000020" / "mp_rank_00_model_states.pt", "r+b") as handle:
        handle.truncate(100)  # a file shorter than the marker says (a copy cut short)
    assert checkpoints.latest(str(folder)) == str(folder / "step-000010")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoints.resume_path(str(folder / "step-000020"), None)


NAN_AT = """
import dataclasses, math, sys, torch
from step2_reward_model.objectives import preference
loss, calls = preference.Preference.loss, [0]
def poisoned(self, model, rows, batch):
    result = loss(self, model, rows, batch)
    calls[0] += model.training  # training steps only
    if model.training and calls[0] in BAD:
        result = dataclasses.replace(result, loss=result.loss * math.nan)
    return result
preference.Preference.loss = poisoned
sys.argv = ["main.py", *sys.argv[1:]]
from step2_reward_model.main import main
sys.exit(main())
"""


def run_poisoned(bad: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` (a main.py command) with NaN losses at the training steps in the set `bad`."""
    return run_cli([sys.executable, "-c", f"BAD = {bad}\n" + NAN_AT, *cmd[2:]], env=ENV)


def test_nan_losses_are_skipped_and_counted(tmp_path, model_dirs, data, ds_config):
    out = tmp_path / "out"
    result = run_poisoned("{3, 7, 8}", command(out, model_dirs["opt"], data, ds_config, "--num_train_epochs", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 3 step(s) with a NaN or inf loss" in result.stdout
    steps = losses(out)
    assert len(steps) == 38 - 3 and all(map(math.isfinite, steps.values()))
    assert all(torch.isfinite(value).all() for value in weights(out).values())


def test_nan_losses_in_a_row_stop_with_a_checkpoint(tmp_path, model_dirs, data, ds_config):
    out = tmp_path / "out"
    result = run_poisoned("set(range(6, 10**6))",
                          command(out, model_dirs["opt"], data, ds_config, "--max_nonfinite_steps", "4"))
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: the loss was NaN or inf in 4 steps in a row, up to epoch 1 batch 9: training stopped; "
                     f"the weights from before them are saved in {out}/checkpoints/step-000005. Lower "
                     "--learning_rate or check the data (--max_nonfinite_steps sets how many are skipped first)"]
    state = torch.load(out / "checkpoints" / "step-000005" / "mp_rank_00_model_states.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["module"].values())


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "rng-rank-0.pt"])
def test_resume_refuses_a_checkpoint_that_carries_code(victim, uninterrupted, tmp_path, model_dirs, data,
                                                       ds_config):
    import shutil

    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "step-000010"
    shutil.copytree(uninterrupted / "checkpoints" / "step-000010", checkpoint)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):  # unpickling runs a shell command: exactly what must never happen
            return os.system, (f"touch {marker}",)

    state = torch.load(checkpoint / victim, weights_only=False)
    state["extra"] = Payload()
    torch.save(state, checkpoint / victim)
    files = json.loads((checkpoint / checkpoints.MARKER).read_text())
    files["files"][victim] = (checkpoint / victim).stat().st_size  # a well-formed checkpoint, but hostile
    (checkpoint / checkpoints.MARKER).write_text(json.dumps(files))

    log = run(command(out, model_dirs["opt"], data, ds_config, "--resume"), expect=2)
    assert not marker.exists(), "the checkpoint's code ran"
    assert f"error: {checkpoint / victim}: refused to load" in log


def test_two_ranks_zero3_token_budget_sigterm_and_resume_match_uninterrupted_run(tmp_path, model_dirs, data,
                                                                                ds_config):
    """A scheduler's SIGTERM to two ZeRO-3 ranks saves every rank's partition and random state, and the
    resumed run matches the uninterrupted one step by step. Token-budget batches (packed rows, a varying
    number of pairs per rank) with accumulation and gradient checkpointing, the hardest case to keep in
    lockstep; plain batches resume on one rank in test_sigterm_saves_and_resume_matches_uninterrupted_run."""
    flags = ["--zero_stage", "3", "--num_train_epochs", "1", "--max_tokens_per_batch", "400",
             "--gradient_accumulation_steps", "2", "--gradient_checkpointing"]
    reference = tmp_path / "full"
    full_log = run(command(reference, model_dirs["opt"], data, ds_config, *flags, ranks=2))
    assert "packed several to a row as wide as the longest, 400 tokens per device and step" in full_log
    out = tmp_path / "out"
    cmd = command(out, model_dirs["opt"], data, ds_config, *flags, ranks=2)
    log = tmp_path / "stopped.log"
    process = start(cmd, log)
    signal_when(process, log, "epoch 1 step 6:", signal.SIGTERM, group=True)
    wait_for_group(process)
    assert shared_memory_left(cmd) == []  # the stopped run left none
    (stopped_at, path), = checkpoints.saved_steps(checkpoints.checkpoint_folder(str(out)))
    assert f"stopped by SIGTERM after step {stopped_at} " in log.read_text()
    assert {"rng-rank-0.pt", "rng-rank-1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(path))
    run(cmd + ["--resume"])
    reference_losses, ours = losses(reference), losses(out)
    assert 0 < stopped_at < max(reference_losses)
    assert sorted(ours) == sorted(reference_losses)
    for step, value in reference_losses.items():
        assert ours[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step
    assert_same_weights(out, reference)
