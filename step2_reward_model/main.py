#!/usr/bin/env python
"""Step 2 of RLHF: train a reward model with DeepSpeed.

The flags are DeepSpeed-Chat's step-2 flags (`flags.py`), so its launch scripts run unchanged.
Run from the repository root, after `pip install -e .`:

    deepspeed step2_reward_model/main.py --model_name_or_path facebook/opt-350m --output_dir out

`train` reads top to bottom: set up the process, data, model and engine; then the loop, one
`train_step` per batch with the work around it in `training.Run`; then save OUTPUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import SchedulerType

from step2_reward_model import checkpoints
from step2_reward_model.engine import build_ds_config, build_engine, resolve_attention, resolve_dtype
from step2_reward_model.evaluate import (
    BenchmarkEval,
    best_worst_margins,
    evaluate,
    evaluate_attributes,
    evaluate_steps,
    worst_rows,
)
from step2_reward_model.flags import parse_training_args
from step2_reward_model.lora import apply_lora, merge_lora
from step2_reward_model.memory import check_memory
from step2_reward_model.model import (
    ENCODERS,
    Attributes,
    RewardModel,
    create_reward_model,
    end_of_conversation_text,
    load_config,
    packing_problem,
    prefix_sharing_problem,
)
from step2_reward_model.output import export_skipped_error, save_reward_model
from step2_reward_model.report import rated_statistics, reward_statistics
from step2_reward_model.training import Run, StopRequest, train_step
from utils.data.attributes import AttributeDataset, AttributeScale, parse_weights
from utils.data.build import (
    AttributeOptions,
    DataOptions,
    DataSource,
    StepOptions,
    create_attribute_datasets,
    create_reward_datasets,
    create_step_datasets,
)
from utils.data.chat import load_chat_template
from utils.data.collate import ACCELERATOR_CHUNK_TOKENS, CHUNK_TOKENS, EvalShard, PairCollator
from utils.data.packing import arrangement_for, pad_multiple
from utils.data.sampler import (
    LengthGroupedBatches,
    LossDenominator,
    PackedShapes,
    TokenBudgetBatches,
    WithDenominator,
)
from utils.data.steps import StepCollator
from utils.data.tokenize import TokenizedExamples, has_ranked_lists
from utils.errors import UserError, exit_status
from utils.files import REPO_ROOT
from utils.model_files import load_hf_tokenizer
from utils.runtime import init_single_process_env, print_rank_0, set_random_seed


def train(args: argparse.Namespace) -> None:
    # The process: its rank and device, DeepSpeed's config, where a resumed run starts.
    rank, local_rank, world_size, device = start_distributed(args)
    ds_config = build_ds_config(args, world_size)
    args.deepspeed_config = None  # merged into ds_config, which deepspeed.initialize gets below
    resume_from = resume_point(args)
    set_random_seed(args.seed)

    # Data and model.
    config = load_config(args.model_name_or_path, args.trust_remote_code, "--model_name_or_path")
    check_backbone(args, config)
    resolve_attention(args, config)
    tokenizer = load_hf_tokenizer(args.model_name_or_path, args.add_eot_token, args.trust_remote_code)
    if args.chat_template:
        tokenizer.chat_template = load_chat_template(args.chat_template)  # saved with the tokenizer
    end_text = end_of_conversation_text(config)
    train_set, eval_set = load_datasets(args, tokenizer, end_text, local_rank)
    benchmarks = [BenchmarkEval(spec, tokenizer, args.max_seq_len, end_text, args.per_device_eval_batch_size)
                  for spec in args.eval_benchmark]
    model = create_reward_model(args.model_name_or_path, tokenizer, ds_config, dropout=args.dropout, loss=args.loss,
                                compute_fp32_loss=args.compute_fp32_loss or (args.dtype == "bf16"
                                                                             and args.bf16_to_fp32_loss),
                                trust_remote_code=args.trust_remote_code,
                                center_coefficient=args.center_rewards_coefficient,
                                attn_implementation=args.attn_implementation,
                                attributes=attribute_head(args), pair_loss_coefficient=args.pair_loss_coefficient)
    if args.lora_dim > 0:
        apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    collator, share_prompt = make_collator(args, model, tokenizer.pad_token_id, device)
    sampler, train_loader, eval_loader = make_loaders(args, train_set, eval_set, collator, share_prompt, rank,
                                                      world_size, device)
    check_memory(args, model, sampler, device, world_size)
    engine = build_engine(args, model, ds_config, [sampler.batches_in(e) for e in range(args.num_train_epochs)])

    # The run: where it stands, and the work around each step.
    if args.process_reward:
        held_out = partial(evaluate_steps, engine, eval_loader, args.eval_iters, device)
    elif args.objective == "regression":
        held_out = partial(evaluate_attributes, engine, eval_loader, args.eval_iters, device, args.attributes)
    else:
        held_out = partial(evaluate, engine, eval_loader, args.eval_iters, device, eval_set.data.source_names)

    def run_eval() -> dict:
        metrics = held_out()
        for benchmark in benchmarks:
            metrics.update(benchmark.evaluate(engine, device))
        return metrics

    settings = checkpoints.run_settings(args, world_size, len(train_set))
    progress = checkpoints.Progress()
    if resume_from:
        progress = checkpoints.load(engine, resume_from, rank, settings)
        print_rank_0(f"resumed from {resume_from}: step {progress.update}, epoch {progress.epoch + 1}, "
                     f"batch {progress.batch} of {sampler.batches_in(progress.epoch)}")
    run = Run(args, engine, run_eval, settings, progress, bool(resume_from), rank, device,
              ds_config.get("steps_per_print", 10))
    unit = "prompts" if args.objective == "regression" else "pairs"
    print_rank_0(f"***** Running training: {len(train_set)} train {unit}, {len(eval_set)} eval {unit}, "
                 f"{world_size} rank(s), dtype {args.dtype}, ZeRO stage {args.zero_stage} *****")
    if not resume_from:
        run.report("Epoch 0 (before training)", run_eval())

    # The loop.
    with StopRequest(rank) as stop:
        for epoch in range(run.progress.epoch, args.num_train_epochs):
            sampler.set_epoch(epoch, start=run.progress.batch)
            for batch in run.epoch(epoch, train_loader):
                step = train_step(engine, batch, device, stop.signum is not None, world_size)
                run.record(step)
                run.after_step(step, stop)
            run.end_epoch(epoch)
        run.save_last_checkpoint()
    metrics = run.finish()

    if args.output_dir:
        save_output(args, engine, tokenizer, metrics, end_text, eval_set.data.source_names, rank)


def start_distributed(args: argparse.Namespace) -> tuple[int, int, int, torch.device]:
    """Join the process group (one rank of its own without a launcher): rank, local rank, world size, device."""
    init_single_process_env()
    deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    accelerator = get_accelerator()
    device = torch.device("cpu")
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(), local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size(), device


def resume_point(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from, or None to start from the beginning."""
    if args.save_interval and not args.output_dir:
        raise UserError("--save_interval needs --output_dir (checkpoints go into OUTPUT/checkpoints)")
    resume_from = checkpoints.resume_path(args.resume, args.output_dir)
    if args.resume and not resume_from:
        print_rank_0(f"note: --resume: no checkpoint in {checkpoints.checkpoint_folder(args.output_dir)} yet; "
                     "starting from the beginning")
    return resume_from


def check_backbone(args: argparse.Namespace, config) -> None:
    """An encoder's every token sees the whole text, so its one score per sequence is all it has:
    refuse objectives that read values token by token, before any data is read."""
    if config.model_type not in ENCODERS:
        return
    encoder = f"model type {config.model_type} is an encoder, whose every token sees the whole text"
    if args.process_reward:
        raise UserError(f"--process_reward scores each step where it ends, but {encoder} (later steps included): "
                        "start from a causal LM")
    if args.loss == "per_token" and args.objective == "preference":
        raise UserError(f"--loss per_token compares the two answers token by token, but {encoder}: "
                        "pass --loss end_token (or --loss plackett_luce) to compare the pooled scores")


def load_datasets(args: argparse.Namespace, tokenizer, end_text: str, local_rank: int):
    """The train and eval sets: step-labelled solutions with --process_reward, rated responses with
    --objective regression, else pairs and ranked lists."""
    source = DataSource(tuple(args.data_path), args.data_split, args.seed, args.data_output_path, REPO_ROOT,
                        bad_rows=args.bad_rows, log=print_rank_0)
    if args.objective == "regression":
        return attribute_datasets(args, source, tokenizer, end_text, local_rank)
    if args.process_reward:
        steps = StepOptions(args.step_separator, args.prm_neutral, args.train_on_last_step_only)
        return create_step_datasets(source, tokenizer, args.max_seq_len, steps, local_rank)
    options = DataOptions(data_weights=tuple(args.data_weights) if args.data_weights else None,
                          margin_source=args.margin_source, max_responses=args.max_responses_per_prompt,
                          chat_template=tokenizer.chat_template if args.chat_template else None)
    train_set, eval_set = create_reward_datasets(source, tokenizer, args.max_seq_len, end_text, local_rank, options)
    check_objective(args, train_set.data)
    return train_set, eval_set


def attribute_datasets(args: argparse.Namespace, source: DataSource, tokenizer, end_text: str,
                       local_rank: int) -> tuple[AttributeDataset, AttributeDataset]:
    """Rated responses, one example per prompt. Resolves `args.attributes` to the names trained, and
    keeps the label scale (from the training labels) and the reward's weights in `args`."""
    options = AttributeOptions(tuple(args.attributes) if args.attributes else None,
                               tokenizer.chat_template if args.chat_template else None)
    train, held_out = create_attribute_datasets(source, tokenizer, args.max_seq_len, end_text, options, local_rank)
    args.attributes = train.attribute_names
    args.label_scale = AttributeScale.of(args.attribute_scale, train.labels, len(args.attributes))
    args.reward_weights = parse_weights(args.attribute_weights, args.attributes)
    print_rank_0("reward = " + " + ".join(f"{weight:g} * {name}" for name, weight in
                                           zip(args.attributes, args.reward_weights, strict=True) if weight))
    return AttributeDataset(train, args.label_scale), AttributeDataset(held_out, args.label_scale)


def attribute_head(args: argparse.Namespace) -> Attributes | None:
    """The attributes the value head predicts, with --objective regression (after the data is read)."""
    if args.objective != "regression":
        return None
    return Attributes(tuple(args.attributes), tuple(args.reward_weights))


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


def make_collator(args: argparse.Namespace, model: RewardModel, pad_token_id: int | None,
                  device: torch.device) -> tuple[PairCollator | StepCollator, bool]:
    """The collator of the batch layout this model and these flags take, and whether it shares prompts."""
    arrangement = packing_arrangement(args, model.config)
    if args.process_reward:
        return StepCollator(pad_token_id, pad_multiple(model.config._attn_implementation), arrangement), False
    problem = prefix_sharing_problem(model.config) if args.prefix_sharing else None
    if problem:
        print_rank_0(f"note: prefix sharing is off ({problem}): every response gets its own row with the prompt")
    share_prompt = args.prefix_sharing and problem is None
    # ZeRO-3 gathers every layer's weights once per forward, so it runs each batch as one.
    chunk_tokens = CHUNK_TOKENS.get(device.type, ACCELERATOR_CHUNK_TOKENS) if args.zero_stage < 3 else None
    return PairCollator(pad_token_id, share_prompt=share_prompt, chunk_tokens=chunk_tokens, arrangement=arrangement,
                        pad_to_multiple_of=pad_multiple(model.config._attn_implementation)), share_prompt


def packing_arrangement(args: argparse.Namespace, config) -> str | None:
    """With --max_tokens_per_batch, how documents are packed (`packing.arrangement_for`), or None:
    not packed, for a model that cannot take several documents in a row."""
    if args.max_tokens_per_batch is None:
        return None
    problem = packing_problem(config)
    if problem:
        print_rank_0(f"note: documents are not packed several to a row ({problem}): token-budget batches of "
                     "padded rows")
        return None
    return arrangement_for(config._attn_implementation)


def make_loaders(args: argparse.Namespace, train_set, eval_set, collator, share_prompt: bool, rank: int,
                 world_size: int, device: torch.device) -> tuple[LengthGroupedBatches, DataLoader, DataLoader]:
    """Length-grouped shuffled training batches (of --per_device_train_batch_size examples, or of
    --max_tokens_per_batch tokens); evaluation batches sorted by length, longest first, each rank
    taking every world_size-th."""
    sampler, train_items = train_sampler(args, train_set, collator, share_prompt, rank, world_size)
    layout = "one row per solution" if args.process_reward else \
        "one packed row per prompt, computing it once" if share_prompt else "one row per response"
    grouping = f"grouped by length within windows of {args.length_grouping_steps} steps" \
        if args.length_grouping_steps > 0 else "in plain shuffled order"
    chunks = ", run in chunks of similar length" if getattr(collator, "chunk_tokens", None) is not None \
        and not share_prompt and not collator.arrangement else ""
    packed = {"fit": ", packed several to a row as wide as the longest",
              "flat": ", packed end to end in one row"}.get(collator.arrangement, ", padded to their longest")
    budget = f"{args.max_tokens_per_batch} tokens per device and step" if args.max_tokens_per_batch else \
        f"{args.per_device_train_batch_size} per device and step"
    print_rank_0(f"batches: {layout}{packed}, {budget}, {grouping}{chunks}")
    options = {"collate_fn": collator, "pin_memory": device.type == "cuda"}
    eval_order = np.argsort(-eval_set.lengths(share_prompt), kind="stable")
    eval_loader = DataLoader(EvalShard(Subset(eval_set, eval_order), rank, world_size),
                             batch_size=args.per_device_eval_batch_size, **options)
    # Its own generator: a loader draws a seed from the global one at every epoch's start, which
    # would shift the dropout of a run resumed part way through an epoch.
    train_loader = DataLoader(train_items, batch_sampler=sampler, generator=torch.Generator(), **options)
    return sampler, train_loader, eval_loader


def train_sampler(args: argparse.Namespace, train_set, collator, share_prompt: bool, rank: int,
                  world_size: int) -> tuple[LengthGroupedBatches | TokenBudgetBatches, Dataset]:
    """The training batch sampler, and the data set its batches index."""
    if args.max_tokens_per_batch is None:
        return LengthGroupedBatches(train_set.lengths(share_prompt), args.per_device_train_batch_size, rank,
                                    world_size, seed=args.seed, window=args.length_grouping_steps,
                                    shapes=train_set.row_shapes(share_prompt)), train_set
    tokens = train_set.tokens(share_prompt)
    shapes = PackedShapes(tokens, collator.arrangement) if collator.arrangement else train_set.row_shapes(False)
    denominator = LossDenominator(train_set.loss_units(), args.gradient_accumulation_steps, args.num_train_epochs)
    sampler = TokenBudgetBatches(tokens, args.max_tokens_per_batch, rank, world_size, seed=args.seed,
                                 window=args.length_grouping_steps, denominator=denominator, shapes=shapes)
    if len(sampler.oversized):
        print_rank_0(f"note: {len(sampler.oversized)} training example(s) have more tokens than "
                     f"--max_tokens_per_batch {args.max_tokens_per_batch} (the longest {tokens.max()}): each is "
                     "trained alone in its device's share of a step")
    return sampler, WithDenominator(train_set)


def save_output(args: argparse.Namespace, engine, tokenizer, metrics: dict, end_text: str, sources: list[str],
                rank: int) -> None:
    """Write OUTPUT: the model (LoRA merged), its manifest and the reward statistics of the held-out set."""
    print_rank_0(f"saving the reward model to {args.output_dir}")
    if args.lora_dim > 0:
        merge_lora(engine.module, args.zero_stage)
    rows = metrics.pop("rows")
    data = f"held-out split of {' '.join(args.data_path)}"
    meta = {"base_model": args.model_name_or_path, "end_of_conversation_token": end_text,
            "add_eot_token": args.add_eot_token, "max_seq_len": args.max_seq_len, "loss": args.loss,
            "center_rewards_coefficient": args.center_rewards_coefficient, "sources": sources,
            "final_eval": metrics}
    if args.objective == "regression":  # the reward of each prompt's best and worst rated response
        scale = args.label_scale
        meta.update(objective="regression", loss="attribute_mse", pair_loss_coefficient=args.pair_loss_coefficient,
                    attributes={"scale": {"kind": args.attribute_scale, "low": scale.low, "high": scale.high}})
        stats = rated_statistics(rows[:, 0], rows[:, 1], rows[:, 2], data)
    elif args.process_reward:  # step logits: good steps as "chosen", bad ones as "rejected"
        meta.update(loss="step_bce", process_reward=True, step_separator=args.step_separator,
                    prm_neutral=args.prm_neutral, train_on_last_step_only=args.train_on_last_step_only)
        stats = reward_statistics(rows[rows[:, 1] > 0.5, 0], rows[rows[:, 1] < 0.5, 0], data, all_rewards=rows[:, 0])
    else:
        stats = reward_statistics(rows[rows[:, 2] == 0, 0], worst_rows(rows)[:, 0], data, all_rewards=rows[:, 0],
                                  margins=best_worst_margins(rows))
    skipped = save_reward_model(engine.module, tokenizer, args.output_dir, args.zero_stage, rank, meta, stats=stats,
                                key_prefix=args.step3_key_prefix, hf_export=not args.no_hf_export)
    if skipped:
        raise export_skipped_error(args.output_dir, skipped)


def dry_run(args: argparse.Namespace) -> None:
    """What a launch would use, without touching the model or the data (to check a script's flags)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    resolved = {"args": {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()},
                "world_size": world_size, "deepspeed_config": build_ds_config(args, world_size)}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(resolved, indent=2, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(argv)
    resolve_dtype(args)
    resolve_attention(args)
    status = exit_status(lambda: dry_run(args) if args.dry_run else train(args))
    # One rank on its own (no launcher): Gloo's threads can otherwise abort the interpreter's exit
    # ("terminate called without an active exception", seen once in 40 runs). Launched ranks keep
    # their groups to the end, as before: one that exits first would take the store the others use.
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
