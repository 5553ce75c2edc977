"""Synthetic data sets that a tiny model learns in minutes, for the offline demo and tests.

Rows are split into train and held-out by a hash of the whole row (of a ranked list in rank
order), so no evaluation pair or list is ever a training one. `make_pairs` has three kinds of
prompt, each with a better and a worse answer that differ in one learnable way:
- arithmetic: the right sum vs a wrong one;
- topic: an answer about the asked-for topic vs one about another topic;
- manners: a polite answer vs a rude one with the same content.

`make_length_confounded_pairs` pads both answers of each of those pairs with polite filler, then one of
them with more: in training mostly the chosen one, so that length predicts the preference without
deciding it; held out, the chosen and the rejected answer are the longer one equally often (a
length-balanced set).

`make_ranked_rows` grades answers to the manners prompts on two learnable axes (politeness, then
whether the content answers the request) for ranked-list objectives, in the `responses` + `ranks`
layout or, as conversations, in OpenAssistant's layout.

`make_step_rows` makes step-labelled solutions for process reward models (additions in which a step
sometimes forgets an addend), `make_attribute_rows` HelpSteer-style rows rated on verbosity,
correctness and helpfulness for `--objective regression`; a tiny model learns either on CPU in seconds.
"""

from __future__ import annotations

import json
import os
import random
import zlib

TOPICS = {
    "cats": ["whiskers", "purr", "kitten", "mouse", "fur"],
    "boats": ["sail", "harbor", "anchor", "waves", "deck"],
    "music": ["melody", "guitar", "rhythm", "song", "drums"],
    "cooking": ["oven", "recipe", "spices", "bread", "soup"],
    "space": ["planet", "rocket", "stars", "orbit", "moon"],
    "trees": ["leaves", "roots", "forest", "branch", "bark"],
}
POLITE = ["Sure, happy to help.", "Of course, thank you for asking.", "Gladly, here you go.",
          "Good question, let me help."]
RUDE = ["Ugh, figure it out yourself.", "That is a stupid question.", "Stop bothering me.",
        "Whatever, not my problem."]
REQUESTS = ["How do I reset my password?", "Can you suggest a name for my dog?",
            "What should I pack for a trip?", "How do I boil an egg?", "Where can I learn to swim?"]
CONTENT = ["Open the settings page.", "Try a short and friendly name.", "Take warm clothes.",
           "Put it in hot water for ten minutes.", "Ask at the local pool."]


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    wrong = wrong if wrong >= 0 else a + b + 1
    return {"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:",
            "chosen": f" {a} plus {b} is {a + b}.", "rejected": f" {a} plus {b} is {wrong}."}


def _topic(rng: random.Random) -> dict:
    asked, other = rng.sample(sorted(TOPICS), 2)

    def answer(topic: str) -> str:
        words = rng.sample(TOPICS[topic], 3)
        return f" Here is a fact: {words[0]} and {words[1]} go with {words[2]}."

    return {"prompt": f"\n\nHuman: Tell me something about {asked}.\n\nAssistant:",
            "chosen": answer(asked), "rejected": answer(other)}


def _manners(rng: random.Random) -> dict:
    i = rng.randrange(len(REQUESTS))
    return {"prompt": f"\n\nHuman: {REQUESTS[i]}\n\nAssistant:",
            "chosen": f" {rng.choice(POLITE)} {CONTENT[i]}", "rejected": f" {rng.choice(RUDE)} {CONTENT[i]}"}


KINDS = (_arithmetic, _topic, _manners)


def kind_of(index: int) -> str:
    """The kind of `make_pairs`' row `index` (they come in turn): arithmetic, topic or manners."""
    return KINDS[index % len(KINDS)].__name__.strip("_")


def is_held_out(row: dict) -> bool:
    """One row in ten, decided by the row's text alone: the evaluation side of the split."""
    return zlib.crc32(json.dumps(row, sort_keys=True).encode()) % 10 == 0


def make_pairs(count: int, seed: int, held_out: bool = False) -> list[dict]:
    """`count` prompt/chosen/rejected rows of the train (or held-out) side, the kinds in turn."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        row = KINDS[len(rows) % len(KINDS)](rng)
        if is_held_out(row) == held_out:
            rows.append(row)
    return rows


FILLER = " I hope this helps, and let me know if there is anything else."


def make_length_confounded_pairs(count: int, seed: int, chosen_longer: float, held_out: bool = False,
                                 shared: int = 4) -> list[dict]:
    """`make_pairs` rows padded with sentences of `FILLER`, which says nothing of quality: 0 to `shared` after
    both answers (lengths vary from prompt to prompt, as in real data), then 1 or 2 more after one of them, the
    chosen one in a `chosen_longer` share of the rows (exactly, in a shuffled order), the rejected one in the rest."""
    rng = random.Random(seed + 1)
    rows = make_pairs(count, seed, held_out)
    longer = [i < round(chosen_longer * count) for i in range(count)]
    rng.shuffle(longer)
    for row, chosen in zip(rows, longer, strict=True):
        both = FILLER * rng.randint(0, shared)
        row["chosen"] += both
        row["rejected"] += both
        row["chosen" if chosen else "rejected"] += FILLER * rng.randint(1, 2)
    return rows


LEVELS = ("polite", "plain", "rude")


def _ranked(rng: random.Random, best_of_n: bool) -> tuple[str, list[str], list[int]]:
    """A request and four answers: polite, plain and rude with the right content, rude with the
    wrong content (ranks 0..3); a best-of-N row knows only the best (ranks 0, 1, 1, 1)."""
    i = rng.randrange(len(REQUESTS))
    j = rng.choice([k for k in range(len(CONTENT)) if k != i])
    answers = [f"{rng.choice(POLITE)} {CONTENT[i]}", CONTENT[i], f"{rng.choice(RUDE)} {CONTENT[i]}",
               f"{rng.choice(RUDE)} {CONTENT[j]}"]
    ranks = [0, 1, 1, 1] if best_of_n else [0, 1, 2, 3]
    order = rng.sample(range(4), 4)  # the data does not come sorted
    return REQUESTS[i], [answers[k] for k in order], [ranks[k] for k in order]


def make_ranked_rows(count: int, seed: int, held_out: bool = False, conversational: bool = False) -> list[dict]:
    """`count` ranked-list rows of the train (or held-out) side; every fourth is best-of-N."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        request, answers, ranks = _ranked(rng, best_of_n=len(rows) % 4 == 3)
        if conversational:
            ordered = [answer for _, answer in sorted(zip(ranks, answers, strict=True), key=lambda p: p[0])]
            row = {"conversation": [{"role": "prompter", "text": request}], "ranked_responses": ordered,
                   "ranks": sorted(ranks)}
        else:
            row = {"prompt": f"\n\nHuman: {request}\n\nAssistant:", "responses": [" " + a for a in answers],
                   "ranks": ranks}
        # Split on the list in rank order, so that no held-out list is a training list reordered.
        if is_held_out({"request": request, "ranked": sorted(zip(ranks, answers, strict=True))}) == held_out:
            rows.append(row)
    return rows


def _addition_chain(rng: random.Random) -> dict:
    """Add single digits one at a time. A wrong step forgets an addend: its result repeats one of its operands
    (a slip a tiny model learns to spot in seconds; checking real sums takes it far longer). As in PRM800K, the
    steps before the first wrong one are labelled 1, that one -1, and the rest, which carry on from the wrong
    total, null."""
    numbers = [rng.randint(1, 9) for _ in range(rng.randint(3, 5))]
    wrong_at = rng.randrange(1, len(numbers)) if rng.random() < 0.7 else None
    total, steps, labels = numbers[0], [], []
    for i, number in enumerate(numbers[1:], start=1):
        result = rng.choice([total, number]) if i == wrong_at else total + number
        steps.append(f"{total} + {number} = {result}")
        labels.append(1 if wrong_at is None or i < wrong_at else -1 if i == wrong_at else None)
        total = result
    return {"prompt": f"Add {', '.join(map(str, numbers))}.", "steps": steps, "labels": labels}


def make_step_rows(count: int, seed: int, held_out: bool = False) -> list[dict]:
    """`count` synthetic step-wise rows of the train (or held-out) side, split by a hash of the row."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        row = _addition_chain(rng)
        if is_held_out(row) == held_out:
            rows.append(row)
    return rows


def _rated_response(rng: random.Random) -> tuple[str, dict[str, float | None]]:
    """An answer of 1 to 12 filler words, with or without the word "verified". Verbosity is its
    length (0-4), correctness whether the marker is there (4 or 0), helpfulness their mean, rated
    for two responses in three only (the rest null)."""
    words = rng.randint(1, 12)
    verified = rng.random() < 0.5
    text = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(words))
    if verified:
        text = f"verified {text}"
    verbosity, correctness = float(round((words - 1) * 4 / 11)), 4.0 if verified else 0.0
    helpfulness = (verbosity + correctness) / 2 if rng.random() < 2 / 3 else None
    return " " + text, {"helpfulness": helpfulness, "correctness": correctness, "verbosity": verbosity}


def make_attribute_rows(count: int, seed: int, held_out: bool = False) -> list[dict]:
    """`count` HelpSteer-style rows (two responses per prompt, one row each) of the train (or
    held-out) side, split by a hash of the prompt so both responses land on the same side."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        prompt = f"\n\nHuman: Tell me about item {seed}-{len(rows)}-{rng.random():.6f}.\n\nAssistant:"
        if is_held_out({"prompt": prompt}) != held_out:
            continue
        for _ in range(2):
            response, ratings = _rated_response(rng)
            rows.append({"prompt": prompt, "response": response, **ratings})
    return rows[:count]


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_dataset(folder: str, train: int = 3000, evaluation: int = 300, seed: int = 0) -> None:
    """A folder the data module reads as one source: `train.jsonl` and a held-out `eval.jsonl`."""
    write_jsonl(make_pairs(train, seed), os.path.join(folder, "train.jsonl"))
    write_jsonl(make_pairs(evaluation, seed + 1, held_out=True), os.path.join(folder, "eval.jsonl"))
