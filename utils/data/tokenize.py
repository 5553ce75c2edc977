"""Examples -> token ids, with truncation that keeps the scored end of every response.

Each sequence is `[tokenizer's leading specials] prompt response end_of_conversation [trailing
specials]`. The prompt and each response are tokenised separately, exactly as the PPO step sees
them (prompt tokens followed by generated tokens). When a pair is longer than `max_seq_len`, the
prompt is cut from the left by the same amount for every response of the example, so the answers
and their last token (the one that is scored) survive and the shared prompt stays shared. An
example whose longest response cannot fit even with an empty prompt is dropped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from utils.data.examples import Example


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (OPT: `</s>` before; GPT-2: none)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []


def fit_prompt(prompt: list[int], responses: list[list[int]], prefix_length: int,
               max_seq_len: int) -> list[int] | None:
    """The prompt ids that fit before the longest response (cut from the left), or None when
    that response alone is longer than `max_seq_len`."""
    room = max_seq_len - prefix_length - max(len(resp) for resp in responses)
    if room < 0:
        return None
    return prompt[len(prompt) - room:] if len(prompt) > room else prompt


@dataclass
class TokenizedExamples:
    """Token ids of examples: the (truncated) prompt once, each response with its end tokens."""

    prompts: list[np.ndarray] = field(default_factory=list)
    responses: list[list[np.ndarray]] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    source_names: list[str] = field(default_factory=list)
    truncated: int = 0
    too_long: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def tokenize_examples(examples: list[Example], tokenizer, max_seq_len: int,
                      end_of_conversation_token: str) -> TokenizedExamples:
    out = TokenizedExamples()
    if not examples:
        return out
    prefix, suffix = special_affixes(tokenizer)
    prompt_ids = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    flat = [resp + end_of_conversation_token for ex in examples for resp in ex["responses"]]
    flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
    names: dict[str, int] = {}
    for example, prompt in zip(examples, prompt_ids, strict=True):
        responses = [next(flat_ids) + suffix for _ in example["responses"]]
        fitted = fit_prompt(prompt, responses, len(prefix), max_seq_len)
        if fitted is None:
            out.too_long += 1
            continue
        out.truncated += len(fitted) < len(prompt)
        out.prompts.append(np.asarray(prefix + fitted, dtype=np.int32))
        out.responses.append([np.asarray(resp, dtype=np.int32) for resp in responses])
        out.sources.append(names.setdefault(example["source"], len(names)))
    out.source_names = list(names)
    return out


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return data.astype(np.int32), offsets


def _unflatten(data: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [data[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_tokenized(tokenized: TokenizedExamples, path: str) -> None:
    """Write as `.npz` of flat int arrays (no pickles), atomically."""
    counts = np.array([len(r) for r in tokenized.responses], dtype=np.int64)
    prompts, prompt_offsets = _flatten(tokenized.prompts)
    responses, response_offsets = _flatten([r for rs in tokenized.responses for r in rs])
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, prompts=prompts, prompt_offsets=prompt_offsets, responses=responses,
             response_offsets=response_offsets, counts=counts,
             sources=np.asarray(tokenized.sources, dtype=np.int64),
             source_names=np.asarray(tokenized.source_names, dtype=np.str_),
             stats=np.array([tokenized.truncated, tokenized.too_long], dtype=np.int64))
    os.replace(tmp, path)


def load_tokenized(path: str) -> TokenizedExamples:
    with np.load(path, allow_pickle=False) as saved:
        flat_responses = _unflatten(saved["responses"], saved["response_offsets"])
        starts = np.concatenate([[0], np.cumsum(saved["counts"])])
        responses = [flat_responses[starts[i]:starts[i + 1]] for i in range(len(saved["counts"]))]
        truncated, too_long = saved["stats"].tolist()
        return TokenizedExamples(prompts=_unflatten(saved["prompts"], saved["prompt_offsets"]),
                                 responses=responses, sources=saved["sources"].tolist(),
                                 source_names=saved["source_names"].tolist(),
                                 truncated=truncated, too_long=too_long)
