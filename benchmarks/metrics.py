#!/usr/bin/env python
"""Time and peak memory of the held-out metrics path on large evaluation tables.

    python benchmarks/metrics.py                 # both cases, then the former [R, R] ranking_metrics
    python benchmarks/metrics.py --repeat 1 --cases lists

Cases: `pairs`, 1M rows (500k prompts of 2 answers); `lists`, 200k rows (50k prompts of 4 ranked answers,
a quarter with a rank tie: at the top, in the middle or at the bottom). Rows come in 3 sources, with random
scores (a tenth of them rounded, so scores tie too). Each case runs in a fresh process: what training,
`rw_eval.py --data_path` and `export.py --data_path` run on the held-out (score, prompt, rank, source) table
(`step2_reward_model/heldout.py`), i.e. `metrics.ranking_metrics`, the preference objective's `summarize` (overall
and per source) and `statistics` (reward_stats.json), and `rw_eval.py`'s `report.pair_report` on each prompt's best
and worst reward. Each call runs in its
own fresh process (memory another call freed would hide its own), and "whole case" runs them all in turn in one.
Time: the best of --repeat runs. Peak: the largest resident set during the calls less the resident set just
before them (the peak is reset through /proc/self/clear_refs once the input is built, so imports and input are
not counted; tracemalloc would miss torch's allocations).

The former ranking_metrics built [R, R] masks: it runs at a few thousand rows only, and its time and memory
at 1M rows are extrapolated from there (both grow as R^2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from step2_reward_model.metrics import ranking_metrics
from step2_reward_model.objectives.preference import Preference
from step2_reward_model.report import pair_report

CASES = {"pairs": (500_000, 2), "lists": (50_000, 4)}
SOURCES = ["alpha", "beta", "gamma"]
FUNCTIONS = ("ranking_metrics", "Preference.summarize", "Preference.statistics", "report.pair_report")
WHOLE = "whole case"


def table_of(prompts: int, answers: int, seed: int = 0) -> np.ndarray:
    """The preference objective's held-out rows (score, prompt, rank, source, answer length, length reward:
    none), prompts in shuffled order and ids spread out, as `evaluate` gathers."""
    rng = np.random.default_rng(seed)
    rank = np.tile(np.arange(answers, dtype=np.float64), prompts).reshape(prompts, answers)
    if answers > 2:  # a quarter of the lists tie two neighbouring ranks
        tied = rng.random(prompts) < 0.25
        where = rng.integers(0, answers - 1, prompts)
        rows = np.flatnonzero(tied)
        rank[rows, where[rows] + 1] = rank[rows, where[rows]]
    score = rng.normal(size=(prompts, answers)) - 0.3 * rank
    rounded = rng.random(score.shape) < 0.1
    score[rounded] = np.round(score[rounded], 1)
    prompt = np.repeat(rng.permutation(prompts) * 3.0 + 7.0, answers).reshape(prompts, answers)
    source = np.repeat(rng.integers(0, len(SOURCES), prompts).astype(np.float64), answers).reshape(prompts, answers)
    length = rng.integers(20, 400, (prompts, answers)).astype(np.float64)
    return np.stack([score, prompt, rank, source, length, np.full_like(score, np.nan)], -1).reshape(-1, 6)


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best time over `repeat` calls, and the peak resident memory above the resident set before them (MiB)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak resident set
    before = rss_mib("VmRSS")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times), rss_mib("VmHWM") - before


def run_case(name: str, function: str, repeat: int) -> dict:
    """One call of the metrics path (or "whole case": all of them in turn) on one case, in this process."""
    prompts, answers = CASES[name]
    rows = table_of(prompts, answers)
    table = torch.from_numpy(rows)
    first, last = rows[0::answers], rows[answers - 1::answers]  # each prompt's best and worst answer
    lengths = np.stack([first[:, 4], last[:, 4]])
    sources = [SOURCES[int(s)] for s in first[:, 3]]
    objective = Preference()
    calls = {
        "ranking_metrics": lambda: ranking_metrics(table[:, 0], table[:, 1].long(), table[:, 2].long()),
        "Preference.summarize": lambda: objective.summarize(rows, SOURCES),
        "Preference.statistics": lambda: objective.statistics(rows, name),
        "report.pair_report": lambda: pair_report(first[:, 0], last[:, 0], lengths[0], lengths[1],
                                                  lengths.max(0) + 50, sources),
    }
    chosen = list(calls.values()) if function == WHOLE else [calls[function]]
    seconds, peak = measure(lambda: [call() for call in chosen], repeat)
    return {"case": name, "rows": len(rows), "function": function, "seconds": seconds, "peak_mib": peak}


def quadratic_ranking_metrics(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> dict:
    """The former ranking_metrics ([R, R] masks), for the comparison."""
    same = group[:, None] == group[None, :]
    ordered = same & (rank[:, None] < rank[None, :])
    above = scores[:, None] > scores[None, :]
    tied = scores[:, None] == scores[None, :]
    pairs_correct = (ordered & above).sum().double() + 0.5 * (ordered & tied).sum().double()
    best_rank = torch.where(same, rank[None, :], torch.iinfo(rank.dtype).max).amin(-1)
    is_best = rank == best_rank
    sole_best = is_best & ((same & is_best[None, :]).sum(-1) == 1) & (same.sum(-1) >= 2)
    top1_correct = sole_best & (above | ~ordered).all(-1)
    return {"pairs_correct": pairs_correct, "pairs": ordered.sum().double(),
            "top1_correct": top1_correct.sum().double(), "groups_with_top1": sole_best.sum().double()}


def run_old(rows: int, repeat: int) -> dict:
    table = torch.from_numpy(table_of(rows // 2, 2))
    scores, group, rank = table[:, 0], table[:, 1].long(), table[:, 2].long()
    seconds, peak = measure(lambda: quadratic_ranking_metrics(scores, group, rank), repeat)
    new = ranking_metrics(scores, group, rank)
    assert all(new[key].item() == value.item() for key, value in quadratic_ranking_metrics(scores, group, rank).items())
    return {"case": "pairs", "rows": rows, "function": "old ranking_metrics", "seconds": seconds, "peak_mib": peak}


def in_process(arguments: list[str]) -> dict:
    """One measurement in a fresh python: its peak memory is its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def print_table(results: list[dict]) -> None:
    header = f"{'case':6s} {'rows':>9s}  {'function':30s} {'time s':>8s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:6s} {r['rows']:>9,d}  {r['function']:30s} {r['seconds']:8.3f} {r['peak_mib']:9.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--old_rows", type=int, nargs="*", default=[2500, 5000], help="rows for the former [R, R] version")
    p.add_argument("--case", help=argparse.SUPPRESS)  # measure one call here and print the result as JSON
    p.add_argument("--function", help=argparse.SUPPRESS)
    p.add_argument("--old", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case or args.old:
        print(json.dumps(run_case(args.case, args.function, args.repeat) if args.case else run_old(args.old, 1)))
        return
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, best of {args.repeat}")
    results = [in_process(["--case", case, "--function", function, "--repeat", str(args.repeat)])
               for case in args.cases for function in [*FUNCTIONS, WHOLE]]
    old = [in_process(["--old", str(rows)]) for rows in args.old_rows]
    if old:
        largest = old[-1]
        scale = (1_000_000 / largest["rows"]) ** 2
        old.append({"case": "pairs", "rows": 1_000_000, "function": "old ranking_metrics (R^2 extrap.)",
                    "seconds": largest["seconds"] * scale, "peak_mib": largest["peak_mib"] * scale})
    print_table(results + old)


if __name__ == "__main__":
    main()
