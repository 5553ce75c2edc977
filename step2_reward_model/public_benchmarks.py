"""Public reward-model benchmarks, read from their official files and scored by their authors' rules.

Every benchmark item is a prompt with chosen and rejected answers (one each in RewardBench, lists
in RewardBench 2 and RM-Bench). Answers are laid out as the official runners do: through the
tokenizer's chat template when it has one, else in the plain " Human: ... Assistant:" format
DeepSpeed-Chat's data uses; with the end-of-conversation token the model was trained with; and cut
from the left when too long. Each benchmark's rules then turn the rewards into its scores (see
`RULES` and each rule's docstring for its source).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rlhf_reward.utils.data.chat import own_template
from rlhf_reward.utils.data.fields import Malformed, Messages, as_object, as_text, list_of, required
from rlhf_reward.utils.data.readers import LOCAL_EXTENSIONS, place, read_file
from rlhf_reward.utils.errors import UserError, first_line

from step2_reward_model.report import text_table


@dataclass(frozen=True)
class Item:
    id: str
    subset: str
    prompt: str
    chosen: list[str]
    rejected: list[str]


@dataclass(frozen=True)
class Benchmark:
    hub_id: str
    split: str
    lists: bool  # chosen and rejected are lists of answers (else one text each)
    subset_field: str
    parts: str  # the key of `score`'s result whose scores training logs beside the final one
    score: Callable[[list[Item], list[tuple[np.ndarray, np.ndarray]]], dict]


def _answers(row: dict, key: str, lists: bool) -> list[str]:
    if not lists:
        return [as_text(required(row, key), f"field '{key}'")]
    answers = list_of(row, key, as_text, "texts")
    if not answers:
        raise Malformed(f"field '{key}' is an empty list")
    return answers


def _item(row: Any, index: int, benchmark: Benchmark) -> Item:
    row = as_object(row)
    subset = row.get(benchmark.subset_field)
    if not isinstance(subset, str):
        raise Malformed(f"missing field '{benchmark.subset_field}'" if subset is None else
                        f"field '{benchmark.subset_field}' is not text")
    return Item(id=str(row.get("id", index)), subset=subset, prompt=as_text(required(row, "prompt"), "field 'prompt'"),
                chosen=_answers(row, "chosen", benchmark.lists), rejected=_answers(row, "rejected", benchmark.lists))


def _rows(name: str, path: str | None) -> list[tuple[str, Any]]:
    """(where, row) of a local file, or of the benchmark's split on the hub."""
    benchmark = BENCHMARKS[name]
    if path and (os.path.isfile(path) or path.lower().endswith(LOCAL_EXTENSIONS)):
        if not os.path.isfile(path):
            raise UserError(f"--benchmark_path {path}: no such file")
        return read_file(path)
    hub_id = path or benchmark.hub_id
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub_id, split=benchmark.split)
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise UserError(f"--benchmark {name}: cannot load '{hub_id}' split '{benchmark.split}' from the Hugging "
                        f"Face hub (offline? pass --benchmark_path with a local copy): {first_line(err)}") from None
    return [(f"{hub_id}:row {i + 1}", row) for i, row in enumerate(dataset)]


def read_items(name: str, path: str | None = None) -> list[Item]:
    """The benchmark's items; a row that is not one of its items is an error naming its place and field."""
    benchmark = BENCHMARKS[name]
    items = []
    for index, (where, row) in enumerate(_rows(name, path)):
        try:
            items.append(_item(row, index, benchmark))
        except Malformed as err:
            raise UserError(f"{place(where)}: not a {name} item: {err.reason}{err.hint} (is this the file of "
                            "another benchmark?)") from None
    if not items:
        raise UserError(f"--benchmark {name}: no items in {path or benchmark.hub_id}")
    return items


def layout(item: Item, tokenizer) -> tuple[str | Messages, list[str | Messages]]:
    """The prompt and the answers (chosen first) as the official runners lay them out: messages for
    the model's own chat template, else text."""
    answers = item.chosen + item.rejected
    if own_template(tokenizer):
        return item.prompt, [[{"role": "assistant", "content": answer}] for answer in answers]
    return f" Human: {item.prompt} Assistant:", [f" {answer}" for answer in answers]


def encode_items(encoder, items: list[Item]):
    """Token ids of every answer of every item, in order, and the answers' lengths (`encoder`: a `Scorer`;
    an `Encoded`)."""
    prompts, answers = [], []
    for item in items:
        prompt, texts = layout(item, encoder.tokenizer)
        prompts.extend([prompt] * len(texts))
        answers.extend(texts)
    return encoder.encode_pairs(prompts, answers, cut_long=True)


def per_item(items: list[Item], rewards: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Flat rewards, in `encode_items`' order, as each item's (chosen rewards, rejected rewards)."""
    out, start = [], 0
    for item in items:
        middle = start + len(item.chosen)
        out.append((rewards[start:middle], rewards[middle:middle + len(item.rejected)]))
        start = middle + len(item.rejected)
    return out


def score_items(scorer, items: list[Item], progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each item's (chosen rewards, rejected rewards), all sequences scored in length-sorted batches."""
    return per_item(items, np.asarray(scorer.score_ids(encode_items(scorer, items), progress=progress)))


# RewardBench v1: allenai/reward-bench at 05a9005, rewardbench/constants.py (SUBSET_MAPPING,
# EXAMPLE_COUNTS, LENGTH_CATEGORIES; last changed in 6552e93) and rewardbench/utils.py
# (calculate_scores_per_section). math-prm's weight (447 rows counted as 984 = 6 x 164) makes it
# weigh as much as the six code subsets together in Reasoning.
REWARDBENCH_SECTIONS = {
    "Chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
             "mt-bench-med": 40},
    "Chat Hard": {"mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
                  "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46},
    "Safety": {"refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
               "xstest-should-respond": 250, "donotanswer": 136},
    "Reasoning": {"math-prm": 984, **{f"hep-{language}": 164 for language in
                                      ("cpp", "go", "java", "js", "python", "rust")}},
}
REWARDBENCH_PRIOR_SETS = ("anthropic_helpful", "anthropic_hhh", "shp", "summarize")
# LENGTH_CATEGORIES: "True" subsets have the longer chosen answers, "False" the shorter (as the data shows).
CHOSEN_LONGER = ("alpacaeval-easy", "alpacaeval-hard", "xstest-should-respond")
CHOSEN_SHORTER = ("donotanswer", "llmbar-adver-GPTInst", "llmbar-adver-manual", "llmbar-adver-neighbor",
                  "mt-bench-easy", "mt-bench-hard", "refusals-dangerous", "refusals-offensive", "xstest-should-refuse")


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _by_subset(items: list[Item], results: list[float]) -> dict[str, float]:
    subsets: dict[str, list[float]] = {}
    for item, result in zip(items, results, strict=True):
        subsets.setdefault(item.subset, []).append(result)
    return {name: float(np.mean(values)) for name, values in sorted(subsets.items())}


def _weighted(accuracy: dict[str, float], weights: dict[str, int]) -> float | None:
    present = [name for name in weights if name in accuracy]
    if not present:
        return None
    return sum(accuracy[name] * weights[name] for name in present) / sum(weights[name] for name in present)


def score_rewardbench(items: list[Item], rewards: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """A chosen answer must score strictly higher (a tie is wrong). Sections weigh their subsets by
    EXAMPLE_COUNTS; the score is the mean of the four sections. The prior sets (if given) are
    reported apart, and also folded in at half a section's weight, as the paper's leaderboard did."""
    official = [float(chosen[0] > rejected[0]) for chosen, rejected in rewards]
    half_ties = [float(chosen[0] > rejected[0]) + 0.5 * float(chosen[0] == rejected[0]) for chosen, rejected in rewards]
    subsets = _by_subset(items, official)
    sections = {name: _weighted(subsets, weights) for name, weights in REWARDBENCH_SECTIONS.items()}
    scored = [value for value in sections.values() if value is not None]
    prior = _mean(subsets[name] for name in REWARDBENCH_PRIOR_SETS if name in subsets)
    known = {name for weights in REWARDBENCH_SECTIONS.values() for name in weights} | set(REWARDBENCH_PRIOR_SETS)
    return {
        "score": _mean(scored) if len(scored) == len(sections) else None,
        "sections": sections, "subsets": subsets, "prior_sets": prior,
        "score_with_prior_sets": (sum(2 * value for value in scored) + prior) / (2 * len(scored) + 1)
        if prior is not None and len(scored) == len(sections) else None,
        "accuracy_ties_half": _by_subset(items, half_ties),
        "length": {"chosen longer": _mean(v for item, v in zip(items, official, strict=True)
                                          if item.subset in CHOSEN_LONGER),
                   "chosen shorter": _mean(v for item, v in zip(items, official, strict=True)
                                           if item.subset in CHOSEN_SHORTER)},
        "missing": sorted(name for weights in REWARDBENCH_SECTIONS.values() for name in weights
                          if name not in subsets),
        "unknown_subsets": sorted(set(subsets) - known),
    }


# RewardBench 2: allenai/reward-bench at 05a9005, rewardbench/utils.py (reroll_and_score_dataset,
# process_single_model, _compute_prompt_stats; last changed in fd72033) and scripts/run_v2.py; the
# final score is the unweighted mean of the six subsets (paper section 3).
REWARDBENCH2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
TIES_WEIGHTS = {"tied_accuracy": 0.30, "reference_accuracy": 0.30, "preferred": 0.20, "preferred_hard": 0.20,
                "margin": 0.01}  # they add up to 1.01 in the official code too


def best_of_n(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """1 / (answers tied at the maximum) when the first chosen answer is among them, else 0."""
    scores = np.concatenate([chosen, rejected])
    top = scores.max()
    return 1.0 / int((scores == top).sum()) if scores[0] == top else 0.0


def ties_score(items: list[Item], rewards: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The Ties subset's composite. Ids are "<type>:<prompt id>": type `ref` has one correct answer,
    any other several equally correct ones. Per prompt, with C the correct and W the incorrect
    answers' rewards: correct if min C > max W; the spread of the correct ones max C - min C; the
    gap min C - max W. Prompts present as both kinds compare the gap with the spread."""
    stats: dict[str, dict[str, tuple]] = {"ref": {}, "tied": {}}
    for item, (chosen, rejected) in zip(items, rewards, strict=True):
        kind, _, prompt_id = item.id.partition(":")
        gap = float(chosen.min() - rejected.max())
        spread = float(chosen.max() - chosen.min()) if len(chosen) > 1 else float("nan")
        stats["ref" if kind == "ref" else "tied"][prompt_id] = (gap > 0, spread, gap)
    both = sorted(set(stats["ref"]) & set(stats["tied"]))

    def over_both(value: Callable[[tuple, tuple], float]) -> float:
        return float(np.mean([value(stats["ref"][p], stats["tied"][p]) for p in both])) if both else 0.0

    def margin(ref: tuple, tied: tuple) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.nan_to_num(np.tanh(np.float64(min(ref[2], tied[2])) / tied[1] - 1), nan=0.0))

    parts = {"tied_accuracy": _mean(s[0] for s in stats["tied"].values()) or 0.0,
             "reference_accuracy": _mean(s[0] for s in stats["ref"].values()) or 0.0,
             "preferred": over_both(lambda ref, tied: float(tied[2] > tied[1])),
             "preferred_hard": over_both(lambda ref, tied: float(min(ref[2], tied[2]) > tied[1])),
             "margin": over_both(margin)}
    return {"score": sum(TIES_WEIGHTS[name] * value for name, value in parts.items()), **parts}


def score_rewardbench2(items: list[Item], rewards: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Best-of-N with partial credit for ties at the top in every subset but Ties, which has its
    composite; the score is the mean of the six subsets."""
    plain = [(item, reward) for item, reward in zip(items, rewards, strict=True) if item.subset != "Ties"]
    subsets = _by_subset([item for item, _ in plain], [best_of_n(*reward) for _, reward in plain])
    ties = [(item, reward) for item, reward in zip(items, rewards, strict=True) if item.subset == "Ties"]
    details = {}
    if ties:
        details = ties_score([item for item, _ in ties], [reward for _, reward in ties])
        subsets["Ties"] = details["score"]
    strict = [float(chosen[0] > rejected.max()) for _, (chosen, rejected) in plain]
    return {"score": _mean(subsets[name] for name in REWARDBENCH2_SUBSETS) if set(REWARDBENCH2_SUBSETS) <= set(subsets)
            else None, "subsets": subsets, "ties": details,
            "accuracy_strict": _by_subset([item for item, _ in plain], strict),
            "missing": [name for name in REWARDBENCH2_SUBSETS if name not in subsets],
            "unknown_subsets": sorted(set(subsets) - set(REWARDBENCH2_SUBSETS))}


# RM-Bench: THU-KEG/RM-Bench at 73c52d7, scripts/utils.py (compute_accuracy; last changed in 659399c).
# Answers are ordered concise, detailed plain, detailed markdown; safety-refuse and safety-response
# rows are pooled into one safety domain.
RMBENCH_DOMAINS = ("chat", "math", "code", "safety")


def rmbench_matrix(rewards: list[tuple[np.ndarray, np.ndarray]], tie: float = 0.0) -> np.ndarray:
    """M[i, j]: the share of items whose chosen answer in style i beats the rejected one in style j
    (`tie` the credit of an exact tie: 0 officially)."""
    chosen = np.stack([c for c, _ in rewards])[:, :, None]
    rejected = np.stack([r for _, r in rewards])[:, None, :]
    return ((chosen > rejected) + tie * (chosen == rejected)).mean(0)


def matrix_levels(matrix: np.ndarray) -> dict[str, float]:
    """Hard: the chosen answer in a plainer style than the rejected one (above the diagonal);
    normal: the same style; easy: the chosen one richer (below)."""
    upper, lower = np.triu_indices(3, 1), np.tril_indices(3, -1)
    return {"hard": float(matrix[upper].mean()), "normal": float(np.diag(matrix).mean()),
            "easy": float(matrix[lower].mean()), "average": float(matrix.mean())}


def score_rmbench(items: list[Item], rewards: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Per domain the 3x3 style matrix and its hard / normal / easy accuracy; overall each level and
    the average over the four domains."""
    if any(len(c) != 3 or len(r) != 3 for c, r in rewards):
        raise UserError("--benchmark rmbench: every item needs 3 chosen and 3 rejected answers (one per style)")
    domains, ties_half = {}, {}
    for domain in RMBENCH_DOMAINS:
        part = [reward for item, reward in zip(items, rewards, strict=True) if item.subset.startswith(domain)]
        if part:
            matrix = rmbench_matrix(part)
            domains[domain] = {**matrix_levels(matrix), "items": len(part), "matrix": matrix.tolist()}
            ties_half[domain] = matrix_levels(rmbench_matrix(part, tie=0.5))["average"]
    complete = len(domains) == len(RMBENCH_DOMAINS)
    overall = {level: _mean(d[level] for d in domains.values()) if complete else None
               for level in ("hard", "normal", "easy", "average")}
    return {"score": overall["average"], "levels": overall, "domains": domains, "average_ties_half": ties_half,
            "missing": [name for name in RMBENCH_DOMAINS if name not in domains],
            "unknown_subsets": sorted({item.subset for item in items
                                       if not item.subset.startswith(RMBENCH_DOMAINS)})}


BENCHMARKS = {
    "rewardbench": Benchmark("allenai/reward-bench", "filtered", lists=False, subset_field="subset",
                             parts="sections", score=score_rewardbench),
    "rewardbench2": Benchmark("allenai/reward-bench-2", "test", lists=True, subset_field="subset",
                              parts="subsets", score=score_rewardbench2),
    "rmbench": Benchmark("THU-KEG/RM-Bench", "train", lists=True, subset_field="domain", parts="levels",
                         score=score_rmbench),
}


def format_result(name: str, result: dict) -> str:
    """The benchmark's tables for a terminal: per subset (and section), the final score, what is missing."""
    def rows(mapping: dict) -> list[list]:
        return [[key, value] for key, value in mapping.items()]

    sections = []
    if name == "rewardbench":
        halves = result["accuracy_ties_half"]
        sections += [("Subsets (official: a tie is wrong; ties half: as this project counts)",
                      text_table(["subset", "official", "ties half"],
                                 [[key, value, halves[key]] for key, value in result["subsets"].items()])),
                     ("Sections", text_table(["section", "score"], rows(result["sections"]))),
                     ("Length of the chosen answer", text_table(["subsets", "accuracy"], rows(result["length"])))]
        if "length_bias" in result:
            sections.append(("Length bias (answer tokens)",
                             text_table(["metric", "value"], rows(result["length_bias"]))))
        extra = [["prior sets", result["prior_sets"]], ["score with prior sets", result["score_with_prior_sets"]]]
    elif name == "rewardbench2":
        strict = result["accuracy_strict"]
        sections += [("Subsets (official: ties at the top share the credit; strict: a tie is wrong)",
                      text_table(["subset", "official", "strict"],
                                 [[key, value, strict.get(key)] for key, value in result["subsets"].items()]))]
        if result["ties"]:
            sections.append(("Ties composite", text_table(["part", "value"], rows(result["ties"]))))
        extra = []
    else:
        halves = result["average_ties_half"]
        sections += [("Domains (official: a tie is wrong; ties half: as this project counts)",
                      text_table(["domain", "items", "hard", "normal", "easy", "average", "ties half"],
                                 [[key, d["items"], d["hard"], d["normal"], d["easy"], d["average"], halves[key]]
                                  for key, d in result["domains"].items()])),
                     ("Overall", text_table(["level", "accuracy"], rows(result["levels"])))]
        extra = []
    summary = [["score", result["score"]], *extra,
               ["missing", ", ".join(result["missing"]) or "none"],
               ["unknown subsets", ", ".join(result["unknown_subsets"]) or "none"]]
    sections.append((name, text_table(["metric", "value"], summary)))
    return "\n\n".join("\n".join([f"== {title} ==", *lines]) for title, lines in sections) + "\n"
