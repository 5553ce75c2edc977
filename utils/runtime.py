"""This process's place in a run: its rank, the barrier between ranks, seeds, and device copies."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist


def global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def print_rank_0(message: str, rank: int | None = None) -> None:
    if (global_rank() if rank is None else rank) <= 0:
        print(message, flush=True)


def barrier() -> None:
    """Wait for every rank, when there are several."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_uneven(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `local` rows (their counts may differ from rank to rank), in rank order, on every
    rank; detached. One process: `local` alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local.detach()]
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    padded = local.detach().new_zeros((max(int(c) for c in counts), *local.shape[1:]))
    padded[:len(local)] = local.detach()
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [rows[:int(c)] for rows, c in zip(gathered, counts, strict=True)]


def set_random_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`, without waiting for copies from pinned memory."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SINGLE_PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_single_process_env() -> None:
    """Let `python main.py` (no launcher) start a one-rank process group."""
    if "RANK" not in os.environ:
        os.environ.update(dict(zip(SINGLE_PROCESS_ENV, ("0", "0", "1", "1", "127.0.0.1", str(free_port())),
                                   strict=True)))


@contextlib.contextmanager
def process_group_scope() -> Iterator[None]:
    """The span in which `join_process_group` may be called. On leaving it, a one-rank group is
    destroyed and the variables that made it are removed, so that `main()` called in a process that
    goes on (a notebook, a test) leaves no rendezvous port behind for the next run or a child process
    to inherit. Launched ranks keep their groups to the end: one that left first would take the
    store the others use."""
    added = [key for key in SINGLE_PROCESS_ENV if key not in os.environ]
    try:
        yield
    finally:
        if dist.is_initialized() and dist.get_world_size() == 1:
            # Also keeps Gloo's threads from aborting the interpreter's exit ("terminate called
            # without an active exception", seen once in 40 runs).
            dist.destroy_process_group()
        for key in added:
            os.environ.pop(key, None)


def join_process_group(verbose: bool = True) -> None:
    """Join DeepSpeed's process group (a one-rank group of its own without a launcher), then release the
    shared-memory name DeepSpeed made for this rank: every entry point that trains joins through here."""
    import deepspeed

    init_single_process_env()
    deepspeed.init_distributed(verbose=verbose)
    release_allreduce_buffer()


def release_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer, right after joining.

    On the CPU, DeepSpeed gives each rank a buffer in /dev/shm (66 MiB) that every rank maps while
    joining the group, and never removes it: each run left its buffers in the machine's memory until
    a reboot. Once every rank is past the barrier every mapping is made, so the names can go; the
    memory is freed when the last rank exits, however it exits (a kill included)."""
    if not dist.is_initialized():
        return
    barrier()  # on every rank alike (the file's existence may differ: a stale one from an old run)
    if not os.path.isdir("/dev/shm"):
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
