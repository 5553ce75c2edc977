"""TRL's RewardTrainer on the quality benchmark's data, for the side-by-side in benchmarks/quality.py.

It runs in its own virtualenv (TRL pins its own transformers and accelerate), which quality.py
makes; it imports nothing of this project. It trains as a TRL user would (AutoModelForSequence-
Classification with one label, TRL's tokenization and collator, TRL's dropout default), with the
settings quality.py passes, then scores the held-out pairs with the trained model through TRL's
own tokenization and collator, and writes one JSON object: training time, pairs trained, peak
memory and the held-out scores of every pair.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="JSONL of {prompt, chosen, rejected}")
    p.add_argument("--eval", required=True, help="JSONL of {prompt, chosen, rejected}")
    p.add_argument("--output", required=True, help="Where the JSON result goes.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--gradient_checkpointing", action="store_true")
    return p.parse_args()


@torch.no_grad()
def held_out_scores(trainer: RewardTrainer, batch: int) -> tuple[list[float], list[float]]:
    """Chosen and rejected rewards of every held-out pair, tokenised and collated as TRL trains."""
    model = trainer.model.eval()
    dataset = trainer.eval_dataset
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch):
        examples = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        inputs = trainer.data_collator(examples)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
        first, second = torch.chunk(logits.float(), 2)
        chosen += first.tolist()
        rejected += second.tolist()
    return chosen, rejected


def main() -> None:
    args = parse_args()
    data = load_dataset("json", data_files={"train": args.train, "eval": args.eval})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.eos_token is None:  # BERT: TRL appends an eos to every text; [SEP] ends a BERT text
        tokenizer.eos_token = tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        config = RewardConfig(
            output_dir=scratch, seed=args.seed, per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.batch, learning_rate=args.learning_rate,
            num_train_epochs=args.epochs, lr_scheduler_type=args.scheduler, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, max_length=args.max_length, bf16=False, fp16=False, use_cpu=True,
            gradient_checkpointing=args.gradient_checkpointing, save_strategy="no", eval_strategy="no",
            report_to="none", logging_steps=10, dataloader_num_workers=0)
        trainer = RewardTrainer(model=model, args=config, processing_class=tokenizer,
                                train_dataset=data["train"], eval_dataset=data["eval"])
        started = time.time()
        metrics = trainer.train().metrics
        train_seconds = time.time() - started
        chosen, rejected = held_out_scores(trainer, args.batch)
    result = {"train_seconds": train_seconds, "train_runtime": metrics.get("train_runtime"),
              "train_pairs": len(trainer.train_dataset), "steps": trainer.state.global_step,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "chosen": chosen, "rejected": rejected}
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
