"""Make everything the offline demo needs: a synthetic preference data set, a byte-level BPE
tokenizer trained on it, and a small randomly initialised OPT-architecture model."""

from __future__ import annotations

import argparse
import json
import os

from rlhf_reward.utils.data.synthetic import write_dataset
from rlhf_reward.utils.tiny import save_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", help="Folder for data/ and base_model/")
    parser.add_argument("--train_pairs", type=int, default=3000)
    parser.add_argument("--eval_pairs", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    data = os.path.join(args.workdir, "data")
    write_dataset(data, train=args.train_pairs, evaluation=args.eval_pairs)
    with open(os.path.join(data, "train.jsonl"), encoding="utf-8") as handle:
        texts = [" ".join(json.loads(line).values()) for line in handle]
    save_tiny_model(os.path.join(args.workdir, "base_model"), texts, family="opt",
                    hidden=args.hidden, layers=args.layers)
    print(f"demo data in {data}, base model in {os.path.join(args.workdir, 'base_model')}")


if __name__ == "__main__":
    main()
