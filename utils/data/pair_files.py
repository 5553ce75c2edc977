"""Preference pairs as files: read a JSONL sample, write a fixed train / held-out split of it.

The real demo and the quality benchmark train on a folder of `train.jsonl` and `test.jsonl`
(`--data_split 0,1,0`: every training row goes to the reward model, the test rows are held out),
cut from one shuffle with its own seed, so that every run and every trainer sees the same sets.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re

from rlhf_reward.utils.data.adapters import split_hh_dialogue
from rlhf_reward.utils.errors import UserError

HH_HUB_ID = "Anthropic/hh-rlhf"
HH_SUBSET = "harmless-base"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def read_pairs(path: str) -> list[dict]:
    """{prompt, chosen, rejected} rows of a JSONL(.gz) file; Anthropic HH rows (two whole
    dialogues) are split at their last shared assistant turn, as the training pipeline does."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row if "prompt" in row else split_hh_dialogue(row["chosen"], row["rejected"]) for row in rows]


def as_chat(pair: dict) -> dict:
    """An HH text pair as chat messages (Human -> user, Assistant -> assistant), so that a model
    with a chat template reads the dialogue in its own format."""
    turns = HH_TURN.split(pair["prompt"])[1:]
    prompt = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
              for who, text in zip(turns[::2], turns[1::2], strict=True)]
    if not prompt or prompt[-1] != {"role": "assistant", "content": ""}:
        raise UserError(f"not an HH dialogue ending with an empty Assistant turn: {pair['prompt'][-80:]!r}")
    return {"prompt": prompt[:-1], **{key: [{"role": "assistant", "content": pair[key].strip()}]
                                      for key in ("chosen", "rejected")}}


def hub_hh_pairs(count: int) -> list[dict] | None:
    """The first `count` pairs of HH-RLHF's harmless-base test split from the hub, or None when the
    hub cannot be reached (offline mode, or no connection within a few seconds)."""
    import socket

    if any(os.environ.get(name, "0") not in ("0", "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return None
    from datasets import load_dataset

    try:
        rows = load_dataset(HH_HUB_ID, data_dir=HH_SUBSET, split=f"test[:{count}]")
    except Exception:  # noqa: BLE001 - any hub failure falls back to the shipped sample
        return None
    return [split_hh_dialogue(row["chosen"], row["rejected"]) for row in rows]


def write_split(rows: list[dict], train: int, held_out: int, folder: str, seed: int = 0) -> tuple[str, str]:
    """`train` rows into folder/train.jsonl and the next `held_out` into folder/test.jsonl, from one
    seeded shuffle; returns the two paths."""
    if train + held_out > len(rows):
        raise UserError(f"{train} training + {held_out} held-out pairs exceed the {len(rows)} pairs of the data")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, part in (("train", order[:train]), ("test", order[train:train + held_out])):
        paths.append(os.path.join(folder, f"{name}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8") as handle:
            for index in part:
                handle.write(json.dumps({key: rows[index][key] for key in ("prompt", "chosen", "rejected")}) + "\n")
    return paths[0], paths[1]
