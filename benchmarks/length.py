#!/usr/bin/env python
"""Does the reward pay for length? The baseline reward model, ODIN's quality head (`--length_head`) and the
baseline with a post-hoc length calibration (`export.py --length_calibration`), on preference data where
length is confounded with preference, and on real pairs.

    python benchmarks/length.py                          # synthetic: a tiny model, about 10 minutes on 2 cores
    python benchmarks/length.py --seeds 3 --chosen_longer 0.75
    python benchmarks/length.py --data hh                # the HH-RLHF sample, MiniLM-L6 as the quality benchmark
    python benchmarks/length.py --odin_length_loss 0.3 -- --orthogonality_loss_coefficient 0.5   # after --: main.py

Synthetic data (`make_length_confounded_pairs`): prompts whose better answer is decided by its content
(a right sum, the asked-for topic, politeness), padded with filler sentences that say nothing of quality:
up to --shared_filler after both answers, 1 or 2 more after one of them, the chosen one in
--chosen_longer of the training pairs. Two held-out sets are
scored: one drawn as training is (`confounded`) and one where chosen and rejected are the longer answer
equally often (`balanced`), on which a reward that counts tokens is at chance. The calibration is fitted
on a third set drawn as training is (its labels are not used: the fit reads rewards and lengths only).

Real data (`--data hh`): the quality benchmark's split of the HH-RLHF harmless sample (400 pairs to train
on, 400 held out), backbone and settings (benchmarks/quality.py: 8 pairs per step, 1 epoch, cosine,
fp32, dropout off, the backbone's learning rate). The calibration is fitted on the held-out answers
themselves, which needs no labels, as the paper does on the benchmarks it reports.

Each method trains from the same model with the same seed, one process per run as a user starts it
(step2_reward_model/main.py; the calibrated method is the baseline's model, exported again), and is
scored by rw_eval.py's own path. Per method: accuracy on each held-out set and its balanced accuracy
(the mean of the accuracies on pairs whose chosen answer is the longer and the shorter one), the
Pearson correlation of the reward with the answer's length (and, for ODIN, of the length head), and
the training loop's wall time (for the calibrated method, plus the export's).
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

from rlhf_reward.utils.data.synthetic import kind_of, make_length_confounded_pairs, write_jsonl
from rlhf_reward.utils.files import REPO_ROOT
from rlhf_reward.utils.tiny import save_tiny_model

METHODS = {"baseline": [], "odin": ["--length_head"], "calibrated": None}  # None: the baseline, calibrated
EPOCH_LINE = re.compile(r"Epoch \d+/\d+ with loss \S+ \(\d+ steps in ([\d.]+) s")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["synthetic", "hh"], default="synthetic")
    p.add_argument("--output", default=None, help="Where data, models and results go (default /tmp/length-DATA).")
    p.add_argument("--train_pairs", type=int, default=None, help="Default: 2000 synthetic, 400 hh.")
    p.add_argument("--eval_pairs", type=int, default=400)
    p.add_argument("--chosen_longer", type=float, default=0.9, help="Share of synthetic training pairs whose "
                                                                     "chosen answer is the longer one.")
    p.add_argument("--shared_filler", type=int, default=8, help="Synthetic: up to this many filler sentences "
                                                                "after both answers of a pair.")
    p.add_argument("--hidden", type=int, default=128, help="The tiny model's width (synthetic).")
    p.add_argument("--backbone", default="minilm", help="hh: smollm2 | minilm | a model folder.")
    p.add_argument("--epochs", type=int, default=None, help="Default: 4 synthetic, 1 hh.")
    p.add_argument("--learning_rate", type=float, default=None, help="Default: 1e-3 synthetic, the backbone's hh.")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--odin_length_loss", type=float, nargs="+", default=[1.0, 0.1],
                   help="ODIN's --length_loss_coefficient: one ODIN run per value.")
    args = p.parse_args(argv)
    if "calibrated" in args.methods and "baseline" not in args.methods:
        p.error("the calibrated method calibrates the baseline: --methods needs baseline too")
    hh = args.data == "hh"
    args.output = args.output or f"/tmp/length-{args.data}"
    args.train_pairs = args.train_pairs or (400 if hh else 2000)
    args.epochs = args.epochs or (1 if hh else 4)
    return args, extra


def make_data(args: argparse.Namespace) -> dict[str, str]:
    """Folders: `train` (the training data), the held-out sets to score (`held_out`: name -> folder, each
    scored on its eval.jsonl), `calibration` (the data the calibration is fitted on) and `model`."""
    if args.data == "hh":
        from rlhf_reward.benchmarks.quality import SHARED_HH, SHIPPED_HH
        from rlhf_reward.utils.data.pair_files import read_pairs, write_split
        from rlhf_reward.utils.pretrained import BACKBONES, fetch

        data = os.path.abspath(os.path.join(args.output, "data"))
        write_split(read_pairs(SHARED_HH if os.path.exists(SHARED_HH) else SHIPPED_HH), args.train_pairs,
                    args.eval_pairs, data)
        known = BACKBONES.get(args.backbone)
        args.learning_rate = args.learning_rate or (known.learning_rate if known else 1e-5)
        return {"train": data, "held_out": {"held_out": data}, "calibration": data,
                "model": fetch(args.backbone) if known else args.backbone}
    args.learning_rate = args.learning_rate or 1e-3
    train = make_length_confounded_pairs(args.train_pairs, 0, args.chosen_longer, shared=args.shared_filler)
    drawn = {"balanced": (1, 0.5), "confounded": (1, args.chosen_longer), "calibration": (2, args.chosen_longer)}
    folders = {name: os.path.join(args.output, "data", name) for name in drawn}
    for name, (seed, share) in drawn.items():
        write_jsonl(train, os.path.join(folders[name], "train.jsonl"))
        rows = make_length_confounded_pairs(args.eval_pairs, seed, share, held_out=True, shared=args.shared_filler)
        write_jsonl(rows, os.path.join(folders[name], "eval.jsonl"))
    model = os.path.join(args.output, f"tiny-opt-{args.hidden}")
    if not os.path.isdir(model):
        save_tiny_model(model, [" ".join(row.values()) for row in train], family="opt", hidden=args.hidden, layers=2)
    return {"train": folders["balanced"], "held_out": {name: folders[name] for name in ("balanced", "confounded")},
            "calibration": folders["calibration"], "model": model}


def settings(args: argparse.Namespace) -> list[str]:
    """main.py's flags besides data, model, output and seed: the quality benchmark's for real data."""
    if args.data == "hh":
        return ["--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_seq_len", "512",
                "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine",
                "--num_warmup_steps", "0", "--weight_decay", "0", "--dropout", "0.0", "--eval_iters", "100000",
                "--no_hf_export", "--num_train_epochs", str(args.epochs), "--loss", "end_token", "--dtype", "fp32"]
    return ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "256",
            "--learning_rate", str(args.learning_rate), "--weight_decay", "0.1", "--num_warmup_steps", "20",
            "--num_train_epochs", str(args.epochs), "--loss", "end_token", "--dtype", "fp32"]


def run(command: list[str], log_path: str, what: str) -> str:
    """Run a command with its output in `log_path`; the output."""
    with open(log_path, "w") as log:
        status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    text = open(log_path).read()
    if status:
        raise SystemExit(f"{what} failed ({status}): see {log_path}")
    return text


def runs(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Each run's name -> (its method, its own main.py flags): ODIN once per length-loss coefficient."""
    named = {}
    for method in args.methods:
        if method == "odin":
            named.update({f"odin λ_L={value:g}": (method, ["--length_loss_coefficient", f"{value:g}"])
                          for value in args.odin_length_loss})
        else:
            named[method] = (method, [])
    return named


def train(args: argparse.Namespace, extra: list[str], folders: dict, name: str, method: str, flags: list[str],
          seed: int) -> dict:
    """One run: trained (or, for the calibrated method, the baseline's model calibrated), then scored on
    every held-out set; with the training loop's seconds (plus the export's)."""
    out = os.path.join(args.output, "runs", name.replace(" ", "_"), str(seed))
    cache = os.path.join(args.output, "cache")
    if METHODS[method] is None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(args.output, "runs", "baseline", str(seed)), out)
        started = time.time()
        run([sys.executable, "step2_reward_model/export.py", out, "--length_calibration", "--data_path",
             folders["calibration"], "--data_split", "0,1,0", "--data_output_path", cache],
            os.path.join(out, "export.log"), f"calibrating seed {seed}")
        seconds = json.load(open(os.path.join(out, "result.json")))["train_s"] + time.time() - started
    else:
        os.makedirs(out, exist_ok=True)
        started = time.time()
        text = run([sys.executable, "step2_reward_model/main.py", "--model_name_or_path", folders["model"],
                    "--data_path", folders["train"], "--data_split", "0,1,0", "--data_output_path", cache,
                    "--output_dir", out, "--seed", str(seed), *settings(args), *METHODS[method], *flags, *extra],
                   os.path.join(out, "training.log"), f"{name} seed {seed}")
        seconds = sum(float(m.group(1)) for m in EPOCH_LINE.finditer(text)) or time.time() - started
    result = {"train_s": seconds}
    for name, folder in folders["held_out"].items():
        report = os.path.join(out, f"report_{name}.json")
        subprocess.run([sys.executable, "rw_eval.py", "--model_path", out, "--data_path", folder,
                        "--data_split", "0,1,0", "--data_output_path", cache, "--report", report],
                       cwd=REPO_ROOT, check=True, capture_output=True)
        held_out = json.load(open(report))["held_out"]
        result[f"{name}/accuracy"] = held_out["accuracy"]
        for key in ("balanced_accuracy", "pearson", "length_head_pearson"):
            result[f"{name}/{key}"] = held_out.get(f"length/{key}")
    if args.data == "synthetic":
        result["kinds"] = accuracy_by_kind(out, folders["held_out"]["balanced"])
    with open(os.path.join(out, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def accuracy_by_kind(out: str, folder: str) -> dict[str, float]:
    """Accuracy on the balanced held-out pairs of each kind, apart for the chosen answer longer and shorter:
    where a method's balanced accuracy comes from (a kind the model cannot learn is at chance either way)."""
    from step2_reward_model.scoring import load_scorer

    rows = [json.loads(line) for line in open(os.path.join(folder, "eval.jsonl"))]
    scorer = load_scorer(out, device="cpu")
    prompts = [row["prompt"] for row in rows]
    chosen, rejected = (scorer.score_ids(scorer.encode_pairs(prompts, [row[key] for row in rows]))
                        for key in ("chosen", "rejected"))
    right: dict[str, list[bool]] = {}
    for index, (row, good, bad) in enumerate(zip(rows, chosen, rejected, strict=True)):
        longer = "longer" if len(row["chosen"]) > len(row["rejected"]) else "shorter"
        right.setdefault(f"{kind_of(index)}, chosen {longer}", []).append(good > bad)
    return {name: sum(values) / len(values) for name, values in sorted(right.items())}


def cell(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def table(args: argparse.Namespace, results: dict[str, list[dict]]) -> str:
    """Markdown, one row per method: balanced accuracy, overall accuracy, correlation with length, time."""
    if args.data == "hh":
        columns = [("balanced acc", "held_out/balanced_accuracy", 3), ("accuracy", "held_out/accuracy", 3),
                   ("pearson(r, length)", "held_out/pearson", 3),
                   ("pearson(r_L, length)", "held_out/length_head_pearson", 3), ("train s", "train_s", 1)]
    else:
        columns = [("balanced acc", "balanced/accuracy", 3), ("confounded acc", "confounded/accuracy", 3),
                   ("pearson(r, length), balanced", "balanced/pearson", 3),
                   ("pearson(r_L, length)", "balanced/length_head_pearson", 3), ("train s", "train_s", 1)]
    lines = ["| method | " + " | ".join(name for name, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, runs in results.items():
        lines.append(f"| {method} | " + " | ".join(cell([run[key] for run in runs], digits)
                                                   for _, key, digits in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    folders = make_data(args)
    seeds = range(1234, 1234 + args.seeds)
    results = {name: [train(args, extra, folders, name, method, flags, seed) for seed in seeds]
               for name, (method, flags) in runs(args).items()}
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump({"settings": vars(args), "extra": extra, "results": results}, handle, indent=1)
    if args.data == "hh":
        print(f"HH-RLHF harmless sample: {args.train_pairs} training pairs, {args.eval_pairs} held out, "
              f"{folders['model']}, lr {args.learning_rate:g}, {args.epochs} epoch(s), {args.seeds} seed(s)")
    else:
        print(f"train pairs {args.train_pairs} (chosen longer in {args.chosen_longer:.0%}), held out "
              f"{args.eval_pairs} each, tiny OPT width {args.hidden}, {args.epochs} epochs, {args.seeds} seed(s)")
    print(table(args, results))
    if args.data == "synthetic":
        kinds = list(next(iter(results.values()))[0]["kinds"])
        print("\nbalanced held-out accuracy by kind of pair:\n| method | " + " | ".join(kinds) + " |\n"
              + "|---" * (len(kinds) + 1) + "|")
        for name, seeded in results.items():
            print(f"| {name} | " + " | ".join(cell([run["kinds"][kind] for run in seeded], 2) for kind in kinds) + " |")


if __name__ == "__main__":
    main()
