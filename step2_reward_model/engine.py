"""The DeepSpeed engine: the precision and attention this machine runs, DeepSpeed's config, the
optimizer (parameter groups, kernel) and the learning-rate schedule."""

from __future__ import annotations

import argparse
import importlib.util
import math

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from rlhf_reward.utils.ds_utils import get_train_ds_config, merge_user_config
from rlhf_reward.utils.runtime import print_rank_0
from transformers import get_scheduler

from step2_reward_model.model import flex_attention_problem

LORA_NAMES = ("lora_A", "lora_B")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX); without them bf16
    matmuls run several times slower than fp32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_dtype(args: argparse.Namespace) -> None:
    """fp16 needs a GPU: on DeepSpeed's CPU accelerator, train in fp32 and say so. bf16 stays as
    asked, with a note where it is the slow path."""
    if get_accelerator().device_name() != "cpu":
        return
    if args.dtype == "fp16":
        print_rank_0("warning: --dtype fp16 needs a GPU; training in fp32 on the CPU")
        args.dtype = "fp32"
        if cpu_has_bf16():
            print_rank_0("note: this CPU has bf16 instructions, so --dtype bf16 may train faster than fp32 "
                         "(benchmarks/throughput.py --dtype bf16 measures it)")
    elif args.dtype == "bf16" and not cpu_has_bf16():
        print_rank_0("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 runs several "
                     "times slower than fp32 here; --dtype fp32 is the fast path")


def resolve_attention(args: argparse.Namespace, config=None) -> str | None:
    """`--attn_implementation auto` -> the fastest attention for this run's batches, None being the
    model's default (SDPA for the supported families). Flash-attention 2 takes no custom mask, so it
    is chosen only when prefix sharing is off (installed, on a GPU, in fp16/bf16); with
    --max_tokens_per_batch on a GPU, FlexAttention otherwise, whose block mask skips what a
    document cannot see. Given the model's `config`, FlexAttention where it cannot run falls back
    to the default, with a note."""
    on_gpu = get_accelerator().device_name() == "cuda"
    choice = args.attn_implementation
    if choice == "auto":
        flash = (importlib.util.find_spec("flash_attn") is not None and on_gpu and args.dtype in ("fp16", "bf16")
                 and not args.prefix_sharing)
        flex = on_gpu and getattr(args, "max_tokens_per_batch", None) is not None
        choice = "flash_attention_2" if flash else "flex_attention" if flex else None
    if choice == "flex_attention" and config is not None:
        problem = flex_attention_problem(config, on_gpu)
        if problem:
            print_rank_0(f"note: FlexAttention is off ({problem}); using the model's default attention")
            choice = None
    return choice


def build_ds_config(args: argparse.Namespace, world_size: int) -> dict:
    """DeepSpeed-Chat's config for these flags, with the user's `--deepspeed_config` laid over it."""
    config = get_train_ds_config(offload=args.offload, dtype=args.dtype, stage=args.zero_stage,
                                 enable_tensorboard=args.enable_tensorboard,
                                 tb_path=args.tensorboard_path, tb_name="step2_model")
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    return merge_user_config(config, getattr(args, "deepspeed_config", None))


def parameter_groups(model: torch.nn.Module, weight_decay: float, lora_learning_rate: float) -> list[dict]:
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


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with DeepSpeed-Chat's betas, through the fastest kernel for where it runs."""
    groups = parameter_groups(model, args.weight_decay, args.lora_learning_rate)
    fused = {}
    if args.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam as optimizer_class
    elif args.no_fused_kernels:
        optimizer_class = torch.optim.AdamW
    elif get_accelerator().device_name() == "cpu":
        # PyTorch's fused CPU kernel: a step over MiniLM's 22.6 M parameters in 13 ms instead of 70
        optimizer_class, fused = torch.optim.AdamW, {"fused": True}
    else:
        from deepspeed.ops.adam import FusedAdam as optimizer_class
    print_rank_0(f"optimizer: {optimizer_class.__name__}{' (fused)' if fused else ''}")
    return optimizer_class(groups, lr=args.learning_rate, betas=(0.9, 0.95), **fused)


def build_engine(args: argparse.Namespace, model: torch.nn.Module, ds_config: dict, batches_per_epoch: list[int]):
    """The DeepSpeed engine that trains `model`, with its optimizer and learning-rate schedule
    (`batches_per_epoch`: each epoch's steps, which differ with --max_tokens_per_batch)."""
    optimizer = make_optimizer(args, model)
    updates = sum(math.ceil(batches / args.gradient_accumulation_steps) for batches in batches_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=updates)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      lr_scheduler=scheduler, dist_init_required=True)
    if args.gradient_checkpointing:
        engine.module.gradient_checkpointing_enable()
    return engine
