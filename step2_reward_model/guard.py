"""Stopping a run without losing it: a SIGTERM or SIGINT ends training after the current step, and
a NaN or inf loss skips its step; every rank agrees on both, so no rank waits for another in a
collective it will never join."""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

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
