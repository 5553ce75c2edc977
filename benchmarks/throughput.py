#!/usr/bin/env python
"""Training throughput of the reward model under five batching modes, side by side in one run.

    python benchmarks/throughput.py --preset small            # 4 layers, hidden 256, on the HH sample
    python benchmarks/throughput.py --preset opt-350m --dtype bf16 --pairs 2000   # on a GPU
    python benchmarks/throughput.py --gpu_table              # the GPU presets x lengths x mixes, bf16

Modes, each run in a fresh process (so that its peak memory is its own) on the same pairs with
the same model, one pass, through main.py's training step (DeepSpeed engine forward, backward,
step):

    max_len  every row padded to --max_seq_len, random batches (as DeepSpeed-Chat)
    dynamic  rows padded to the batch's longest, random batches (as TRL)
    grouped  dynamic, in batches grouped by length within shuffled windows
    shared   grouped, and one packed row per pair that computes the prompt once (training's default)
    packed   shared, in token-budget steps (--max_tokens_per_batch) with several prompts per row
             and no padding between them: first-fit rows as wide as the longest prompt with its
             answers for SDPA, one flat row for FlexAttention (--packing overrides)

The budget defaults to --batch_size times the mean packed pair, so packed steps hold as many
pairs as the others on average. The padded modes run SDPA; packed runs the attention training
would pick (FlexAttention on a GPU where the model has it).

Columns: pairs/s; seq tok/s, the tokens of the chosen and rejected sequences scored per second
(the same work in every mode); real tok/s and real %, the tokens the model processed that are
not padding, per second and as a share; tok/pair, tokens processed per pair; the mean step split
into data (collate and copy), forward, backward and optimizer, with a device sync between them;
peak memory (CPU: the process's peak resident set, which includes the imported libraries; GPU:
peak allocated); MFU, the model FLOPs of the non-padding tokens (6 x non-embedding parameters
per token, plus attention over each token's visible context) per second, over the peak of a
matmul timed at the start of this run in the same precision.
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
from rlhf_reward.utils.files import REPO_ROOT

HH_SAMPLE = os.path.join(REPO_ROOT, "..", "shared", "data", "hh_rlhf_harmless_sample.jsonl.gz")
MODES = ("max_len", "dynamic", "grouped", "shared", "packed")
# Model sizes, randomly initialised (nothing is downloaded); OPT unless `arch` says otherwise; vocab
# None = the tokenizer's. llama-1b is TinyLlama's shape (1.1 B parameters, grouped-query attention).
PRESETS = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vocab": None},
    "small": {"hidden": 256, "layers": 4, "heads": 4, "vocab": None},
    "opt-125m": {"hidden": 768, "layers": 12, "heads": 12, "vocab": 50272},
    "opt-350m": {"hidden": 1024, "layers": 24, "heads": 16, "proj": 512, "vocab": 50272},
    "opt-1.3b": {"hidden": 2048, "layers": 24, "heads": 32, "vocab": 50272},
    "llama-1b": {"arch": "llama", "hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "ffn": 5632,
                 "vocab": 32000},
}
# The GPU table (--gpu_table): each preset at each length, on HH-like and long-tail length mixes.
GPU_TABLE = {"presets": ("opt-350m", "llama-1b"), "lengths": (512, 2048, 8192), "mixes": ("hh", "long_tail")}
GPU_TABLE_MODES = ("dynamic", "shared", "packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--data_path", default=None,
                   help="Any source the data module reads; default the HH-RLHF sample in ../shared/data, "
                        "or 'synthetic' (random ids, HH-like lengths) when it is absent.")
    p.add_argument("--pairs", type=int, default=400, help="Pairs per mode (one pass).")
    p.add_argument("--batch_size", type=int, default=8, help="Pairs per step.")
    p.add_argument("--max_tokens_per_batch", type=int, default=None,
                   help="The packed mode's token budget per step (default: --batch_size x the mean packed pair).")
    p.add_argument("--packing", choices=["auto", "fit", "flat"], default="auto",
                   help="The packed mode's arrangement: auto as training picks it (flat for FlexAttention).")
    p.add_argument("--lengths", choices=["hh", "long_tail"], default="hh",
                   help="Length mix of the synthetic data: HH-RLHF-like, or a long tail scaled to --max_seq_len.")
    p.add_argument("--gpu_table", action="store_true",
                   help="Run the GPU presets at sequence lengths 512, 2048 and 8192 on both length mixes "
                        "(bf16, synthetic data, modes dynamic, shared, packed) and print one table.")
    p.add_argument("--table_presets", nargs="+", choices=PRESETS, default=list(GPU_TABLE["presets"]),
                   help="The GPU table's presets (a subset fits a shorter slot).")
    p.add_argument("--table_lengths", nargs="+", type=int, default=list(GPU_TABLE["lengths"]),
                   help="The GPU table's sequence lengths.")
    p.add_argument("--table_mixes", nargs="+", choices=["hh", "long_tail"], default=list(GPU_TABLE["mixes"]),
                   help="The GPU table's length mixes.")
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


def synthetic_texts(count: int, seed: int, lengths: str = "hh", max_seq_len: int = 512) -> list[dict]:
    """Pairs of random words (a word is about one token once the BPE has learned the 500 words).
    hh: HH-like lengths, prompts of ~114 words on average, answers of ~54. long_tail: lengths
    scaled to `max_seq_len`, most short and a few near it (prompts median max_seq_len / 10,
    answers / 20, log-normal with twice hh's spread)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(500)]
    prompt, answer, spread = (95, 45, 0.6) if lengths == "hh" else (max_seq_len / 10, max_seq_len / 20, 1.2)

    def text(mean: float) -> str:
        size = min(max(1, int(rng.lognormal(np.log(mean), spread))), max_seq_len)
        return " ".join(rng.choice(words, size=size))

    return [{"prompt": text(prompt), "chosen": text(answer), "rejected": text(answer)} for _ in range(count)]


def load_pairs(args: argparse.Namespace):
    """The first --pairs examples of the data, tokenised as in training by a BPE trained on them."""
    from rlhf_reward.utils.data.build import DataSource, load_examples
    from rlhf_reward.utils.data.tokenize import tokenize_examples
    from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN
    from rlhf_reward.utils.tiny import train_tokenizer

    path = args.data_path or (HH_SAMPLE if os.path.isfile(HH_SAMPLE) else "synthetic")
    with tempfile.TemporaryDirectory() as scratch:
        if path == "synthetic":
            path = os.path.join(scratch, "synthetic.jsonl.gz")
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n"
                                  for row in synthetic_texts(args.pairs, 0, args.lengths, args.max_seq_len))
        examples, _ = load_examples(DataSource((path,), "0,1,0", 1234, scratch, REPO_ROOT, log=lambda _: None))
    examples = examples[:args.pairs]
    tokenizer = train_tokenizer([ex["prompt"] + resp for ex in examples for resp in ex["responses"]],
                                "opt", args.vocab_size)
    data = tokenize_examples(examples, tokenizer, args.max_seq_len, END_OF_CONVERSATION_TOKEN, None)
    return data, len(tokenizer), tokenizer.pad_token_id, os.path.basename(path)


def matmul_peak(device: str, dtype: str) -> float:
    """FLOP/s of the best of five square matmuls, in the training precision. On a CPU without bf16 or
    fp16 instructions a half-precision matmul runs at well under 1 GFLOP/s (a 2048-wide one takes a
    minute), so there it is measured 512 wide."""
    import torch

    n = 8192 if device == "cuda" else 2048 if dtype == "fp32" else 512
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


def model_config(args: argparse.Namespace, vocab: int, pad_token_id: int):
    """The preset's transformers config, long enough for --max_seq_len."""
    from transformers import LlamaConfig, OPTConfig

    from step2_reward_model.model import embedding_rows

    preset = PRESETS[args.preset]
    hidden, vocab_size = preset["hidden"], preset["vocab"] or embedding_rows(vocab)
    positions = max(2048, args.max_seq_len)
    if preset.get("arch") == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=preset["layers"],
                           num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                           intermediate_size=preset["ffn"], max_position_embeddings=positions,
                           pad_token_id=pad_token_id)
    return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=preset["layers"],
                     num_attention_heads=preset["heads"], ffn_dim=4 * hidden,
                     word_embed_proj_dim=preset.get("proj", hidden), max_position_embeddings=positions,
                     pad_token_id=pad_token_id)


def build_engine(args: argparse.Namespace, mode: str, vocab: int, pad_token_id: int):
    """A randomly initialised model of the preset in main.py's DeepSpeed engine (same config and
    optimizer), with the attention training picks for `mode`."""
    import torch
    from transformers import AutoModel

    from step2_reward_model.engine import build_ds_config, build_engine, resolve_attention
    from step2_reward_model.flags import parse_training_args
    from step2_reward_model.model import RewardModel

    config = model_config(args, vocab, pad_token_id)
    flags = ["--model_name_or_path", args.preset, "--per_device_train_batch_size", str(args.batch_size),
             "--dtype", args.dtype, "--zero_stage", str(args.zero_stage), "--learning_rate", "1e-5",
             "--lr_scheduler_type", "constant", "--attn_implementation", "auto"]
    if mode == "packed":
        flags += ["--max_tokens_per_batch", "1"]  # any budget: it only picks the attention
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    train_args = parse_training_args(flags)
    with contextlib.redirect_stdout(sys.stderr):
        config._attn_implementation = resolve_attention(train_args, config) or "sdpa"
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config))
    return build_engine(train_args, model, build_ds_config(train_args, 1), batches_per_epoch=[1]), config


def non_embedding_parameters(model) -> int:
    return sum(param.numel() for name, param in model.named_parameters() if "embed_" not in name)


def batch_counts(batch) -> tuple[int, int, int, int]:
    """Processed tokens, non-padding tokens, sequence tokens, and the summed visible context of the
    non-padding tokens (each token attends to position + 1 keys, packed or not: positions restart
    in every document and run on from the prompt in every answer)."""
    layout, inputs = batch.layout, batch.inputs
    if layout.row_index is not None:
        real, positions = layout.segment_ids >= 0, layout.position_ids
        sequence_tokens = int((layout.row_index >= 0).sum())
    else:
        real = inputs.attention_mask.bool()
        positions = inputs.attention_mask.cumsum(-1) - 1
        sequence_tokens = int(real.sum())
    context = int(((positions + 1) * real).sum())
    return inputs.input_ids.numel(), int(real.sum()), sequence_tokens, context


def rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run_mode(mode: str, args: argparse.Namespace, data, vocab: int, pad_token_id: int) -> dict:
    """One timed pass over the data in `mode`; runs in its own process."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from rlhf_reward.utils.data.collate import PairDataset
    from rlhf_reward.utils.runtime import join_process_group
    from torch.utils.data import DataLoader

    from step2_reward_model.objectives.preference import Preference
    from step2_reward_model.training import Placement, train_step

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    join_process_group(verbose=False)
    device = get_accelerator().device_name()
    baseline = rss_mib()
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's and the optimizer's start-up lines
        engine, config = build_engine(args, mode, vocab, pad_token_id)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dataset = PairDataset(data)
    sampler, collator, items = batching(mode, args, dataset, config, pad_token_id)
    loader = DataLoader(items, batch_sampler=sampler, collate_fn=collator, pin_memory=device == "cuda")

    objective, placement = Preference(loss_name=args.loss), Placement(0, 1, torch.device(device))

    def step(batch) -> list[float]:
        """main.py's training step, with the time after each phase (copy, forward, backward, step)."""
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(device)
            marks.append(time.perf_counter())

        train_step(engine, objective, batch, placement, stop_requested=False, mark=mark)
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
            "real_tokens_per_s": counts[1] / elapsed, "attention": config._attn_implementation,
            "arrangement": getattr(collator, "arrangement", None), "steps": steps,
            "real_share": counts[1] / counts[0], "tokens_per_pair": counts[0] / len(data),
            "step_ms": (phases / steps * 1000).tolist(), "peak_mib": peak, "baseline_mib": baseline,
            "flops_per_s": flops / elapsed, "parameters": sum(p.numel() for p in engine.module.parameters())}


def batching(mode: str, args: argparse.Namespace, dataset, config, pad_token_id: int):
    """The mode's batch sampler, collator and the data set the sampler indexes."""
    from rlhf_reward.utils.data.collate import PairCollator
    from rlhf_reward.utils.data.packing import arrangement_for, pad_multiple
    from rlhf_reward.utils.data.sampler import LengthGroupedBatches, TokenBudgetBatches, WithDenominator

    share = mode in ("shared", "packed")
    window = args.length_grouping_steps if mode in ("grouped", "shared", "packed") else 0
    if mode != "packed":
        pad_to = args.max_seq_len if mode == "max_len" else None
        collator = PairCollator(pad_token_id, share_prompt=share, pad_to=pad_to)
        return LengthGroupedBatches(dataset.lengths(share), args.batch_size, seed=0, window=window), collator, dataset
    attention = config._attn_implementation
    arrangement = args.packing if args.packing != "auto" else arrangement_for(attention)
    tokens = dataset.tokens(share_prompt=True)
    budget = args.max_tokens_per_batch or round(args.batch_size * tokens.mean())
    collator = PairCollator(pad_token_id, share_prompt=True, arrangement=arrangement,
                            pad_to_multiple_of=pad_multiple(attention))
    return TokenBudgetBatches(tokens, budget, seed=0, window=window), collator, WithDenominator(dataset)


def print_table(results: list[dict], peak_flops: float) -> None:
    header = (f"{'mode':<8} {'pairs/s':>8} {'seq tok/s':>10} {'real tok/s':>10} {'real %':>7} {'tok/pair':>9} "
              f"{'data ms':>8} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'peak MiB':>9} {'MFU %':>6}  attention")
    print(header)
    for row in results:
        data, forward, backward, optimizer = row["step_ms"]
        layout = f" ({row['arrangement']} rows)" if row["mode"] == "packed" else ""
        print(f"{row['mode']:<8} {row['pairs_per_s']:>8.2f} {row['seq_tokens_per_s']:>10.0f} "
              f"{row['real_tokens_per_s']:>10.0f} {100 * row['real_share']:>7.1f} {row['tokens_per_pair']:>9.1f} "
              f"{data:>8.1f} {forward:>8.1f} {backward:>8.1f} {optimizer:>8.1f} {row['peak_mib']:>9.0f} "
              f"{100 * row['flops_per_s'] / peak_flops:>6.1f}  {row['attention']}{layout}")
    by_mode = {row["mode"]: row for row in results}
    for best in ("packed", "shared"):
        if best in by_mode and len(by_mode) > 1:
            gains = [f"{by_mode[best]['pairs_per_s'] / row['pairs_per_s']:.2f}x {mode} "
                     f"({by_mode[best]['peak_mib'] / row['peak_mib']:.2f}x its peak memory)"
                     for mode, row in by_mode.items() if mode != best]
            print(f"{best} runs {', '.join(gains)}")
            break


def measure(args: argparse.Namespace, peak_flops: float) -> list[dict]:
    """Every mode of `args.modes` on the data and preset of `args`, each in a fresh process."""
    import torch

    data, vocab, pad_token_id, name = load_pairs(args)
    lengths = [len(p) + len(r) for p, responses in zip(data.prompts, data.responses, strict=True) for r in responses]
    preset = PRESETS[args.preset]
    print(f"data: {len(data)} pairs of {name}, {np.mean(lengths):.0f} tokens per sequence on average "
          f"(prompt {np.mean([len(p) for p in data.prompts]):.0f}, longest {max(lengths)}), BPE vocabulary {vocab}")
    print(f"setup: preset {args.preset} ({preset.get('arch', 'opt')}, {preset['layers']} layers, hidden "
          f"{preset['hidden']}), {args.batch_size} pairs per step, max_seq_len {args.max_seq_len}, {args.dtype}, "
          f"ZeRO {args.zero_stage}{', gradient checkpointing' if args.gradient_checkpointing else ''}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak_flops / 1e9:.1f} GFLOP/s", flush=True)
    # Each mode in a process of its own (its own peak memory), forked from a server that has imported
    # torch and transformers once rather than importing them again for every mode.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers.modeling_utils"])
    results = []
    for mode in args.modes:
        with context.Pool(1) as pool:
            results.append(pool.apply(run_mode, (mode, args, data, vocab, pad_token_id)))
    print(f"model: {results[0]['parameters'] / 1e6:.1f} M parameters; CPU peak memory includes "
          f"{results[0]['baseline_mib']:.0f} MiB of libraries before the model")
    print_table(results, peak_flops)
    return results


def gpu_table(args: argparse.Namespace, peak_flops: float) -> list[dict]:
    """The GPU presets at every length and length mix (bf16, gradient checkpointing, synthetic
    data; fewer pairs at longer lengths), then one summary table and the issue's goals."""
    rows = []
    for preset in args.table_presets:
        for length in args.table_lengths:
            for mix in args.table_mixes:
                config = argparse.Namespace(**{**vars(args), "preset": preset, "max_seq_len": length, "lengths": mix,
                                               "data_path": "synthetic", "modes": list(GPU_TABLE_MODES),
                                               "pairs": max(32, args.pairs * 512 // length)})
                print(f"\n== {preset}, max_seq_len {length}, {mix} lengths", flush=True)
                rows += [{**row, "preset": preset, "max_seq_len": length, "lengths": mix}
                         for row in measure(config, peak_flops)]
    print(f"\n{'preset':<9} {'len':>5} {'mix':<9} {'mode':<8} {'pairs/s':>8} {'real tok/s':>10} {'MFU %':>6} "
          f"{'peak GiB':>8}")
    for row in rows:
        print(f"{row['preset']:<9} {row['max_seq_len']:>5} {row['lengths']:<9} {row['mode']:<8} "
              f"{row['pairs_per_s']:>8.2f} {row['real_tokens_per_s']:>10.0f} "
              f"{100 * row['flops_per_s'] / peak_flops:>6.1f} {row['peak_mib'] / 1024:>8.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gpu_table:
        args.dtype, args.gradient_checkpointing = "bf16", True
    peak_flops = matmul_peak(device, args.dtype)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    results = gpu_table(args, peak_flops) if args.gpu_table else measure(args, peak_flops)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "matmul_peak_flops": peak_flops, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
