"""Training checkpoints (not the final model, which `output.py` saves): save every N steps, keep
the last K, resume exactly where a run stopped.

    OUTPUT/checkpoints/step-000040/
        mp_rank_00_model_states.pt, zero_pp_rank_*   DeepSpeed's checkpoint: weights, optimizer,
                                                     scheduler (ZeRO shards: one set per rank)
        rng-rank-<r>.pt                              each rank's random states (dropout)
        trainer_state.json                           data position, counters, the run's settings
        complete.json                                the marker: every file above and its size

A save goes into `.partial-step-000040/`; the marker is written last, after every file is on
disk, and only then is the folder renamed into place. A crash or kill at any moment leaves either
no `step-000040` or a whole one, and `--resume` takes the newest folder whose marker matches its
files. Checkpoints load with `torch.load(weights_only=True)`: tensors and plain data only.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from rlhf_reward.utils.errors import UserError, first_line
from rlhf_reward.utils.files import fsync_path, write_json
from rlhf_reward.utils.runtime import barrier

FOLDER = "checkpoints"
MARKER = "complete.json"
STATE = "trainer_state.json"
STATE_FORMAT = 1
PARTIAL = ".partial-"
NAME = re.compile(r"step-(\d+)")
# The plain-data classes DeepSpeed pickles into its optimizer states; weights_only accepts these
# and refuses anything else (a class with code in its unpickling).
DEEPSPEED_STATE_TYPES = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
# Flags that change what the next step computes: a resumed run must use the same ones.
RUN_FLAGS = ("model_name_or_path", "data_path", "data_split", "seed", "per_device_train_batch_size",
             "gradient_accumulation_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type",
             "num_warmup_steps", "weight_decay", "max_seq_len", "loss", "center_rewards_coefficient",
             "margin_source", "data_weights", "max_responses_per_prompt", "process_reward", "zero_stage",
             "dtype", "lora_dim", "only_optimize_lora", "lora_learning_rate", "prefix_sharing",
             "length_grouping_steps", "dropout", "max_tokens_per_batch", "objective", "attributes",
             "attribute_weights", "attribute_scale", "pair_loss_coefficient", "length_head", "length_loss_coefficient",
             "orthogonality_loss_coefficient")


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint so that a resumed run continues exactly."""

    epoch: int = 0  # the epoch being trained
    batch: int = 0  # batches of that epoch already taken (skipped ones included)
    update: int = 0  # optimizer steps taken
    micro_steps: int = 0  # forward/backward passes taken
    skipped: int = 0  # steps skipped for a NaN or inf loss
    epoch_loss: float = 0.0  # sum over this epoch's taken steps
    epoch_steps: int = 0
    window_loss: float = 0.0  # sum since the last printed loss


def checkpoint_folder(output_dir: str) -> str:
    return os.path.join(output_dir, FOLDER)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def run_settings(args: argparse.Namespace, world_size: int, train_examples: int) -> dict:
    """What must not change between a run and its resumption (JSON-ready)."""
    settings = {flag: getattr(args, flag) for flag in RUN_FLAGS}
    settings["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    return {**settings, "world_size": world_size, "train_examples": train_examples}


def check_settings(saved: dict, current: dict, path: str) -> None:
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise UserError(f"--resume {path}: the run's settings changed since this checkpoint "
                        f"({'; '.join(changed)}): use the same flags and data, or start a new --output_dir")


def is_complete(path: str) -> bool:
    """The marker is there and every file it lists has the size it recorded."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as handle:
            files = json.load(handle)["files"]
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def saved_steps(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(match.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (match := NAME.fullmatch(name))]
    return sorted((step, path) for step, path in found if is_complete(path))


def latest(folder: str) -> str | None:
    steps = saved_steps(folder)
    return steps[-1][1] if steps else None


def resume_path(resume: str | None, output_dir: str | None) -> str | None:
    """The checkpoint `--resume` names (`auto`: the newest complete one under OUTPUT), or None to
    start from the beginning. Without --resume, a folder of earlier checkpoints is an error
    rather than something to overwrite."""
    folder = checkpoint_folder(output_dir) if output_dir else None
    if resume is None:
        if folder and (found := latest(folder)):
            raise UserError(f"{folder} holds checkpoints of an earlier run (newest: {os.path.basename(found)}): "
                            "pass --resume to continue it, or remove that folder to start over")
        return None
    if resume != "auto":
        if not is_complete(resume):
            raise UserError(f"--resume {resume}: not a complete checkpoint folder (no {MARKER}, or a file is "
                            "missing or has the wrong size)")
        return resume
    if not folder:
        raise UserError("--resume needs --output_dir (its checkpoints/ folder is where runs are saved)")
    return latest(folder)


def rng_states() -> dict:
    """This rank's random states, as tensors and plain data (loadable with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save(engine, output_dir: str, progress: Progress, settings: dict, rank: int, keep_last: int) -> str:
    """Write the checkpoint of step `progress.update` atomically (every rank calls this) and prune
    to the newest `keep_last` (0 keeps all). Returns the checkpoint's folder."""
    folder = checkpoint_folder(output_dir)
    name = step_name(progress.update)
    partial = os.path.join(folder, PARTIAL + name)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        os.makedirs(folder, exist_ok=True)
    barrier()
    engine.save_checkpoint(folder, tag=PARTIAL + name, save_latest=False)
    torch.save(rng_states(), os.path.join(partial, f"rng-rank-{rank}.pt"))
    barrier()
    final = os.path.join(folder, name)
    if rank == 0:
        write_json(os.path.join(partial, STATE),
                    {"format": STATE_FORMAT, "progress": asdict(progress), "settings": settings})
        files = {}
        for root, _, names in os.walk(partial):
            for file_name in names:
                path = os.path.join(root, file_name)
                fsync_path(path)
                files[os.path.relpath(path, partial)] = os.path.getsize(path)
        write_json(os.path.join(partial, MARKER), {"step": progress.update, "files": files})
        fsync_path(partial)
        if os.path.isdir(final):  # the same step saved again (a stop right after a scheduled save)
            _discard(final)
        os.replace(partial, final)
        fsync_path(folder)
        prune(folder, keep_last)
    barrier()
    return final


def _discard(path: str) -> None:
    """Remove a checkpoint so that no moment leaves a half-deleted folder that looks whole: the
    marker goes first."""
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path, ignore_errors=True)


def prune(folder: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of killed saves."""
    if keep_last > 0:
        for _, path in saved_steps(folder)[:-keep_last]:
            _discard(path)
    for name in os.listdir(folder):
        if name.startswith(PARTIAL):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def safe_load(path: str, map_location=None):
    """`torch.load(weights_only=True)`: a file that carries code (a pickled function, or a class
    with its own unpickling) is refused instead of run."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_STATE_TYPES):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: it holds Python objects other than tensors and plain "
                        f"data, which could run code ({first_line(err, 200)})") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's checkpoint reader, with `safe_load` instead of `torch.load(weights_only=False)`."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def load(engine, path: str, rank: int, settings: dict) -> Progress:
    """Restore weights, optimizer, scheduler and random states from checkpoint `path`; returns
    where training stood."""
    with open(os.path.join(path, STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    check_settings(state["settings"], settings, path)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    folder, tag = os.path.split(os.path.normpath(path))
    loaded, _ = engine.load_checkpoint(folder, tag=tag)
    if loaded is None:
        raise UserError(f"--resume {path}: DeepSpeed could not load this checkpoint")
    set_rng_states(safe_load(os.path.join(path, f"rng-rank-{rank}.pt")))
    return Progress(**state["progress"])
