#!/usr/bin/env python
"""Does the reward pay for length? The baseline reward model against ODIN's quality head (`--length_head`)
on preference data where length is confounded with preference.

    python benchmarks/length.py                          # synthetic: a tiny model, about 10 minutes on 2 cores
    python benchmarks/length.py --seeds 3 --epochs 4
    python benchmarks/length.py -- --length_loss_coefficient 0.5   # flags after -- go to every run's main.py

Synthetic data (`make_length_confounded_pairs`): prompts whose better answer is decided by its content
(a right sum, the asked-for topic, politeness), padded with filler sentences that say nothing of quality.
In training the chosen answer is the longer one in --chosen_longer of the pairs; two held-out sets are
scored: one drawn as training is (`confounded`) and one where chosen and rejected are the longer answer
equally often (`balanced`), on which a reward that counts tokens is at chance.

Each method trains from the same tiny model (made once from the data's text) with the same seed, one
process per run as a user starts it (step2_reward_model/main.py), and is scored by rw_eval.py's own
path. Per method: accuracy on both held-out sets, the Pearson correlation of the reward with the answer's
length on the balanced set (and, for ODIN, of the length head), and the training loop's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from rlhf_reward.utils.data.synthetic import make_length_confounded_pairs, write_jsonl
from rlhf_reward.utils.files import REPO_ROOT
from rlhf_reward.utils.tiny import save_tiny_model

METHODS = {"baseline": [], "odin": ["--length_head"]}
EPOCH_LINE = re.compile(r"Epoch \d+/\d+ with loss \S+ \(\d+ steps in ([\d.]+) s")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="/tmp/length-benchmark", help="Where data, models and results go.")
    p.add_argument("--train_pairs", type=int, default=2000)
    p.add_argument("--eval_pairs", type=int, default=400)
    p.add_argument("--chosen_longer", type=float, default=0.75, help="Share of training pairs whose chosen answer "
                                                                     "is the longer one.")
    p.add_argument("--hidden", type=int, default=64, help="The tiny model's width.")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    return p.parse_args(argv), extra


def make_data(args: argparse.Namespace) -> dict[str, str]:
    """The training folder (its held-out file balanced) and the confounded held-out folder, and the tiny model."""
    train = make_length_confounded_pairs(args.train_pairs, 0, args.chosen_longer)
    folders = {name: os.path.join(args.output, "data", name) for name in ("balanced", "confounded")}
    for name, share in (("balanced", 0.5), ("confounded", args.chosen_longer)):
        write_jsonl(train, os.path.join(folders[name], "train.jsonl"))
        write_jsonl(make_length_confounded_pairs(args.eval_pairs, 1, share, held_out=True),
                    os.path.join(folders[name], "eval.jsonl"))
    folders["model"] = os.path.join(args.output, f"tiny-opt-{args.hidden}")
    if not os.path.isdir(folders["model"]):
        texts = [" ".join(row.values()) for row in train]
        save_tiny_model(folders["model"], texts, family="opt", hidden=args.hidden, layers=2)
    return folders


def train(args: argparse.Namespace, extra: list[str], folders: dict[str, str], method: str, seed: int) -> dict:
    """One training run; its held-out figures on both sets and the training loop's seconds."""
    out = os.path.join(args.output, "runs", method, str(seed))
    command = [sys.executable, "step2_reward_model/main.py", "--model_name_or_path", folders["model"],
               "--data_path", folders["balanced"], "--data_split", "0,1,0",
               "--data_output_path", os.path.join(args.output, "cache"), "--output_dir", out,
               "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "192",
               "--learning_rate", str(args.learning_rate), "--weight_decay", "0.1", "--num_warmup_steps", "20",
               "--num_train_epochs", str(args.epochs), "--loss", "end_token", "--dtype", "fp32",
               "--seed", str(seed), *METHODS[method], *extra]
    os.makedirs(out, exist_ok=True)
    started = time.time()
    with open(os.path.join(out, "training.log"), "w") as log:
        status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if status:
        raise SystemExit(f"{method} seed {seed} failed ({status}): see {out}/training.log")
    seconds = sum(float(m.group(1)) for m in EPOCH_LINE.finditer(open(os.path.join(out, "training.log")).read()))
    result = {"train_s": seconds or time.time() - started}
    for name in ("balanced", "confounded"):
        report = os.path.join(out, f"report_{name}.json")
        subprocess.run([sys.executable, "rw_eval.py", "--model_path", out, "--data_path", folders[name],
                        "--data_split", "0,1,0", "--data_output_path", os.path.join(args.output, "cache"),
                        "--report", report], cwd=REPO_ROOT, check=True, capture_output=True)
        held_out = json.load(open(report))["held_out"]
        result[f"{name}_accuracy"] = held_out["accuracy"]
        if name == "balanced":
            result["length_pearson"] = held_out.get("length/pearson")
            result["length_head_pearson"] = held_out.get("length/length_head_pearson")
    return result


def cell(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def table(results: dict[str, list[dict]]) -> str:
    columns = [("balanced acc", "balanced_accuracy", 3), ("confounded acc", "confounded_accuracy", 3),
               ("pearson(r, length)", "length_pearson", 3), ("pearson(r_L, length)", "length_head_pearson", 3),
               ("train s", "train_s", 1)]
    lines = ["| method | " + " | ".join(name for name, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, runs in results.items():
        lines.append(f"| {method} | " + " | ".join(cell([run[key] for run in runs], digits)
                                                   for _, key, digits in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    folders = make_data(args)
    results = {method: [train(args, extra, folders, method, 1234 + seed) for seed in range(args.seeds)]
               for method in args.methods}
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump({"settings": vars(args), "extra": extra, "results": results}, handle, indent=1)
    print(f"train pairs {args.train_pairs} (chosen longer in {args.chosen_longer:.0%}), held out {args.eval_pairs} "
          f"each, tiny OPT width {args.hidden}, {args.epochs} epochs, {args.seeds} seed(s)")
    print(table(results))


if __name__ == "__main__":
    main()
