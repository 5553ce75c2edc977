"""Held-out evaluation during training: the objective's metrics on the held-out table
(`step2_reward_model/heldout.py`), public benchmarks scored at the same points, and their log.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from rlhf_reward.utils.runtime import print_rank_0
from torch.utils.data import DataLoader

from step2_reward_model.heldout import batch_rows, held_out_table
from step2_reward_model.objectives.base import Objective
from step2_reward_model.public_benchmarks import BENCHMARKS, encode_items, per_item, read_items
from step2_reward_model.scoring import Encoded, Scorer


@dataclass
class Evaluation:
    metrics: dict
    table: np.ndarray  # the held-out table the metrics come from, for the reward statistics


def inference(engine):
    """Inference mode, except under ZeRO-3: the parameters it gathers in evaluation can stay
    gathered into training, where autograd refuses tensors made in inference mode."""
    return torch.inference_mode(engine.zero_optimization_stage() != 3)


def evaluate(engine, objective: Objective, loader: DataLoader, eval_iters: int, device: torch.device,
             source_names: list[str]) -> Evaluation:
    """The objective's held-out metrics, each example counted once across ranks."""
    engine.eval()
    with inference(engine):
        local = batch_rows(lambda batch: engine(batch.inputs, batch.layout), objective, engine.module, loader,
                           device, limit=eval_iters)
    engine.train()
    table = held_out_table(local)
    return Evaluation(objective.summarize(table, source_names), table)


def log_metrics(objective: Objective, label: str, metrics: dict, writer, step: int) -> None:
    """Print an evaluation's metrics (rank 0) and add them to TensorBoard."""
    for line in objective.log_lines(label, metrics):
        print_rank_0(line)
    if writer:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
        writer.flush()


class BenchmarkEval:
    """A public benchmark scored at every evaluation point (`--eval_benchmark NAME[:PATH]`): its
    sequences are encoded once; each rank scores every world_size-th one, in as many batches as
    the others (ZeRO-3 forwards are collective), and the rewards are gathered on every rank."""

    def __init__(self, spec: str, tokenizer, max_seq_len: int, end_text: str, batch_size: int):
        self.name, _, path = spec.partition(":")
        self.items = read_items(self.name, path or None)
        self.scorer = Scorer(None, tokenizer, max_seq_len, end_text, batch_size=batch_size)
        self.sequences = encode_items(self.scorer, self.items).sequences

    def rewards(self, engine, device: torch.device) -> np.ndarray:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        per_rank = -(-len(self.sequences) // world_size)  # so every rank runs as many batches
        mine = [(rank + k * world_size) % len(self.sequences) for k in range(per_rank)]
        scorer = replace(self.scorer, model=engine.module, device=device, grad_mode=partial(inference, engine))
        engine.eval()
        rewards = scorer.score_ids(Encoded([self.sequences[i] for i in mine]))
        local = torch.tensor(rewards, dtype=torch.float64, device=device)
        engine.train()
        gathered = [torch.zeros_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local)
        by_position = torch.stack(gathered, 1).flatten().cpu().numpy()  # position k * world_size + rank
        return by_position[:len(self.sequences)]

    def evaluate(self, engine, device: torch.device) -> dict[str, float]:
        """The benchmark's score and section (or subset) scores, as `benchmark/NAME/...` metrics."""
        benchmark = BENCHMARKS[self.name]
        result = benchmark.score(self.items, per_item(self.items, self.rewards(engine, device)))
        metrics = {"score": result["score"], **result[benchmark.parts]}
        return {f"benchmark/{self.name}/{key}": value for key, value in metrics.items() if value is not None}
