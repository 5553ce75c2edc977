"""Small helpers shared by the RLHF steps: ranks, seeds, model paths (GGUF files), tokenizer loading,
optimizer groups."""

from __future__ import annotations

import functools
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserError, first_line

END_OF_CONVERSATION_TOKEN = "<|endoftext|>"
LORA_NAMES = ("lora_A", "lora_B")
GGUF_SUFFIX = ".gguf"


def global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def print_rank_0(message: str, rank: int | None = None) -> None:
    if (global_rank() if rank is None else rank) <= 0:
        print(message, flush=True)


def set_random_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`, without waiting for copies from pinned memory."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def pretrained_source(path: str, flag: str = "--model_name_or_path") -> tuple[str, dict]:
    """`from_pretrained`'s path and extra arguments for a model path. A GGUF file (llama.cpp's single
    file of config, tokenizer and weights) is read from its folder with `gguf_file=` its name, after a
    check that turns a missing or damaged file into one line naming it; any other path (a folder, a
    hub name) is passed on as it is."""
    if not path.lower().endswith(GGUF_SUFFIX):
        return path, {}
    check_gguf(path, flag)
    folder, name = os.path.split(os.path.abspath(path))
    return folder, {"gguf_file": name}


@functools.lru_cache
def check_gguf(path: str, flag: str) -> None:
    """Parse the file's header and tensor table once per process (a big vocabulary takes seconds),
    instead of letting each of the tokenizer, config and weight loaders fail on it differently."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise UserError(f"{flag} '{path}': no such GGUF file")
    try:
        GGUFReader(path)
    except (OSError, ValueError, IndexError) as err:  # what a truncated or corrupt file raises
        raise UserError(f"{flag} '{path}': not a readable GGUF file (truncated or corrupt?): "
                        f"{first_line(err)}") from None


def load_hf_tokenizer(model_name_or_path: str, add_eot_token: bool = False,
                      trust_remote_code: bool = False):
    """The tokenizer with DeepSpeed-Chat's conventions, so step 3 sees the same vocabulary size:
    right padding; pad = eos, except Llama paths, which get a `[PAD]` token when they have none, and
    tokenizers without an eos (BERT), which keep their own pad;
    `<|endoftext|>` added as a special token with `--add_eot_token`."""
    from transformers import AutoTokenizer

    source, gguf = pretrained_source(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=trust_remote_code,
                                                  **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"--model_name_or_path '{model_name_or_path}': cannot load a tokenizer "
                        f"(not a local model folder, or the hub is unreachable): "
                        f"{first_line(err)}") from None
    if "llama" in model_name_or_path.lower():
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if add_eot_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CONVERSATION_TOKEN]})
    return tokenizer


def get_optimizer_grouped_parameters(model: torch.nn.Module, weight_decay: float,
                                     lora_learning_rate: float) -> list[dict]:
    """Weight decay on matrices (embeddings, linear layers, the value head), not on vectors (biases
    and norm scales, whatever a model family names them); LoRA factors at their own rate."""
    groups = {"decay": [], "lora": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            groups["no_decay"].append(param)
        elif any(part in name for part in LORA_NAMES):
            groups["lora"].append(param)
        else:
            groups["decay"].append(param)
    result = [{"params": groups["decay"], "weight_decay": weight_decay},
              {"params": groups["lora"], "weight_decay": weight_decay, "lr": lora_learning_rate},
              {"params": groups["no_decay"], "weight_decay": 0.0}]
    return [group for group in result if group["params"]]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process_env() -> None:
    """Let `python main.py` (no launcher) start a one-rank process group."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
