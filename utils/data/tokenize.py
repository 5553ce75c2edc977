"""Examples -> token ids, with truncation that keeps the scored end of every response.

Each sequence is `[tokenizer's leading specials] prompt response end_of_conversation [trailing
specials]`. Conversations are first rendered to text with the chat template; pretokenized rows
keep their ids. The prompt and each response are tokenised separately, exactly as the PPO step sees
them (prompt tokens followed by generated tokens). When a pair is longer than `max_seq_len`, the
prompt is cut from the left by the same amount for every response of the example, so the answers
and their last token (the one that is scored) survive and the shared prompt stays shared. An
example whose longest response cannot fit even with an empty prompt is dropped and counted.

A text far longer than `max_seq_len` is not tokenised in full (a 10 MB string takes the tiny test
tokenizers over 10 s): a prompt only needs its end, and a response that long can never fit.
Pretokenized ids are checked against the tokenizer's range here, where it is known, under the
`--bad_rows` policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from rlhf_reward.utils.data.examples import Example, malformed_error
from rlhf_reward.utils.data.fields import Malformed
from rlhf_reward.utils.data.ragged import offsets, pack, unpack
from rlhf_reward.utils.files import atomic_write
from rlhf_reward.utils.model_files import special_affixes

# More characters per token than real vocabularies average: a text longer than max_seq_len * CHARS_PER_TOKEN
# characters holds more than max_seq_len tokens.
CHARS_PER_TOKEN = 64
# A space after a non-space starts a new pre-token (word) in byte-level BPE and SentencePiece vocabularies
# alike, so the tokens from there on do not depend on the text before it.
WORD_START = re.compile(r"(?<=\S) ")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _tail(text: str, limit: int) -> str:
    """The last `limit` characters of `text`, from the first word start in their first half (so that the
    words kept are whole), or from the cut when a single word spans that half."""
    if len(text) <= limit:
        return text
    start = len(text) - limit
    word = WORD_START.search(text, start, start + limit // 2)
    return text[word.start() if word else start:]


def encode_tails(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of prompts, which are cut from the left: of a text longer than max_seq_len * CHARS_PER_TOKEN
    characters only the tail is tokenised. When the tail starts at a word and holds more than max_seq_len
    tokens, its last max_seq_len tokens (more than a prompt ever keeps) are those of the whole text; a
    tail that holds fewer falls back to the whole text."""
    limit = max_seq_len * CHARS_PER_TOKEN
    tails = [_tail(text, limit) for text in texts]
    ids = _encode(tokenizer, tails)
    redo = [i for i, (text, tail, tokens) in enumerate(zip(texts, tails, ids, strict=True))
            if len(tail) < len(text) and len(tokens) <= max_seq_len]
    for i, tokens in zip(redo, _encode(tokenizer, [texts[i] for i in redo]), strict=True):
        ids[i] = tokens
    return ids


def encode_bounded(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of responses or steps, which fit whole or not at all: a text longer than
    max_seq_len * CHARS_PER_TOKEN characters cannot fit, and gets max_seq_len + 1 stand-in ids instead."""
    limit = max_seq_len * CHARS_PER_TOKEN
    short = [i for i, text in enumerate(texts) if len(text) <= limit]
    ids = [[0] * (max_seq_len + 1) for _ in texts]
    for i, tokens in zip(short, _encode(tokenizer, [texts[i] for i in short]), strict=True):
        ids[i] = tokens
    return ids


def _id_problem(example: Example, vocab_size: int) -> Malformed | None:
    """A pretokenized example's first id outside [0, vocab_size), as a malformed field."""
    for side, ids in zip(("chosen", "rejected"), example["token_ids"], strict=False):
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            return Malformed(f"field 'input_ids_{side}' has a token id outside the tokenizer's range",
                             f" ({str(bad)[:20]}; the tokenizer has {vocab_size} tokens)")
    return None


def _in_range(examples: list[Example], vocab_size: int, bad_rows: str) -> list[Example]:
    """The examples whose token ids the tokenizer has; in error mode the first other one is raised."""
    kept = []
    for example in examples:
        problem = _id_problem(example, vocab_size) if "token_ids" in example else None
        if problem and bad_rows == "error":
            raise malformed_error(example.get("where", example["source"]), problem)
        if not problem:
            kept.append(example)
    return kept


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
    """Token ids of examples: the (truncated) prompt once, each response with its end tokens, the
    responses' ranks (0 best, equal = unordered) and the example's margin."""

    prompts: list[np.ndarray] = field(default_factory=list)
    responses: list[list[np.ndarray]] = field(default_factory=list)
    ranks: list[np.ndarray] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    source_names: list[str] = field(default_factory=list)
    truncated: int = 0
    too_long: int = 0
    responses_dropped: int = 0  # over-long answers left out of ranked lists that keep two ranks, or of rated lists
    bad_ids: int = 0  # pretokenized examples dropped (--bad_rows skip) for ids outside the tokenizer's range
    labels: list[np.ndarray] = field(default_factory=list)  # attribute data: [responses, attributes], NaN unrated
    attribute_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def has_ranked_lists(tokenized: TokenizedExamples) -> bool:
    """Whether any example is more than a strict pair: three or more answers, or tied ranks."""
    return any(len(ranks) != 2 or ranks[0] == ranks[1] for ranks in tokenized.ranks)


def _pretokenized(sequences: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Whole sequences -> their longest shared prefix as the prompt, and the rest of each."""
    shared = 0
    shortest = min(len(seq) for seq in sequences)
    while shared < shortest - 1 and all(seq[shared] == sequences[0][shared] for seq in sequences):
        shared += 1
    return list(sequences[0][:shared]), [list(seq[shared:]) for seq in sequences]


def _fitting_responses(responses: list[list[int]], ranks: list[int], room: int, rated: bool = False) -> list[int]:
    """Which responses an example keeps: every one that fits if they are `rated` (each answer its own
    labels), else those that fit while two of different rank remain (a pair keeps both or neither):
    one over-long answer does not cost the whole list."""
    keep = [i for i, response in enumerate(responses) if len(response) <= room]
    if rated or len(keep) == len(responses) or (len(responses) > 2 and len({ranks[i] for i in keep}) > 1):
        return keep
    return []


def shared_length(prompt: list[int], sequences: list[list[int]]) -> int:
    """How many of the prompt's ids begin every sequence: all of them, unless a token spans the end of
    the prompt text (a byte-level BPE merges "Assistant: " and "A" into ":", " A")."""
    shared = len(prompt)
    for sequence in sequences:
        if sequence[:shared] != prompt[:shared]:
            pairs = zip(prompt[:shared], sequence, strict=False)
            shared = next((i for i, (a, b) in enumerate(pairs) if a != b), min(shared, len(sequence)))
    return shared


def encode_examples(examples: list[Example], tokenizer, max_seq_len: int, end_of_conversation_token: str,
                    chat_template: str | None = None,
                    whole_responses: bool = False) -> list[tuple[list[int], list[int], list[list[int]]]]:
    """The token ids a reward model reads for each example, as (lead, prompt, responses): a response's
    sequence is lead + prompt + response. This is the scoring contract, for training and scoring alike.

    - A conversation is rendered with the chat template (`chat.render`: the tokenizer's own, else
      DeepSpeed-Chat's layout as a template) and tokenised without special tokens, as TRL and verl
      tokenise a template's text: the template alone decides every token, and nothing is appended.
    - A text example is DeepSpeed-Chat's layout: the tokenizer's leading special tokens, prompt,
      response + end-of-conversation token, the trailing special tokens.
    - Pretokenized ids are kept (no specials, no end token) and split at their shared prefix.

    Prompt and response are tokenised as one text, as a framework tokenises prompt + completion (and
    DeepSpeed-Chat its whole sentence): the prompt is the part of those ids the prompt's own ids
    share. A prompt longer than max_seq_len * CHARS_PER_TOKEN characters is tokenised on its own, by its
    tail (it is cut anyway); a response that long cannot fit and gets max_seq_len + 1 stand-in ids, unless
    `whole_responses` asks for all of it (to cut it, as benchmark runners do)."""
    from rlhf_reward.utils.data.chat import is_conversation, render

    prefix, suffix = special_affixes(tokenizer)
    encoded: list = [None] * len(examples)
    texts = []  # (example index, prompt text, response texts, lead, trail)
    for index, example in enumerate(examples):
        if "token_ids" in example:
            encoded[index] = ([], *_pretokenized(example["token_ids"]))
        elif is_conversation(example):
            rendered = render(tokenizer, example, chat_template, end_of_conversation_token)
            texts.append((index, rendered["prompt"], rendered["responses"], [], []))
        else:
            texts.append((index, example["prompt"], [r + end_of_conversation_token for r in example["responses"]],
                          prefix, suffix))
    limit = max_seq_len * CHARS_PER_TOKEN
    prompt_ids = encode_tails(tokenizer, [prompt for _, prompt, _, _, _ in texts], max_seq_len)
    jobs = [(k, j, (prompt if len(prompt) <= limit else "") + response)
            for k, (_, prompt, responses, _, _) in enumerate(texts) for j, response in enumerate(responses)
            if whole_responses or len(response) <= limit]
    whole: list[list] = [[None] * len(responses) for _, _, responses, _, _ in texts]
    for (k, j, _), ids in zip(jobs, _encode(tokenizer, [text for _, _, text in jobs]), strict=True):
        whole[k][j] = ids
    cannot_fit = [0] * (max_seq_len + 1)
    for (index, prompt, _, lead, trail), ids, sequences in zip(texts, prompt_ids, whole, strict=True):
        together = len(prompt) <= limit  # else only the prompt's tail was tokenised, and responses alone
        shared = shared_length(ids, [seq for seq in sequences if seq is not None]) if together else 0
        encoded[index] = (lead, ids[:shared] if together else ids,
                          [(seq[shared:] if seq is not None else cannot_fit) + trail for seq in sequences])
    return encoded


def tokenize_examples(examples: list[Example], tokenizer, max_seq_len: int, end_of_conversation_token: str,
                      chat_template: str | None = None, bad_rows: str = "error") -> TokenizedExamples:
    """Token ids of examples (`encode_examples`), the prompt cut from the left where a response needs
    the room; too long examples and answers are dropped and counted."""
    out = TokenizedExamples()
    if not examples:
        return out
    kept = _in_range(examples, len(tokenizer), bad_rows)
    out.bad_ids = len(examples) - len(kept)
    encoded = encode_examples(kept, tokenizer, max_seq_len, end_of_conversation_token, chat_template)
    names: dict[str, int] = {}
    for example, (lead, prompt, responses) in zip(kept, encoded, strict=True):
        ranks = list(example.get("ranks", range(len(responses))))
        keep = _fitting_responses(responses, ranks, max_seq_len - len(lead), rated="labels" in example)
        responses, ranks = [responses[i] for i in keep], [ranks[i] for i in keep]
        fitted = fit_prompt(prompt, responses, len(lead), max_seq_len) if responses else None
        if fitted is None:
            out.too_long += 1
            continue
        out.responses_dropped += len(example["responses"]) - len(responses)
        out.truncated += len(fitted) < len(prompt)
        out.prompts.append(np.asarray(lead + fitted, dtype=np.int32))
        out.responses.append([np.asarray(resp, dtype=np.int32) for resp in responses])
        out.ranks.append(np.asarray(ranks, dtype=np.int32))
        out.margins.append(float(example.get("margin", 0.0)))
        out.sources.append(names.setdefault(example["source"], len(names)))
        if "labels" in example:
            out.labels.append(np.asarray(example["labels"], dtype=np.float32)[keep])
    out.source_names = list(names)
    return out


def save_tokenized(tokenized: TokenizedExamples, path: str) -> None:
    """Write as `.npz` of flat arrays (no pickles), atomically."""
    counts = np.array([len(r) for r in tokenized.responses], dtype=np.int64)
    prompts, prompt_offsets = pack(tokenized.prompts, np.int32)
    responses, response_offsets = pack([r for rs in tokenized.responses for r in rs], np.int32)
    ranks, _ = pack(tokenized.ranks, np.int32)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, prompts=prompts, prompt_offsets=prompt_offsets, responses=responses,
                 response_offsets=response_offsets, counts=counts, ranks=ranks,
                 margins=np.asarray(tokenized.margins, dtype=np.float64),
                 sources=np.asarray(tokenized.sources, dtype=np.int64),
                 source_names=np.asarray(tokenized.source_names, dtype=np.str_),
                 stats=np.array([tokenized.truncated, tokenized.too_long, tokenized.responses_dropped,
                                 tokenized.bad_ids], dtype=np.int64),
                 labels=np.concatenate(tokenized.labels) if tokenized.labels else np.zeros((0, 0), np.float32),
                 attribute_names=np.asarray(tokenized.attribute_names, dtype=np.str_))


def load_tokenized(path: str) -> TokenizedExamples:
    with np.load(path, allow_pickle=False) as saved:
        groups = offsets(saved["counts"])  # where each example's responses and ranks start
        truncated, too_long, responses_dropped, bad_ids = saved["stats"].tolist()
        return TokenizedExamples(prompts=unpack(saved["prompts"], saved["prompt_offsets"]),
                                 responses=unpack(unpack(saved["responses"], saved["response_offsets"]), groups),
                                 ranks=unpack(saved["ranks"], groups),
                                 margins=saved["margins"].tolist(), sources=saved["sources"].tolist(),
                                 source_names=saved["source_names"].tolist(),
                                 truncated=truncated, too_long=too_long, responses_dropped=responses_dropped,
                                 bad_ids=bad_ids,
                                 labels=unpack(saved["labels"], groups) if saved["labels"].size else [],
                                 attribute_names=saved["attribute_names"].tolist())
