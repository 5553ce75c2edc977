"""Held-out evaluation during training, each prompt (or solution) counted once across ranks, and its log.

Every rank scores its shard (`EvalShard` pads the shards to equal length with repeats flagged
`is_real`), the rows are gathered on every rank, and the metrics are computed once from the
whole table: so accuracies are exact, not averages of per-rank averages, and the rows feed the
reward statistics saved beside the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from step2_reward_model.losses import combined_labels
from step2_reward_model.metrics import ranking_accuracies, ranking_metrics, step_metrics
from step2_reward_model.public_benchmarks import BENCHMARKS, encode_items, per_item, read_items
from step2_reward_model.report import attribute_report
from step2_reward_model.scoring import Scorer
from utils.runtime import print_rank_0, to_device

STEP_SUMS = ("steps", "steps_correct", "solutions", "solutions_correct", "first_error_correct")


def worst_rows(rows: np.ndarray) -> np.ndarray:
    """The rows of each prompt's worst rank, from (score, prompt, rank, source) rows."""
    _, prompt = np.unique(rows[:, 1], return_inverse=True)
    worst = np.full(prompt.max() + 1 if len(prompt) else 0, -np.inf)
    np.maximum.at(worst, prompt, rows[:, 2])
    return rows[rows[:, 2] == worst[prompt]]


def best_worst_margins(rows: np.ndarray) -> np.ndarray:
    """Per prompt, the mean score of its best rank minus that of its worst, from (score, prompt,
    rank, source) rows: the margin of each pair, whatever order the rows come in."""
    _, prompt = np.unique(rows[:, 1], return_inverse=True)
    count = prompt.max() + 1 if len(prompt) else 0
    best, worst = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(best, prompt, rows[:, 2])
    np.maximum.at(worst, prompt, rows[:, 2])

    def mean_score(members: np.ndarray) -> np.ndarray:
        return np.bincount(prompt[members], rows[members, 0], count) / np.bincount(prompt[members], minlength=count)

    return mean_score(rows[:, 2] == best[prompt]) - mean_score(rows[:, 2] == worst[prompt])


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (their counts may differ: ranked lists vary in length), on every rank."""
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, local.shape[1]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:int(c)] for rows, c in zip(gathered, counts, strict=True)]).cpu()


def inference(engine):
    """Inference mode, except under ZeRO-3: the parameters it gathers in evaluation can stay
    gathered into training, where autograd refuses tensors made in inference mode."""
    return torch.inference_mode(engine.zero_optimization_stage() != 3)


def evaluate(engine, loader: DataLoader, eval_iters: int, device: torch.device,
             source_names: list[str]) -> dict:
    """Accuracy over every ordered pair of responses (ties in score count half), top-1 accuracy for
    lists of three or more, per-source accuracy and mean best / worst scores; each prompt counted
    once across ranks. `rows` keeps (score, prompt, rank, source) for the reward statistics.
    Scores stay on the device until the end: no copy to the host per batch."""
    engine.eval()
    scores, rows, seen = [], [], 0
    for step, batch in enumerate(loader):
        if step == eval_iters:
            break
        real, source = batch.pop("is_real"), batch.pop("source")
        with inference(engine):
            scores.append(engine(**to_device(batch, device))["scores"].double())
        group = batch["group"]
        rows.append(torch.stack([(group + seen).double(), batch["rank"].double(), source[group].double(),
                                 real[group].double()], 1))
        seen += len(real)
    local = torch.zeros((0, 5), dtype=torch.float64, device=device)
    if rows:
        local = torch.cat([torch.cat(scores)[:, None], torch.cat(rows).to(device)], 1)
    local[:, 1] += dist.get_rank() * 2.0 ** 32  # prompt ids unique across ranks
    table = gather_rows(local)
    engine.train()
    table = table[table[:, 4] > 0, :4]
    return {**ranking_summary(table, source_names), "rows": table.numpy()}


def ranking_summary(table: torch.Tensor, source_names: list[str]) -> dict:
    """The metrics of (score, prompt, rank, source) rows, overall and per source."""
    scores, rank, source = table[:, 0], table[:, 2].long(), table[:, 3].long()
    prompt = torch.unique(table[:, 1], return_inverse=True)[1]
    metrics = ranking_metrics(scores, prompt, rank)
    accuracies = ranking_accuracies(metrics)
    best_scores, worst_scores = scores[rank == 0], torch.from_numpy(worst_rows(table.numpy())[:, 0])
    summary = {"accuracy": accuracies["pairwise_accuracy"] or 0.0,
               "chosen": best_scores.mean().item() if len(best_scores) else 0.0,
               "rejected": worst_scores.mean().item() if len(worst_scores) else 0.0,
               "pairs": len(torch.unique(prompt)), "ordered_pairs": int(metrics["pairs"])}
    summary["difference"] = summary["chosen"] - summary["rejected"]
    if accuracies["top1_accuracy"] is not None and bool((torch.bincount(prompt) > 2).any()):
        summary["top1_accuracy"] = accuracies["top1_accuracy"]
    sources = torch.unique(source)
    if len(sources) > 1:
        for value in sources.tolist():
            part = source == value
            counts = ranking_metrics(scores[part], torch.unique(prompt[part], return_inverse=True)[1], rank[part])
            accuracy = ranking_accuracies(counts)["pairwise_accuracy"]
            if accuracy is not None:
                summary[f"accuracy/{source_names[value]}"] = accuracy
    return summary


def evaluate_steps(engine, loader: DataLoader, eval_iters: int, device: torch.device) -> dict:
    """A process reward model's step, first-error and solution accuracy, each solution counted once
    across ranks; `rows` keeps (logit, label) of every labelled step for the reward statistics."""
    engine.eval()
    totals = torch.zeros(len(STEP_SUMS), dtype=torch.float64, device=device)
    rows = []
    for step, batch in enumerate(loader):
        if step == eval_iters:
            break
        real = batch.pop("is_real")
        batch["step_mask"] &= real[batch["step_rows"]]  # repeats that pad the last shard count nothing
        batch = to_device(batch, device)
        with inference(engine):
            logits = engine(**batch)["step_logits"].float()
        sums = step_metrics(logits, batch["step_labels"], batch["step_mask"], batch["step_rows"], len(real))
        totals += torch.stack([sums[name] for name in STEP_SUMS])
        rows.append(torch.stack([logits, batch["step_labels"].float()], 1)[batch["step_mask"]].double())
    dist.all_reduce(totals)
    table = gather_rows(torch.cat(rows) if rows else torch.zeros((0, 2), dtype=torch.float64, device=device))
    engine.train()
    sums = dict(zip(STEP_SUMS, totals.tolist(), strict=True))
    steps, solutions = max(sums["steps"], 1.0), max(sums["solutions"], 1.0)
    return {"accuracy": sums["steps_correct"] / steps, "first_error_accuracy": sums["first_error_correct"] / solutions,
            "solution_accuracy": sums["solutions_correct"] / solutions, "steps": sums["steps"],
            "solutions": sums["solutions"], "rows": table.numpy()}


def evaluate_attributes(engine, loader: DataLoader, eval_iters: int, device: torch.device,
                        names: list[str]) -> dict:
    """A multi-attribute model's MSE, Pearson and Spearman per attribute on held-out rated responses,
    and the pairwise accuracy of its reward (`report.attribute_report`), each prompt counted once
    across ranks. `rows` keeps (reward, prompt, combined label, predictions..., labels...) of every
    response, in the model's (scaled) units."""
    engine.eval()
    weights = engine.module.attribute_weights
    rows, seen = [], 0
    for step, batch in enumerate(loader):
        if step == eval_iters:
            break
        real, _ = batch.pop("is_real"), batch.pop("source")
        batch = to_device(batch, device)
        with inference(engine):
            out = engine(**batch)
        labels, group = batch["attribute_labels"].double(), batch["group"]
        rows.append(torch.cat([out["scores"].double()[:, None], (group + seen).double()[:, None],
                               combined_labels(labels, weights)[:, None], out["attributes"].double(), labels,
                               real.to(device)[group].double()[:, None]], 1))
        seen += len(real)
    count = len(names)
    local = torch.cat(rows) if rows else torch.zeros((0, 4 + 2 * count), dtype=torch.float64, device=device)
    local[:, 1] += dist.get_rank() * 2.0 ** 32  # prompt ids unique across ranks
    table = gather_rows(local)
    engine.train()
    table = table[table[:, -1] > 0, :-1].numpy()
    report = attribute_report(table[:, 3:3 + count], table[:, 3 + count:], names, table[:, 0], table[:, 1],
                              table[:, 2])
    summary = {key: report[key] for key in ("responses", "mse", "pearson", "spearman", "comparisons",
                                            "pairwise_accuracy")}
    for name, row in report["attributes"].items():
        summary.update({f"{metric}/{name}": row[metric] for metric in ("mse", "pearson", "spearman")})
    return {**{key: value for key, value in summary.items() if value is not None}, "rows": table}


def log_metrics(label: str, metrics: dict, writer, step: int) -> None:
    """Print an evaluation's metrics (rank 0) and add them to TensorBoard."""
    if "responses" in metrics:
        pairwise = f", pairwise accuracy {metrics['pairwise_accuracy']:.4f} on {metrics['comparisons']:.0f} " \
                   "comparisons" if "pairwise_accuracy" in metrics else ""
        print_rank_0(f"{label}: mean Spearman {metrics.get('spearman', float('nan')):.4f}, mean MSE "
                     f"{metrics.get('mse', float('nan')):.4f}{pairwise} "
                     f"({metrics['responses']:.0f} held-out responses)")
        print_rank_0("  " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()
                                      if name.startswith(("spearman/", "mse/"))))
    elif "first_error_accuracy" in metrics:
        print_rank_0(f"{label}: step accuracy {metrics['accuracy']:.4f}, first-error accuracy "
                     f"{metrics['first_error_accuracy']:.4f}, solution accuracy {metrics['solution_accuracy']:.4f} "
                     f"({metrics['solutions']:.0f} held-out solutions, {metrics['steps']:.0f} labelled steps)")
    else:
        print_rank_0(f"{label}: chosen_last_scores (higher is better) : {metrics['chosen']:.4f}, "
                     f"rejected_last_scores (lower is better) : {metrics['rejected']:.4f}, "
                     f"diff : {metrics['difference']:.4f}, acc (higher is better) : {metrics['accuracy']:.4f} "
                     f"({metrics['pairs']:.0f} held-out pairs)")
        extras = [f"{name} {value:.4f}" for name, value in metrics.items()
                  if name.startswith(("top1", "accuracy/", "benchmark/"))]
        if extras:
            print_rank_0("  " + ", ".join(extras))
    if writer:
        for name, value in metrics.items():
            if name != "rows":
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
        self.sequences = encode_items(self.scorer, self.items)

    def rewards(self, engine, device: torch.device) -> np.ndarray:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        per_rank = -(-len(self.sequences) // world_size)  # so every rank runs as many batches
        mine = [(rank + k * world_size) % len(self.sequences) for k in range(per_rank)]
        scorer = replace(self.scorer, model=engine.module, device=device, grad_mode=partial(inference, engine))
        engine.eval()
        local = torch.tensor(scorer.score_ids([self.sequences[i] for i in mine]), dtype=torch.float64, device=device)
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
