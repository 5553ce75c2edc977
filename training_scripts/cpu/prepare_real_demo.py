"""Data for the real demo: HH-RLHF harmless pairs, from the hub when it is reachable, else from the
sample shipped in training_scripts/cpu/data, split once into train.jsonl and test.jsonl."""

from __future__ import annotations

import argparse
import os

from rlhf_reward.utils.data.pair_files import HH_HUB_ID, HH_SUBSET, hub_hh_pairs, read_pairs, write_split

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hh_rlhf_harmless_sample.jsonl.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="Where train.jsonl and test.jsonl go.")
    parser.add_argument("--train_pairs", type=int, default=400)
    parser.add_argument("--eval_pairs", type=int, default=200)
    args = parser.parse_args()
    rows = hub_hh_pairs(args.train_pairs + args.eval_pairs)
    source = f"the hub ({HH_HUB_ID}, {HH_SUBSET}, test split)"
    if rows is None:
        rows, source = read_pairs(SAMPLE), f"{SAMPLE} (the hub is not reachable)"
    # Shuffle 1: the demo's settings were chosen on pairs held out from shuffle 0 (docs/measurements.md).
    write_split(rows, args.train_pairs, args.eval_pairs, args.folder, seed=1)
    print(f"{args.train_pairs} training and {args.eval_pairs} held-out HH-RLHF pairs from {source} in {args.folder}")


if __name__ == "__main__":
    main()
