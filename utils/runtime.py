"""This process's place in a run: its rank, the barrier between ranks, seeds, and device copies."""

from __future__ import annotations

import os
import random
import socket

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


def init_single_process_env() -> None:
    """Let `python main.py` (no launcher) start a one-rank process group."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
