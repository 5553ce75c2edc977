#!/usr/bin/env python
"""Score prompt/answer pairs with a reward model saved by step 2.

    python rw_eval.py --model_path OUTPUT
    python rw_eval.py --model_path OUTPUT --prompt "..." --chosen "..." --rejected "..."

Texts are tokenised exactly as in training (prompt, then answer + end-of-conversation token) and
scored at the last real token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from step2_reward_model.checkpoint import META_NAME
from step2_reward_model.model import load_reward_model
from utils.data.collate import PairCollator, PairDataset
from utils.data.examples import Example
from utils.data.tokenize import tokenize_examples
from utils.errors import UserError
from utils.utils import END_OF_CONVERSATION_TOKEN

BUILT_IN_EXAMPLES = [
    {"prompt": "Human: In a few sentences, what is a compiler? Assistant: ",
     "chosen": "A compiler is a program that translates source code written in a language such as C "
               "into machine code that a processor can run. It checks the program for errors and "
               "often optimises it so that it runs faster.",
     "rejected": "Compilers. Human: What is your favourite colour? Assistant:"},
    {"prompt": "Human: Why do leaves change colour in autumn? Assistant: ",
     "chosen": "As days get shorter, trees stop making chlorophyll, the green pigment. As it fades, "
               "yellow and orange pigments that were there all along show through, and some trees "
               "make red pigments as well.",
     "rejected": "I don't know. Leaves are leaves."},
]


def load_meta(model_path: str) -> dict:
    path = os.path.join(model_path, META_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@torch.no_grad()
def score_answers(model, tokenizer, prompt: str, answers: list[str], max_seq_len: int,
                  end_of_conversation_token: str) -> list[float]:
    """The reward of each answer to `prompt`, tokenised and truncated as in training."""
    example = Example(prompt=prompt, responses=answers, source="cli")
    tokenized = tokenize_examples([example], tokenizer, max_seq_len, end_of_conversation_token)
    if not len(tokenized):
        raise UserError(f"an answer is longer than --max_seq_len {max_seq_len} tokens")
    batch = PairCollator(tokenizer.pad_token_id)([PairDataset(tokenized)[0]])
    return model.forward_value(batch["input_ids"], batch["attention_mask"])["chosen_end_scores"].tolist()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score prompt/answer pairs with a saved reward model.")
    parser.add_argument("--model_path", required=True, help="A step-2 output folder.")
    parser.add_argument("--prompt", help="Score this prompt's --chosen and --rejected answers.")
    parser.add_argument("--chosen", help="The answer that should score higher.")
    parser.add_argument("--rejected", help="The answer that should score lower.")
    parser.add_argument("--max_seq_len", type=int, default=None, help="Default: the training length.")
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="Accepted for compatibility; the scored token comes from the attention mask.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the checkpoint.")
    args = parser.parse_args(argv)
    given = [name for name in ("prompt", "chosen", "rejected") if getattr(args, name) is not None]
    if given and len(given) != 3:
        parser.error("--prompt, --chosen and --rejected go together")
    return args


def run(args: argparse.Namespace) -> None:
    model = load_reward_model(args.model_path, trust_remote_code=args.trust_remote_code)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    meta = load_meta(args.model_path)
    max_seq_len = args.max_seq_len or meta.get("max_seq_len", 512)
    eot = meta.get("end_of_conversation_token", END_OF_CONVERSATION_TOKEN)
    pairs = [vars(args)] if args.prompt is not None else BUILT_IN_EXAMPLES
    for pair in pairs:
        chosen, rejected = score_answers(model, tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]],
                                         max_seq_len, eot)
        print("==================Eval result============================")
        print(f"prompt: {pair['prompt']!r}")
        print(f"chosen: {pair['chosen']!r}\n  reward: {chosen:.4f}")
        print(f"rejected: {pair['rejected']!r}\n  reward: {rejected:.4f}")
        print(f"preferred: {'chosen' if chosen > rejected else 'rejected'} (margin {chosen - rejected:+.4f})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
