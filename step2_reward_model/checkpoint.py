"""Saving the step-3 checkpoint: `pytorch_model.bin` (whole RewardModel), config, tokenizer.

The state is gathered on rank 0 one parameter at a time (ZeRO-3 shards included), written into a
staging folder, then moved into place file by file with atomic renames, so a crash while writing
never leaves a half-written `pytorch_model.bin` where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from step2_reward_model.lora import plain_state_dict
from step2_reward_model.model import WEIGHTS_NAME

META_NAME = "reward_model.json"


def gather_state_dict(model: nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """The full state dict on CPU at rank 0 (empty elsewhere)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    state: dict[str, torch.Tensor] = {}
    for name in model.state_dict().keys():
        if name in params:
            with deepspeed.zero.GatheredParameters([params[name]], enabled=zero_stage == 3):
                if rank == 0:
                    state[name] = params[name].detach().cpu().clone()
        elif rank == 0:
            state[name] = buffers[name].detach().cpu().clone()
    return state


def save_reward_model(model: nn.Module, tokenizer, output_dir: str, zero_stage: int, rank: int,
                      meta: dict) -> None:
    state = gather_state_dict(model, zero_stage, rank)
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        staging = os.path.join(output_dir, f".saving-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        torch.save(plain_state_dict(state), os.path.join(staging, WEIGHTS_NAME))
        model.rwtransformer.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, META_NAME), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        for name in sorted(os.listdir(staging), key=lambda n: n == WEIGHTS_NAME):  # weights last
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
    if dist.is_initialized():
        dist.barrier()
