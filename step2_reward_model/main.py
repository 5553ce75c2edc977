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

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from rlhf_reward.utils.data.chat import load_chat_template
from rlhf_reward.utils.data.collate import EvalShard, chunk_tokens_for
from rlhf_reward.utils.data.packing import arrangement_for, pad_multiple
from rlhf_reward.utils.data.sampler import (
    LengthGroupedBatches,
    LossDenominator,
    PackedShapes,
    TokenBudgetBatches,
    WithDenominator,
)
from rlhf_reward.utils.errors import UserError, exit_status
from rlhf_reward.utils.model_files import load_hf_tokenizer
from rlhf_reward.utils.runtime import join_process_group, print_rank_0, process_group_scope, set_random_seed
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import SchedulerType

from step2_reward_model import checkpoints
from step2_reward_model.engine import build_ds_config, build_engine, resolve_attention, resolve_dtype
from step2_reward_model.evaluate import BenchmarkEval, Evaluation, evaluate
from step2_reward_model.flags import parse_training_args
from step2_reward_model.lora import apply_lora, merge_lora
from step2_reward_model.memory import check_memory
from step2_reward_model.model import (
    RewardModel,
    create_reward_model,
    end_of_conversation_text,
    load_config,
    packing_problem,
    position_limit_problem,
    prefix_sharing_problem,
)
from step2_reward_model.objectives import objective_for
from step2_reward_model.objectives.base import DataRequest, Datasets, Objective
from step2_reward_model.output import Shards, export_skipped_error, save_reward_model
from step2_reward_model.training import Placement, Run, Start, StopRequest, train_step


def train(args: argparse.Namespace) -> None:
    # The process: its rank and device, DeepSpeed's config, where a resumed run starts.
    placement, local_rank = start_distributed(args)
    ds_config = build_ds_config(args, placement.world_size)
    resume_from = resume_point(args)
    set_random_seed(args.seed)

    # Data and model: the objective (`objectives/`) reads the data and settles what it needs of it.
    config = load_config(args.model_name_or_path, args.trust_remote_code, "--model_name_or_path")
    if problem := position_limit_problem(config, args.max_seq_len):
        raise UserError(problem)
    objective = objective_for(args)
    objective.check_backbone(config)
    attention = resolve_attention(args, config)
    tokenizer = load_hf_tokenizer(args.model_name_or_path, args.add_eot_token, args.trust_remote_code)
    if args.chat_template:
        tokenizer.chat_template = load_chat_template(args.chat_template)  # saved with the tokenizer
    end_text = end_of_conversation_text(config)
    request = DataRequest.from_args(args, args.max_seq_len, print_rank_0, local_rank=local_rank,
                                    chat_template=tokenizer.chat_template if args.chat_template else None)
    data = objective.datasets(request, tokenizer, end_text)
    objective = data.objective
    benchmarks = [BenchmarkEval(spec, tokenizer, args.max_seq_len, end_text, args.per_device_eval_batch_size)
                  for spec in args.eval_benchmark]
    model = create_reward_model(args.model_name_or_path, tokenizer, ds_config, dropout=args.dropout,
                                trust_remote_code=args.trust_remote_code, attn_implementation=attention,
                                attributes=data.head)
    if args.lora_dim > 0:
        apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    collator, share_prompt = make_collator(args, objective, model, tokenizer.pad_token_id, placement.device)
    sampler, train_loader, eval_loader = make_loaders(args, data, collator, share_prompt, placement)
    check_memory(args, model, sampler, placement.device, placement.world_size)
    engine = build_engine(args, model, ds_config, [sampler.batches_in(e) for e in range(args.num_train_epochs)])

    # The run: where it stands, and the work around each step.
    def run_eval() -> Evaluation:
        evaluation = evaluate(engine, objective, eval_loader, args.eval_iters, placement.device, data.source_names)
        for benchmark in benchmarks:
            evaluation.metrics.update(benchmark.evaluate(engine, placement.device))
        return evaluation

    settings = checkpoints.run_settings(args, placement.world_size, len(data.train))
    progress = checkpoints.Progress()
    if resume_from:
        progress = checkpoints.load(engine, resume_from, placement.rank, settings)
        print_rank_0(f"resumed from {resume_from}: step {progress.update}, epoch {progress.epoch + 1}, "
                     f"batch {progress.batch} of {sampler.batches_in(progress.epoch)}")
    run = Run(args, engine, objective, run_eval, Start(settings, progress, bool(resume_from)), placement,
              ds_config.get("steps_per_print", 10))
    print_rank_0(f"***** Running training: {len(data.train)} train {objective.unit}, {len(data.held_out)} eval "
                 f"{objective.unit}, {placement.world_size} rank(s), dtype {args.dtype}, ZeRO stage {args.zero_stage} "
                 "*****")
    if not resume_from:
        run.report("Epoch 0 (before training)", run_eval())

    # The loop.
    with StopRequest(placement.rank) as stop:
        for epoch in range(run.progress.epoch, args.num_train_epochs):
            sampler.set_epoch(epoch, start=run.progress.batch)
            for batch in run.epoch(epoch, train_loader):
                step = train_step(engine, objective, batch, placement, stop.signum is not None)
                run.record(step)
                run.after_step(step, stop)
            run.end_epoch(epoch)
        run.save_last_checkpoint()
    evaluation = run.finish()

    if args.output_dir:
        save_output(args, engine, data, tokenizer, evaluation, end_text, request, placement.rank)


def start_distributed(args: argparse.Namespace) -> tuple[Placement, int]:
    """Join the process group (one rank of its own without a launcher): where this process runs, and
    its local rank."""
    join_process_group()
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    accelerator = get_accelerator()
    device = torch.device("cpu")
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(), local_rank)
    return Placement(dist.get_rank(), dist.get_world_size(), device), local_rank


def resume_point(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from, or None to start from the beginning."""
    if args.save_interval and not args.output_dir:
        raise UserError("--save_interval needs --output_dir (checkpoints go into OUTPUT/checkpoints)")
    resume_from = checkpoints.resume_path(args.resume, args.output_dir)
    if args.resume and not resume_from:
        print_rank_0(f"note: --resume: no checkpoint in {checkpoints.checkpoint_folder(args.output_dir)} yet; "
                     "starting from the beginning")
    return resume_from


def make_collator(args: argparse.Namespace, objective: Objective, model: RewardModel, pad_token_id: int | None,
                  device: torch.device) -> tuple:
    """The collator of the batch layout this objective, model and these flags take, and whether it
    shares prompts."""
    arrangement = packing_arrangement(args, model.config)
    share_prompt = False
    if objective.shares_prompts():
        problem = prefix_sharing_problem(model.config) if args.prefix_sharing else None
        if problem:
            print_rank_0(f"note: prefix sharing is off ({problem}): every response gets its own row with the prompt")
        share_prompt = args.prefix_sharing and problem is None
    # ZeRO-3 gathers every layer's weights once per forward, so it runs each batch as one.
    chunk_tokens = chunk_tokens_for(device.type) if args.zero_stage < 3 else None
    return objective.collator(pad_token_id, pad_multiple(model.config._attn_implementation), arrangement,
                              share_prompt, chunk_tokens), share_prompt


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


def make_loaders(args: argparse.Namespace, data: Datasets, collator, share_prompt: bool,
                 placement: Placement) -> tuple[LengthGroupedBatches, DataLoader, DataLoader]:
    """Length-grouped shuffled training batches (of --per_device_train_batch_size examples, or of
    --max_tokens_per_batch tokens); evaluation batches sorted by length, longest first, each rank
    taking every world_size-th."""
    train_set, eval_set, rank, world_size = data.train, data.held_out, placement.rank, placement.world_size
    sampler, train_items = train_sampler(args, train_set, collator, share_prompt, placement)
    layout = "one packed row per prompt, computing it once" if share_prompt else \
        f"one row per {'response' if data.objective.shares_prompts() else 'solution'}"
    grouping = f"grouped by length within windows of {args.length_grouping_steps} steps" \
        if args.length_grouping_steps > 0 else "in plain shuffled order"
    chunks = ", run in chunks of similar length" if getattr(collator, "chunk_tokens", None) is not None \
        and not share_prompt and not collator.arrangement else ""
    packed = {"fit": ", packed several to a row as wide as the longest",
              "flat": ", packed end to end in one row"}.get(collator.arrangement, ", padded to their longest")
    budget = f"{args.max_tokens_per_batch} tokens per device and step" if args.max_tokens_per_batch else \
        f"{args.per_device_train_batch_size} per device and step"
    print_rank_0(f"batches: {layout}{packed}, {budget}, {grouping}{chunks}")
    options = {"collate_fn": collator, "pin_memory": placement.device.type == "cuda"}
    eval_order = np.argsort(-eval_set.lengths(share_prompt), kind="stable")
    eval_loader = DataLoader(EvalShard(Subset(eval_set, eval_order), rank, world_size),
                             batch_size=args.per_device_eval_batch_size, **options)
    # Its own generator: a loader draws a seed from the global one at every epoch's start, which
    # would shift the dropout of a run resumed part way through an epoch.
    train_loader = DataLoader(train_items, batch_sampler=sampler, generator=torch.Generator(), **options)
    return sampler, train_loader, eval_loader


def train_sampler(args: argparse.Namespace, train_set, collator, share_prompt: bool,
                  placement: Placement) -> tuple[LengthGroupedBatches | TokenBudgetBatches, Dataset]:
    """The training batch sampler, and the data set its batches index."""
    rank, world_size = placement.rank, placement.world_size
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


def save_output(args: argparse.Namespace, engine, data: Datasets, tokenizer, evaluation: Evaluation, end_text: str,
                request: DataRequest, rank: int) -> None:
    """Write OUTPUT: the model (LoRA merged), its manifest and the reward statistics of the held-out set."""
    print_rank_0(f"saving the reward model to {args.output_dir}")
    if args.lora_dim > 0:
        merge_lora(engine.module, args.zero_stage)
    objective = data.objective
    meta = {"base_model": args.model_name_or_path, "end_of_conversation_token": end_text,
            "add_eot_token": args.add_eot_token, "max_seq_len": args.max_seq_len, "sources": data.source_names,
            **objective.manifest(), "final_eval": evaluation.metrics}
    stats = objective.statistics(evaluation.table, request.label())
    skipped = save_reward_model(engine.module, tokenizer, args.output_dir, meta, stats=stats,
                                key_prefix=args.step3_key_prefix, hf_export=not args.no_hf_export,
                                shards=Shards(args.zero_stage, rank))
    if skipped:
        raise export_skipped_error(args.output_dir, skipped)


def dry_run(args: argparse.Namespace) -> None:
    """What a launch would use, without touching the model or the data (to check a script's flags)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    resolved = {"args": {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()},
                "attention": resolve_attention(args),
                "world_size": world_size, "deepspeed_config": build_ds_config(args, world_size)}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(resolved, indent=2, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(argv)
    resolve_dtype(args)
    with process_group_scope():
        status = exit_status(lambda: dry_run(args) if args.dry_run else train(args))
    return status


if __name__ == "__main__":
    sys.exit(main())
