"""Around the training step: the step itself with its NaN guard, stopping on a signal, and the
periodic work (log, evaluate, save a checkpoint) that `main.py`'s loop calls once per batch.

A SIGTERM or SIGINT ends training after the current step, with a checkpoint; a NaN or inf loss
skips its step, and too many in a row stop the run. Every rank agrees on both, so no rank waits for
another in a collective it will never join. The step reads one device value on the host (those two
flags); the loss sums stay on the device until they are printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.runtime import print_rank_0
from tqdm import tqdm

from step2_reward_model import checkpoints
from step2_reward_model.evaluate import Evaluation, log_metrics
from step2_reward_model.objectives.base import Objective

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records the first SIGTERM / SIGINT instead of dying, so the loop can save and exit. Under
    the deepspeed launcher one Ctrl-C arrives twice (the terminal's SIGINT, then the launcher's
    SIGTERM), so further signals are ignored, except a second SIGINT after a first: the user
    pressing Ctrl-C again, which stops at once, without saving."""

    def __init__(self, rank: int):
        self.rank = rank
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.rank == 0:
                print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                      "(Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT == self.signum:
            raise KeyboardInterrupt


def step_flags(loss: torch.Tensor, stop: bool, world_size: int) -> tuple[bool, bool]:
    """(the loss is NaN or inf on some rank, some rank was asked to stop). This is the training
    step's one read of a device value on the host."""
    nonfinite = ~torch.isfinite(loss.detach())
    if world_size == 1:
        return bool(nonfinite), stop
    flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=loss.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite_any, stop_any = flags.tolist()
    return nonfinite_any > 0, stop_any > 0


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on the device
    nonfinite: bool  # the loss was NaN or inf on some rank: the step was skipped
    stopping: bool  # some rank was asked to stop


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its rank among `world_size`, and its device."""

    rank: int
    world_size: int
    device: torch.device


def train_step(engine, objective: Objective, batch: Batch, placement: Placement, stop_requested: bool,
               mark: Callable[[], None] = lambda: None) -> StepResult:
    """Forward, then backward and optimizer step unless the loss is NaN or inf on some rank.
    `mark` is called after each phase (copy, forward, backward, step), for benchmarks to time them."""
    batch = batch.to(placement.device)
    mark()
    loss = objective.loss(engine.module, engine(batch.inputs, batch.layout), batch).loss
    nonfinite, stopping = step_flags(loss, stop_requested, placement.world_size)
    mark()
    if not nonfinite:
        engine.backward(loss)
        mark()
        engine.step()
        mark()
    return StepResult(loss.detach().float(), nonfinite, stopping)


def open_writer(args: argparse.Namespace, rank: int):
    """TensorBoard's writer on rank 0 with --enable_tensorboard, else None."""
    if not (args.enable_tensorboard and rank == 0):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(args.tensorboard_path, "step2_tensorboard"))


@dataclass
class Start:
    """Where a run starts: the settings a resumed run must share, its progress, whether it resumed."""

    settings: dict
    progress: checkpoints.Progress
    resumed: bool


class Run:
    """A training run's state between steps: where it stands (`progress`), the loss sums kept on the
    device, and the work due after a step (log, evaluate, save, stop) or an epoch."""

    def __init__(self, args: argparse.Namespace, engine, objective: Objective, evaluate: Callable[[], Evaluation],
                 start: Start, placement: Placement, steps_per_print: int):
        self.args, self.engine, self.objective, self.evaluate = args, engine, objective, evaluate
        self.settings, self.progress = start.settings, start.progress
        self.rank, self.device, self.steps_per_print = placement.rank, placement.device, steps_per_print
        self.writer = open_writer(args, self.rank)
        self.epoch_loss, self.window_loss = self.loss_sums()
        self.bad_in_a_row = 0
        self.last_saved = start.progress.update if start.resumed else None
        self.evaluation: Evaluation | None = None
        self.saves_at_end = bool(args.save_interval or start.resumed)

    def report(self, label: str, evaluation: Evaluation) -> None:
        log_metrics(self.objective, label, evaluation.metrics, self.writer, self.progress.update)

    def save_checkpoint(self) -> str:
        """Save a training checkpoint of this step (every rank calls this); returns its folder."""
        self.progress.epoch_loss, self.progress.window_loss = self.epoch_loss.item(), self.window_loss.item()
        path = checkpoints.save(self.engine, self.args.output_dir, self.progress, self.settings, self.rank,
                                self.args.keep_last)
        self.last_saved = self.progress.update
        return path

    def epoch(self, epoch: int, loader) -> tqdm:
        """The epoch's batches, from where the run stands, behind a progress bar."""
        self.engine.train()  # from_pretrained returns the model in eval mode: dropout off
        self.epoch_loss, self.window_loss = self.loss_sums()
        self.started, self.steps_run = time.time(), 0
        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.args.num_train_epochs}", disable=self.rank != 0,
                        initial=self.progress.batch, mininterval=1.0, dynamic_ncols=True)
        return self.bar

    def loss_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's and the print window's loss sums so far, on the device."""
        return (torch.tensor(self.progress.epoch_loss, device=self.device),
                torch.tensor(self.progress.window_loss, device=self.device))

    def record(self, step: StepResult) -> None:
        """Count the step; stop the run after too many NaN / inf losses in a row."""
        progress = self.progress
        progress.batch += 1
        if step.nonfinite:
            progress.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.args.max_nonfinite_steps:
                self.abort_nonfinite()
        else:
            self.bad_in_a_row = 0
            self.epoch_loss += step.loss
            self.window_loss += step.loss
            progress.micro_steps += 1
            progress.epoch_steps += 1
            self.steps_run += 1
        progress.update = progress.micro_steps // self.args.gradient_accumulation_steps

    def after_step(self, step: StepResult, stop: StopRequest) -> None:
        """Print the loss every `steps_per_print` steps; at an optimizer step's boundary, stop on a
        signal, save every --save_interval and evaluate every --eval_interval updates."""
        args, progress = self.args, self.progress
        stepped = not step.nonfinite
        if stepped and progress.micro_steps % self.steps_per_print == 0:
            self.log_loss()
        if progress.micro_steps % args.gradient_accumulation_steps:
            return
        if step.stopping:
            self.stop_and_exit(stop)
        if stepped and args.save_interval and progress.update % args.save_interval == 0:
            print_rank_0(f"saved {self.save_checkpoint()}")
        if stepped and args.eval_interval and progress.update % args.eval_interval == 0:
            self.report(f"Iter {progress.update}", self.evaluate())

    def log_loss(self) -> None:
        mean = self.window_loss.item() / self.steps_per_print
        self.window_loss.zero_()
        lr = self.engine.lr_scheduler.get_last_lr()[0]
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        if self.args.print_loss:
            print_rank_0(f"epoch {self.progress.epoch + 1} step {self.progress.batch}: loss {mean:.4f}")
        if self.writer:
            self.writer.add_scalar("train/loss", mean, self.progress.update)
            self.writer.add_scalar("train/lr", lr, self.progress.update)

    def end_epoch(self, epoch: int) -> None:
        """Print the epoch's loss and speed, then evaluate."""
        self.bar.close()
        seconds = time.time() - self.started
        progress, epochs = self.progress, self.args.num_train_epochs
        print_rank_0(f"Epoch {epoch + 1}/{epochs} with loss "
                     f"{self.epoch_loss.item() / max(progress.epoch_steps, 1):.4f} "
                     f"({self.steps_run} steps in {seconds:.1f} s, {self.steps_run / seconds:.2f} steps/s)")
        self.progress = checkpoints.Progress(epoch=epoch + 1, update=progress.update,
                                             micro_steps=progress.micro_steps, skipped=progress.skipped)
        self.epoch_loss, self.window_loss = self.loss_sums()
        self.evaluation = self.evaluate()
        self.report(f"Epoch {epoch + 1}/{epochs}", self.evaluation)

    def save_last_checkpoint(self) -> None:
        """With --save_interval (or a resumed run), a checkpoint of the end, where --resume then finds it done."""
        if self.saves_at_end and self.progress.update != self.last_saved:
            print_rank_0(f"saved {self.save_checkpoint()}")

    def finish(self) -> Evaluation:
        """Evaluate if no epoch was left to train, and return the final held-out evaluation."""
        if self.progress.skipped:
            print_rank_0(f"skipped {self.progress.skipped} step(s) with a NaN or inf loss")
        if self.evaluation is None:  # resumed after the last epoch had ended
            self.evaluation = self.evaluate()
        print_rank_0(self.objective.headline(self.evaluation.metrics))
        if self.writer:
            self.writer.close()
        return self.evaluation

    def stop_and_exit(self, stop: StopRequest) -> NoReturn:
        """After a SIGTERM / SIGINT (on any rank): save, say how to go on, exit with 128 + the signal."""
        self.bar.close()
        progress, name = self.progress, stop.name or "a signal to another rank"
        where = f"step {progress.update} (epoch {progress.epoch + 1}, batch {progress.batch})"
        if self.args.output_dir:
            print_rank_0(f"stopped by {name} after {where}: saved {self.save_checkpoint()}; run the same command "
                         "with --resume to continue")
        else:
            print_rank_0(f"stopped by {name} after {where}; nothing saved (no --output_dir)")
        if self.writer:
            self.writer.close()
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))

    def abort_nonfinite(self) -> NoReturn:
        """Too many NaN / inf losses in a row: keep the last good weights and stop with one clear line."""
        args, progress = self.args, self.progress
        saved = ""
        if args.output_dir and progress.micro_steps % args.gradient_accumulation_steps == 0:
            saved = f"; the weights from before them are saved in {self.save_checkpoint()}"
        raise UserError(f"the loss was NaN or inf in {self.bad_in_a_row} steps in a row, up to epoch "
                        f"{progress.epoch + 1} batch {progress.batch}: training stopped{saved}. Lower "
                        "--learning_rate or check the data (--max_nonfinite_steps sets how many are skipped first)")
