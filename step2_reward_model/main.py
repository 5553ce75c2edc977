#!/usr/bin/env python
"""Step 2 of RLHF: train a reward model with DeepSpeed.

The flags are DeepSpeed-Chat's step-2 flags (same names, defaults and meaning), so its launch
scripts run unchanged; added flags (`--loss`, `--dtype fp32`, `--dry_run`, ...) default to the
old behaviour. Run from the repository root:

    deepspeed step2_reward_model/main.py --model_name_or_path facebook/opt-350m --output_dir out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import NoReturn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import SchedulerType, get_scheduler  # noqa: E402

from step2_reward_model import resume  # noqa: E402
from step2_reward_model.checkpoint import export_skipped_error, save_reward_model  # noqa: E402
from step2_reward_model.evaluation import reward_statistics  # noqa: E402
from step2_reward_model.guard import StopRequest, step_flags  # noqa: E402
from step2_reward_model.held_out import best_worst_margins, evaluate, evaluate_steps, worst_rows  # noqa: E402
from step2_reward_model.lora import apply_lora, merge_lora  # noqa: E402
from step2_reward_model.losses import LOSSES  # noqa: E402
from step2_reward_model.memory import check_memory  # noqa: E402
from step2_reward_model.model import (  # noqa: E402
    BACKBONE,
    ENCODERS,
    TYPO_BACKBONE,
    create_reward_model,
    end_of_conversation_text,
    load_config,
    prefix_sharing_problem,
)
from utils.data.build import MARGIN_SOURCES, DataOptions, create_reward_datasets, create_step_datasets  # noqa: E402
from utils.data.chat import load_chat_template  # noqa: E402
from utils.data.collate import ACCELERATOR_CHUNK_TOKENS, CHUNK_TOKENS, EvalShard, PairCollator  # noqa: E402
from utils.data.examples import BAD_ROWS  # noqa: E402
from utils.data.sampler import LengthGroupedBatches  # noqa: E402
from utils.data.steps import NEUTRAL, StepCollator  # noqa: E402
from utils.data.tokenize import TokenizedExamples, has_ranked_lists  # noqa: E402
from utils.ds_utils import get_train_ds_config, merge_user_config  # noqa: E402
from utils.errors import UserError, exit_status  # noqa: E402
from utils.utils import (  # noqa: E402
    END_OF_CONVERSATION_TOKEN,
    get_optimizer_grouped_parameters,
    init_single_process_env,
    load_hf_tokenizer,
    print_rank_0,
    set_random_seed,
    to_device,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a reward model (RLHF step 2) with DeepSpeed.")
    p.add_argument("--data_path", nargs="*", default=["Dahoas/rm-static"],
                   help="One or more sources: a known hub id, any hub id org/name, local/jsonfile, "
                        "or a local .json/.jsonl/.parquet/.csv file or folder.")
    p.add_argument("--data_split", type=str, default="2,4,4",
                   help="Proportions of each split for phases 1, 2, 3; the reward model takes phase 2.")
    p.add_argument("--data_output_path", type=str, default="/tmp/data_files/",
                   help="Where split indices and tokenised data are cached.")
    p.add_argument("--model_name_or_path", type=str, required=True,
                   help="Path or hub id of the (SFT) causal LM to start from.")
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for compatibility; the scored token comes from the attention mask.")
    p.add_argument("--per_device_train_batch_size", type=int, default=16, help="Pairs per device per step.")
    p.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Pairs per device in evaluation.")
    p.add_argument("--max_seq_len", type=int, default=512, help="Longest sequence, prompt + response.")
    p.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate.")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases, norms).")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--output_dir", type=str, default=None, help="Where the trained model is saved.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--dropout", type=float, default=None, help="Override the model's dropout rates.")
    p.add_argument("--disable_dropout", action="store_true", help="Older DeepSpeed-Chat spelling of --dropout 0.0.")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload of optimizer state (and params at stage 3).")
    p.add_argument("--dtype", type=str, default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="Training precision; fp16 on a machine without a GPU falls back to fp32.")
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--lora_dim", type=int, default=0, help="If > 0, add LoRA adapters of this rank.")
    p.add_argument("--lora_module_name", type=str, default="decoder.layers.",
                   help="LoRA goes on linear layers whose name contains this.")
    p.add_argument("--only_optimize_lora", action="store_true", help="Train only the adapters and the value head.")
    p.add_argument("--lora_learning_rate", type=float, default=5e-4)
    p.add_argument("--compute_fp32_loss", action="store_true", help="Compute the loss in fp32.")
    p.add_argument("--no_bf16_to_fp32_loss", action="store_false", dest="bf16_to_fp32_loss",
                   help="With bf16, compute the loss in bf16 (default: fp32).")
    p.add_argument("--eval_interval", type=int, default=0, help="If > 0, evaluate every this many steps.")
    p.add_argument("--eval_iters", type=int, default=100, help="Most evaluation batches per evaluation.")
    p.add_argument("--enable_tensorboard", action="store_true")
    p.add_argument("--tensorboard_path", type=str, default="step2_tensorboard")
    p.add_argument("--add_eot_token", action="store_true",
                   help=f"Add {END_OF_CONVERSATION_TOKEN} to the tokenizer as a special token.")
    p.add_argument("--print_loss", action="store_true", help="Print the loss at every logging interval.")
    p.add_argument("--no_fused_kernels", action="store_true",
                   help="Use torch's AdamW, unfused, instead of FusedAdam (GPU) or fused AdamW (CPU).")
    p.add_argument("--loss", type=str, default="per_token", choices=LOSSES,
                   help="per_token: DeepSpeed-Chat's loss over the tokens where the two answers differ (pairs, "
                        "causal LMs); end_token: Bradley-Terry on the end scores, over every ordered pair of a "
                        "ranked list (InstructGPT); plackett_luce: the listwise likelihood of each ranking.")
    p.add_argument("--center_rewards_coefficient", type=float, default=0.0,
                   help="Add this times mean((r_chosen + r_rejected)^2) to the loss, to keep rewards centred on 0.")
    p.add_argument("--margin_source", choices=MARGIN_SOURCES, default="column",
                   help="Margin in -log sigmoid(r_c - r_r - margin): the data's `margin` column, "
                        "score_chosen - score_rejected, or none.")
    p.add_argument("--data_weights", type=float, nargs="*", default=None,
                   help="One sampling weight per --data_path: each source's share of the training examples.")
    p.add_argument("--max_responses_per_prompt", type=int, default=0,
                   help="If > 0, keep at most this many responses of a ranked list (best, worst, evenly between).")
    p.add_argument("--chat_template", type=str, default=None,
                   help="A Jinja chat template file for conversational data (default: the tokenizer's).")
    p.add_argument("--process_reward", action="store_true",
                   help="Train a process reward model on step-labelled solutions (prompt, steps, labels): "
                        "binary cross-entropy on the value at the end of each step.")
    p.add_argument("--step_separator", type=str, default="\n\n",
                   help="Appended to every step; the step is scored at its last token.")
    p.add_argument("--prm_neutral", choices=NEUTRAL, default="positive",
                   help="What a neutral (0) step label means: a good step, a bad one, or unlabelled.")
    p.add_argument("--train_on_last_step_only", action="store_true",
                   help="Use only the last labelled step of each solution.")
    p.add_argument("--step3_key_prefix", default=BACKBONE, choices=[BACKBONE, TYPO_BACKBONE],
                   help="Prefix of the backbone's keys in pytorch_model.bin; newer DeepSpeed-Chat step 3 "
                        "expects the misspelt rwtranrsformer (and skips unknown keys without a word).")
    p.add_argument("--no_hf_export", action="store_true",
                   help="Do not write OUTPUT/hf, the AutoModelForSequenceClassification export.")
    p.add_argument("--no_prefix_sharing", action="store_false", dest="prefix_sharing",
                   help="Give every response its own row with its own copy of the prompt, instead of one packed "
                        "row per prompt that computes the prompt once.")
    p.add_argument("--length_grouping_steps", type=int, default=None,
                   help="Shuffle, then sort by length within windows of this many steps, so a batch holds "
                        "similar lengths and little padding; 0: plain shuffled batches. Default 32, and 0 "
                        "with --process_reward (grouped step batches learned worse in our tests).")
    p.add_argument("--attn_implementation", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                   help="auto: the model's default (SDPA where it has it), or flash-attention 2 when it is "
                        "installed, on a GPU in fp16/bf16, with --no_prefix_sharing.")
    p.add_argument("--save_interval", type=int, default=0,
                   help="If > 0, save a training checkpoint (weights, optimizer, scheduler, random states, data "
                        "position) into OUTPUT/checkpoints every this many steps, and at the end.")
    p.add_argument("--keep_last", type=int, default=2,
                   help="Keep only the newest this many training checkpoints (0: keep all).")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="Continue a run exactly where it stopped: from the newest complete checkpoint in "
                        "OUTPUT/checkpoints (no value, or 'auto'; starts from the beginning if there is none) "
                        "or from the checkpoint folder given.")
    p.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="A NaN or inf loss skips its step; this many in a row stop training (with a checkpoint).")
    p.add_argument("--bad_rows", choices=BAD_ROWS, default="error",
                   help="A malformed data row (unreadable, not an object, a missing field or one of the wrong "
                        "type): error names its file, line and field; skip drops it and counts it in the summary.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the checkpoint.")
    p.add_argument("--dry_run", action="store_true",
                   help="Print the resolved configuration and exit, loading no model or data.")
    p.add_argument("--no_memory_check", action="store_false", dest="memory_check",
                   help="Train even when the estimated peak memory of the largest batch exceeds the memory free.")
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.disable_dropout:
        args.dropout = 0.0
    if args.length_grouping_steps is None:
        args.length_grouping_steps = 0 if args.process_reward else 32
    for flag, least in (("save_interval", 0), ("keep_last", 0), ("max_nonfinite_steps", 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} must be at least {least}")
    return args


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


def resolve_attention(args: argparse.Namespace) -> None:
    """`--attn_implementation auto` -> flash-attention 2 where it applies, else None (the model's
    default, SDPA for the supported families). Flash-attention takes no custom mask, so it is
    chosen only when prefix sharing is off."""
    if args.attn_implementation != "auto":
        return
    import importlib.util

    flash = (importlib.util.find_spec("flash_attn") is not None and get_accelerator().device_name() == "cuda"
             and args.dtype in ("fp16", "bf16") and not args.prefix_sharing)
    args.attn_implementation = "flash_attention_2" if flash else None


def build_ds_config(args: argparse.Namespace, world_size: int) -> dict:
    config = get_train_ds_config(offload=args.offload, dtype=args.dtype, stage=args.zero_stage,
                                 enable_tensorboard=args.enable_tensorboard,
                                 tb_path=args.tensorboard_path, tb_name="step2_model")
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    return merge_user_config(config, getattr(args, "deepspeed_config", None))


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = get_optimizer_grouped_parameters(model, args.weight_decay, args.lora_learning_rate)
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


def check_objective(args: argparse.Namespace, data: TokenizedExamples) -> None:
    """The per-token loss compares exactly two answers token by token; say so before training."""
    ranked = has_ranked_lists(data)
    margins = any(margin != 0 for margin in data.margins)
    if args.loss == "per_token" and (ranked or margins or args.center_rewards_coefficient):
        what = "ranked lists (more than two answers, or ties)" if ranked else \
            "margins" if margins else "--center_rewards_coefficient"
        raise UserError(f"--loss per_token compares two answers token by token and cannot use {what}: "
                        "pass --loss end_token (the pairwise / InstructGPT loss) or --loss plackett_luce")
    if args.loss == "plackett_luce" and margins:
        raise UserError("--loss plackett_luce has no margin: pass --margin_source none or --loss end_token")


def check_backbone(args: argparse.Namespace, config) -> None:
    """An encoder's every token sees the whole text, so its one score per sequence is all it has:
    refuse objectives that read values token by token, before any data is read."""
    if config.model_type not in ENCODERS:
        return
    encoder = f"model type {config.model_type} is an encoder, whose every token sees the whole text"
    if args.process_reward:
        raise UserError(f"--process_reward scores each step where it ends, but {encoder} (later steps included): "
                        "start from a causal LM")
    if args.loss == "per_token":
        raise UserError(f"--loss per_token compares the two answers token by token, but {encoder}: "
                        "pass --loss end_token (or --loss plackett_luce) to compare the pooled scores")


def report(label: str, metrics: dict[str, float], writer, step: int) -> None:
    if "first_error_accuracy" in metrics:
        print_rank_0(f"{label}: step accuracy {metrics['accuracy']:.4f}, first-error accuracy "
                     f"{metrics['first_error_accuracy']:.4f}, solution accuracy {metrics['solution_accuracy']:.4f} "
                     f"({metrics['pairs']:.0f} held-out solutions, {metrics['steps']:.0f} labelled steps)")
    else:
        report_pairs(label, metrics)
    if writer:
        for name, value in metrics.items():
            if name != "rows":
                writer.add_scalar(f"eval/{name}", value, step)
        writer.flush()


def report_pairs(label: str, metrics: dict[str, float]) -> None:
    print_rank_0(f"{label}: chosen_last_scores (higher is better) : {metrics['chosen']:.4f}, "
                 f"rejected_last_scores (lower is better) : {metrics['rejected']:.4f}, "
                 f"diff : {metrics['difference']:.4f}, acc (higher is better) : {metrics['accuracy']:.4f} "
                 f"({metrics['pairs']:.0f} held-out pairs)")
    extras = [f"{name} {value:.4f}" for name, value in metrics.items() if name.startswith(("top1", "accuracy/"))]
    if extras:
        print_rank_0("  " + ", ".join(extras))


def choose_prefix_sharing(config) -> bool:
    problem = prefix_sharing_problem(config)
    if problem:
        print_rank_0(f"note: prefix sharing is off ({problem}): every response gets its own row with the prompt")
    return problem is None


def make_loaders(args: argparse.Namespace, train_set, eval_set, collator, share_prompt: bool, rank: int,
                 world_size: int, device: torch.device) -> tuple[LengthGroupedBatches, DataLoader, DataLoader]:
    """Length-grouped shuffled training batches; evaluation batches sorted by length, longest
    first, each rank taking every world_size-th."""
    sampler = LengthGroupedBatches(train_set.lengths(share_prompt), args.per_device_train_batch_size, rank,
                                   world_size, seed=args.seed, window=args.length_grouping_steps,
                                   shapes=train_set.row_shapes(share_prompt))
    layout = "one row per solution" if args.process_reward else \
        "one packed row per prompt, computing it once" if share_prompt else "one row per response"
    grouping = f"grouped by length within windows of {args.length_grouping_steps} steps" \
        if args.length_grouping_steps > 0 else "in plain shuffled order"
    chunks = ", run in chunks of similar length" if getattr(collator, "chunk_tokens", None) is not None \
        and not share_prompt else ""
    print_rank_0(f"batches: {layout}, padded to their longest, {grouping}{chunks}")
    options = {"collate_fn": collator, "pin_memory": device.type == "cuda"}
    eval_order = np.argsort(-eval_set.lengths(share_prompt), kind="stable")
    eval_loader = DataLoader(EvalShard(Subset(eval_set, eval_order), rank, world_size),
                             batch_size=args.per_device_eval_batch_size, **options)
    # Its own generator: a loader draws a seed from the global one at every epoch's start, which
    # would shift the dropout of a run resumed part way through an epoch.
    train_loader = DataLoader(train_set, batch_sampler=sampler, generator=torch.Generator(), **options)
    return sampler, train_loader, eval_loader


def keep_sums(progress: resume.Progress, epoch_loss: torch.Tensor, window_loss: torch.Tensor) -> None:
    """Copy the running loss sums (kept on the device) into `progress` before it is saved."""
    progress.epoch_loss, progress.window_loss = epoch_loss.item(), window_loss.item()


def stop_and_exit(args: argparse.Namespace, progress: resume.Progress, stop: StopRequest,
                  save_checkpoint: Callable[[], str], writer) -> NoReturn:
    """After a SIGTERM / SIGINT (on any rank): save, say how to go on, exit with 128 + the signal."""
    name = stop.name or "a signal to another rank"
    where = f"step {progress.update} (epoch {progress.epoch + 1}, batch {progress.batch})"
    if args.output_dir:
        print_rank_0(f"stopped by {name} after {where}: saved {save_checkpoint()}; run the same command with "
                     "--resume to continue")
    else:
        print_rank_0(f"stopped by {name} after {where}; nothing saved (no --output_dir)")
    if writer:
        writer.close()
    raise SystemExit(128 + (stop.signum or signal.SIGTERM))


def abort_nonfinite(args: argparse.Namespace, progress: resume.Progress, count: int,
                    save_checkpoint: Callable[[], str]) -> NoReturn:
    """Too many NaN / inf losses in a row: keep the last good weights and stop with one clear line."""
    saved = ""
    if args.output_dir and progress.micro_steps % args.gradient_accumulation_steps == 0:
        saved = f"; the weights from before them are saved in {save_checkpoint()}"
    raise UserError(f"the loss was NaN or inf in {count} steps in a row, up to epoch {progress.epoch + 1} batch "
                    f"{progress.batch}: training stopped{saved}. Lower --learning_rate or check the data "
                    "(--max_nonfinite_steps sets how many are skipped first)")


def train(args: argparse.Namespace) -> None:
    init_single_process_env()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(), local_rank) if accelerator.device_name() != "cpu" \
        else torch.device("cpu")
    ds_config = build_ds_config(args, world_size)
    args.deepspeed_config = None  # merged into ds_config, which deepspeed.initialize gets below
    if args.save_interval and not args.output_dir:
        raise UserError("--save_interval needs --output_dir (checkpoints go into OUTPUT/checkpoints)")
    resume_from = resume.resume_path(args.resume, args.output_dir)
    if args.resume and not resume_from:
        print_rank_0(f"note: --resume: no checkpoint in {resume.checkpoint_folder(args.output_dir)} yet; "
                     "starting from the beginning")
    set_random_seed(args.seed)
    config = load_config(args.model_name_or_path, args.trust_remote_code, "--model_name_or_path")
    check_backbone(args, config)
    end_text = end_of_conversation_text(config)

    tokenizer = load_hf_tokenizer(args.model_name_or_path, args.add_eot_token, args.trust_remote_code)
    if args.chat_template:
        tokenizer.chat_template = load_chat_template(args.chat_template)  # saved with the tokenizer
    if args.process_reward:
        train_set, eval_set = create_step_datasets(
            args.data_path, args.data_split, args.data_output_path, args.seed, tokenizer, args.max_seq_len,
            args.step_separator, args.prm_neutral, args.train_on_last_step_only, REPO_ROOT, local_rank=local_rank,
            log=print_rank_0, bad_rows=args.bad_rows)
    else:
        options = DataOptions(data_weights=tuple(args.data_weights) if args.data_weights else None,
                              margin_source=args.margin_source, max_responses=args.max_responses_per_prompt,
                              chat_template=tokenizer.chat_template if args.chat_template else None,
                              bad_rows=args.bad_rows)
        train_set, eval_set = create_reward_datasets(
            args.data_path, args.data_split, args.data_output_path, args.seed, tokenizer, args.max_seq_len,
            end_text, REPO_ROOT, local_rank=local_rank, log=print_rank_0, options=options)
        check_objective(args, train_set.data)

    compute_fp32_loss = args.compute_fp32_loss or (args.dtype == "bf16" and args.bf16_to_fp32_loss)
    model = create_reward_model(args.model_name_or_path, tokenizer, ds_config, dropout=args.dropout,
                                loss=args.loss, compute_fp32_loss=compute_fp32_loss,
                                trust_remote_code=args.trust_remote_code,
                                center_coefficient=args.center_rewards_coefficient,
                                attn_implementation=args.attn_implementation)
    if args.lora_dim > 0:
        apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    if args.process_reward:
        collator, share_prompt = StepCollator(tokenizer.pad_token_id), False
    else:
        share_prompt = args.prefix_sharing and choose_prefix_sharing(model.config)
        # ZeRO-3 gathers every layer's weights once per forward, so it runs each batch as one.
        chunk_tokens = CHUNK_TOKENS.get(device.type, ACCELERATOR_CHUNK_TOKENS) if args.zero_stage < 3 else None
        collator = PairCollator(tokenizer.pad_token_id, share_prompt=share_prompt, chunk_tokens=chunk_tokens)
    sampler, train_loader, eval_loader = make_loaders(args, train_set, eval_set, collator, share_prompt, rank,
                                                      world_size, device)
    check_memory(args, model, sampler, device, world_size)

    optimizer = make_optimizer(args, model)
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=args.num_train_epochs * updates_per_epoch)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, args=args, config=ds_config,
                                      lr_scheduler=scheduler, dist_init_required=True)
    if args.gradient_checkpointing:
        engine.module.gradient_checkpointing_enable()

    writer = None
    if args.enable_tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.tensorboard_path, "step2_tensorboard"))

    run_eval = partial(evaluate_steps, engine, eval_loader, args.eval_iters, device) if args.process_reward \
        else partial(evaluate, engine, eval_loader, args.eval_iters, device, eval_set.data.source_names)

    settings = resume.run_settings(args, world_size, len(train_set))
    progress = resume.Progress()
    if resume_from:
        progress = resume.load(engine, resume_from, rank, settings)
        print_rank_0(f"resumed from {resume_from}: step {progress.update}, epoch {progress.epoch + 1}, "
                     f"batch {progress.batch} of {len(train_loader)}")

    def save_checkpoint() -> str:
        return resume.save(engine, args.output_dir, progress, settings, rank, args.keep_last)

    print_rank_0(f"***** Running training: {len(train_set)} train pairs, {len(eval_set)} eval pairs, "
                 f"{world_size} rank(s), dtype {args.dtype}, ZeRO stage {args.zero_stage} *****")
    metrics = None
    if not resume_from:
        report("Epoch 0 (before training)", run_eval(), writer, 0)
    steps_per_print = ds_config.get("steps_per_print", 10)
    bad_in_a_row, last_saved = 0, progress.update if resume_from else None
    with StopRequest(rank) as stop:
        for epoch in range(progress.epoch, args.num_train_epochs):
            sampler.set_epoch(epoch, start=progress.batch)
            engine.train()  # from_pretrained returns the model in eval mode: dropout off
            epoch_loss = torch.tensor(progress.epoch_loss, device=device)
            window_loss = torch.tensor(progress.window_loss, device=device)
            started, steps_run = time.time(), 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.num_train_epochs}", disable=rank != 0,
                       initial=progress.batch, mininterval=1.0, dynamic_ncols=True)
            for batch in bar:
                batch.pop("source", None)  # per-example metadata, for evaluation only
                progress.batch += 1
                loss = engine(**to_device(batch, device))["loss"]
                nonfinite, stopping = step_flags(loss, stop.signum is not None, world_size)
                stepped = not nonfinite
                if nonfinite:
                    progress.skipped += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= args.max_nonfinite_steps:
                        keep_sums(progress, epoch_loss, window_loss)
                        abort_nonfinite(args, progress, bad_in_a_row, save_checkpoint)
                else:
                    bad_in_a_row = 0
                    engine.backward(loss)
                    engine.step()
                    epoch_loss += loss.detach().float()
                    window_loss += loss.detach().float()
                    progress.micro_steps += 1
                    progress.epoch_steps += 1
                    steps_run += 1
                at_boundary = progress.micro_steps % args.gradient_accumulation_steps == 0
                progress.update = progress.micro_steps // args.gradient_accumulation_steps
                if stepped and progress.micro_steps % steps_per_print == 0:
                    mean = window_loss.item() / steps_per_print
                    window_loss.zero_()
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    if args.print_loss:
                        print_rank_0(f"epoch {epoch + 1} step {progress.batch}: loss {mean:.4f}")
                    if writer:
                        writer.add_scalar("train/loss", mean, progress.update)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], progress.update)
                if not at_boundary:
                    continue
                if stopping:
                    bar.close()
                    keep_sums(progress, epoch_loss, window_loss)
                    stop_and_exit(args, progress, stop, save_checkpoint, writer)
                if stepped and args.save_interval and progress.update % args.save_interval == 0:
                    keep_sums(progress, epoch_loss, window_loss)
                    print_rank_0(f"saved {save_checkpoint()}")
                    last_saved = progress.update
                if stepped and args.eval_interval and progress.update % args.eval_interval == 0:
                    report(f"Iter {progress.update}", run_eval(), writer, progress.update)
            bar.close()
            seconds = time.time() - started
            print_rank_0(f"Epoch {epoch + 1}/{args.num_train_epochs} with loss "
                         f"{epoch_loss.item() / max(progress.epoch_steps, 1):.4f} "
                         f"({steps_run} steps in {seconds:.1f} s, {steps_run / seconds:.2f} steps/s)")
            progress = resume.Progress(epoch=epoch + 1, update=progress.update, micro_steps=progress.micro_steps,
                                       skipped=progress.skipped)
            metrics = run_eval()
            report(f"Epoch {epoch + 1}/{args.num_train_epochs}", metrics, writer, progress.update)
        if (args.save_interval or resume_from) and progress.update != last_saved:  # --resume then finds it done
            print_rank_0(f"saved {save_checkpoint()}")
    if progress.skipped:
        print_rank_0(f"skipped {progress.skipped} step(s) with a NaN or inf loss")
    if metrics is None:  # resumed after the last epoch had ended
        metrics = run_eval()
    unit = "solutions (step accuracy)" if args.process_reward else "pairs"
    print_rank_0(f"final held-out accuracy: {metrics['accuracy']:.4f} on {metrics['pairs']:.0f} {unit}")
    if writer:
        writer.close()

    if args.output_dir:
        print_rank_0(f"saving the reward model to {args.output_dir}")
        if args.lora_dim > 0:
            merge_lora(engine.module, args.zero_stage)
        rows = metrics.pop("rows")
        meta = {"base_model": args.model_name_or_path, "end_of_conversation_token": end_text,
                "add_eot_token": args.add_eot_token, "max_seq_len": args.max_seq_len, "loss": args.loss,
                "center_rewards_coefficient": args.center_rewards_coefficient,
                "sources": eval_set.data.source_names, "final_eval": metrics}
        data = f"held-out split of {' '.join(args.data_path)}"
        if args.process_reward:  # step logits: good steps as "chosen", bad ones as "rejected"
            meta.update(loss="step_bce", process_reward=True, step_separator=args.step_separator,
                        prm_neutral=args.prm_neutral, train_on_last_step_only=args.train_on_last_step_only)
            stats = reward_statistics(rows[rows[:, 1] > 0.5, 0], rows[rows[:, 1] < 0.5, 0], data,
                                      all_rewards=rows[:, 0])
        else:
            stats = reward_statistics(rows[rows[:, 2] == 0, 0], worst_rows(rows)[:, 0], data, all_rewards=rows[:, 0],
                                      margins=best_worst_margins(rows))
        skipped = save_reward_model(engine.module, tokenizer, args.output_dir, args.zero_stage, rank, meta,
                                    stats=stats, key_prefix=args.step3_key_prefix, hf_export=not args.no_hf_export)
        if skipped:
            raise export_skipped_error(args.output_dir, skipped)


def dry_run(args: argparse.Namespace) -> None:
    """What a launch would use, without touching the model or the data (to check a script's flags)."""
    resolve_dtype(args)
    resolve_attention(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    resolved = {"args": {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()},
                "world_size": world_size, "deepspeed_config": build_ds_config(args, world_size)}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(resolved, indent=2, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return exit_status(lambda: dry_run(args))
    resolve_dtype(args)
    resolve_attention(args)
    return exit_status(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
