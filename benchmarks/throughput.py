#!/usr/bin/env python
"""Training throughput of the reward model under four batching modes, side by side in one run.

    python benchmarks/throughput.py --preset small            # 4 layers, hidden 256, on the HH sample
    python benchmarks/throughput.py --preset opt-350m --dtype bf16 --pairs 2000   # on a GPU

Modes, each run in a fresh process (so that its peak memory is its own) on the same pairs with
the same model, one pass, through main.py's training step (DeepSpeed engine forward, backward,
step):

    max_len  every row padded to --max_seq_len, random batches (as DeepSpeed-Chat)
    dynamic  rows padded to the batch's longest, random batches
    grouped  dynamic, in batches grouped by length within shuffled windows
    shared   grouped, and one packed row per pair that computes the prompt once (training's default)

Columns: pairs/s; seq tok/s, the tokens of the chosen and rejected sequences scored per second
(the same work in every mode); real %, the share of the tokens the model processed that are not
padding; tok/pair, tokens processed per pair; the mean step split into data (collate and copy),
forward, backward and optimizer, with a device sync between them; peak memory (CPU: the
process's peak resident set, which includes the imported libraries; GPU: peak allocated); MFU,
the model FLOPs of the non-padding tokens (6 x non-embedding parameters per token, plus
attention over each token's visible context) per second, over the peak of a matmul timed at the
start of this run in the same precision.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np

from utils.files import REPO_ROOT

HH_SAMPLE = os.path.join(REPO_ROOT, "..", "shared", "data", "hh_rlhf_harmless_sample.jsonl.gz")
MODES = ("max_len", "dynamic", "grouped", "shared")
# OPT-architecture sizes, randomly initialised (nothing is downloaded); vocab None = the tokenizer's.
PRESETS = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vocab": None},
    "small": {"hidden": 256, "layers": 4, "heads": 4, "vocab": None},
    "opt-125m": {"hidden": 768, "layers": 12, "heads": 12, "vocab": 50272},
    "opt-350m": {"hidden": 1024, "layers": 24, "heads": 16, "proj": 512, "vocab": 50272},
    "opt-1.3b": {"hidden": 2048, "layers": 24, "heads": 32, "vocab": 50272},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--data_path", default=None,
                   help="Any source the data module reads; default the HH-RLHF sample in ../shared/data, "
                        "or 'synthetic' (random ids, HH-like lengths) when it is absent.")
    p.add_argument("--pairs", type=int, default=400, help="Pairs per mode (one pass).")
    p.add_argument("--batch_size", type=int, default=8, help="Pairs per step.")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--loss", default="per_token", choices=["per_token", "end_token"])
    p.add_argument("--length_grouping_steps", type=int, default=32, help="Window of the grouped modes.")
    p.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps before the timed pass.")
    p.add_argument("--vocab_size", type=int, default=8192, help="Of the BPE trained on the data.")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", default=None, help="Also write the figures to this file.")
    return p.parse_args(argv)


def synthetic_texts(count: int, seed: int) -> list[dict]:
    """Pairs of random words with HH-like lengths (a word is about one token once the BPE has
    learned the 500 words): prompts of ~114 words on average, answers of ~54."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(500)]

    def text(mean: float) -> str:
        return " ".join(rng.choice(words, size=max(1, int(rng.lognormal(np.log(mean), 0.6)))))

    return [{"prompt": text(95), "chosen": text(45), "rejected": text(45)} for _ in range(count)]


def load_pairs(args: argparse.Namespace):
    """The first --pairs examples of the data, tokenised as in training by a BPE trained on them."""
    from utils.data.build import load_examples
    from utils.data.tokenize import tokenize_examples
    from utils.model_files import END_OF_CONVERSATION_TOKEN
    from utils.tiny import train_tokenizer

    path = args.data_path or (HH_SAMPLE if os.path.isfile(HH_SAMPLE) else "synthetic")
    with tempfile.TemporaryDirectory() as scratch:
        if path == "synthetic":
            path = os.path.join(scratch, "synthetic.jsonl.gz")
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in synthetic_texts(args.pairs, 0))
        examples, _ = load_examples([path], "0,1,0", 2, 1234, scratch, REPO_ROOT, lambda _: None, None)
    examples = examples[:args.pairs]
    tokenizer = train_tokenizer([ex["prompt"] + resp for ex in examples for resp in ex["responses"]],
                                "opt", args.vocab_size)
    data = tokenize_examples(examples, tokenizer, args.max_seq_len, END_OF_CONVERSATION_TOKEN, None)
    return data, len(tokenizer), tokenizer.pad_token_id, os.path.basename(path)


def matmul_peak(device: str, dtype: str) -> float:
    """FLOP/s of the best of five square matmuls, in the training precision."""
    import torch

    n = 8192 if device == "cuda" else 2048
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = (torch.randn(n, n, device=device, dtype=kind) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build_engine(args: argparse.Namespace, vocab: int, pad_token_id: int):
    """A randomly initialised OPT of the preset in main.py's DeepSpeed engine (same config and optimizer)."""
    import torch
    from transformers import AutoModel, OPTConfig

    from step2_reward_model.engine import build_ds_config, build_engine
    from step2_reward_model.flags import parse_training_args
    from step2_reward_model.model import RewardModel, embedding_rows

    preset = PRESETS[args.preset]
    hidden = preset["hidden"]
    config = OPTConfig(vocab_size=preset["vocab"] or embedding_rows(vocab), hidden_size=hidden,
                       num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"], ffn_dim=4 * hidden,
                       word_embed_proj_dim=preset.get("proj", hidden), max_position_embeddings=2048,
                       pad_token_id=pad_token_id)
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config), loss=args.loss)
    flags = ["--model_name_or_path", args.preset, "--per_device_train_batch_size", str(args.batch_size),
             "--dtype", args.dtype, "--zero_stage", str(args.zero_stage), "--learning_rate", "1e-5",
             "--lr_scheduler_type", "constant"]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    train_args = parse_training_args(flags)
    return build_engine(train_args, model, build_ds_config(train_args, 1), batches_per_epoch=1), config


def non_embedding_parameters(model) -> int:
    return sum(param.numel() for name, param in model.named_parameters() if "embed_" not in name)


def batch_counts(batch: dict) -> tuple[int, int, int, int]:
    """Processed tokens, non-padding tokens, sequence tokens, and the summed visible context of the
    non-padding tokens (each token attends to position + 1 keys, packed or not)."""
    if "row_index" in batch:
        real, positions = batch["segment_ids"] >= 0, batch["position_ids"]
        sequence_tokens = int((batch["row_index"] >= 0).sum())
    else:
        real = batch["attention_mask"].bool()
        positions = batch["attention_mask"].cumsum(-1) - 1
        sequence_tokens = int(real.sum())
    context = int(((positions + 1) * real).sum())
    return batch["input_ids"].numel(), int(real.sum()), sequence_tokens, context


def rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run_mode(mode: str, args: argparse.Namespace, data, vocab: int, pad_token_id: int) -> dict:
    """One timed pass over the data in `mode`; runs in its own process."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch.utils.data import DataLoader

    from step2_reward_model.training import train_step
    from utils.data.collate import PairCollator, PairDataset
    from utils.data.sampler import LengthGroupedBatches
    from utils.runtime import init_single_process_env

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_single_process_env()
    deepspeed.init_distributed(verbose=False)
    device = get_accelerator().device_name()
    baseline = rss_mib()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's and the optimizer's start-up lines
        engine, config = build_engine(args, vocab, pad_token_id)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    share = mode == "shared"
    dataset = PairDataset(data)
    collator = PairCollator(pad_token_id, share_prompt=share,
                            pad_to=args.max_seq_len if mode == "max_len" else None)
    window = args.length_grouping_steps if mode in ("grouped", "shared") else 0
    sampler = LengthGroupedBatches(dataset.lengths(share), args.batch_size, seed=0, window=window)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, pin_memory=device == "cuda")

    def step(batch: dict) -> list[float]:
        """main.py's training step, with the time after each phase (copy, forward, backward, step)."""
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(device)
            marks.append(time.perf_counter())

        train_step(engine, batch, torch.device(device), stop_requested=False, world_size=1, mark=mark)
        return np.diff(marks).tolist()

    sampler.set_epoch(1)  # warm-up batches from another shuffle
    for index, batch in enumerate(loader):
        if index == args.warmup_steps:
            break
        step(batch)
    sampler.set_epoch(0)
    phases, counts = np.zeros(4), np.zeros(4)
    collate_time, started = 0.0, time.perf_counter()
    loader_iter = iter(loader)
    for _ in range(len(loader)):
        fetch = time.perf_counter()
        batch = next(loader_iter)
        collate_time += time.perf_counter() - fetch
        counts += batch_counts(batch)
        phases += step(batch)
    elapsed = time.perf_counter() - started
    phases[0] += collate_time
    steps = len(loader)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    flops = 6 * non_embedding_parameters(engine.module) * counts[1] + 12 * layers * hidden * counts[3]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "pairs_per_s": len(data) / elapsed, "seq_tokens_per_s": counts[2] / elapsed,
            "real_share": counts[1] / counts[0], "tokens_per_pair": counts[0] / len(data),
            "step_ms": (phases / steps * 1000).tolist(), "peak_mib": peak, "baseline_mib": baseline,
            "flops_per_s": flops / elapsed, "parameters": sum(p.numel() for p in engine.module.parameters())}


def print_table(results: list[dict], peak_flops: float) -> None:
    header = (f"{'mode':<8} {'pairs/s':>8} {'seq tok/s':>10} {'real %':>7} {'tok/pair':>9} {'data ms':>8} "
              f"{'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'peak MiB':>9} {'MFU %':>6}")
    print(header)
    for row in results:
        data, forward, backward, optimizer = row["step_ms"]
        print(f"{row['mode']:<8} {row['pairs_per_s']:>8.2f} {row['seq_tokens_per_s']:>10.0f} "
              f"{100 * row['real_share']:>7.1f} {row['tokens_per_pair']:>9.1f} {data:>8.1f} {forward:>8.1f} "
              f"{backward:>8.1f} {optimizer:>8.1f} {row['peak_mib']:>9.0f} "
              f"{100 * row['flops_per_s'] / peak_flops:>6.1f}")
    by_mode = {row["mode"]: row["pairs_per_s"] for row in results}
    if "shared" in by_mode:
        gains = [f"{by_mode['shared'] / by_mode[mode]:.2f}x {mode}" for mode in by_mode if mode != "shared"]
        print(f"shared runs {', '.join(gains)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    data, vocab, pad_token_id, name = load_pairs(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_flops = matmul_peak(device, args.dtype)
    lengths = [len(p) + len(r) for p, responses in zip(data.prompts, data.responses, strict=True) for r in responses]
    preset = PRESETS[args.preset]
    print(f"data: {len(data)} pairs of {name}, {np.mean(lengths):.0f} tokens per sequence on average "
          f"(prompt {np.mean([len(p) for p in data.prompts]):.0f}), BPE vocabulary {vocab}")
    print(f"setup: preset {args.preset} (OPT, {preset['layers']} layers, hidden {preset['hidden']}), "
          f"{args.batch_size} pairs per step, max_seq_len {args.max_seq_len}, {args.dtype}, ZeRO {args.zero_stage}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, {device}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak_flops / 1e9:.1f} GFLOP/s")
    context = multiprocessing.get_context("spawn")
    results = []
    for mode in args.modes:
        with context.Pool(1) as pool:
            results.append(pool.apply(run_mode, (mode, args, data, vocab, pad_token_id)))
    print(f"model: {results[0]['parameters'] / 1e6:.1f} M parameters; CPU peak memory includes "
          f"{results[0]['baseline_mib']:.0f} MiB of libraries before the model")
    print_table(results, peak_flops)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "matmul_peak_flops": peak_flops, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
