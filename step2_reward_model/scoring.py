"""Texts -> rewards with a loaded reward model: shared by rw_eval.py's evaluator and its server.

A prompt/answer pair is tokenised exactly as in training (`tokenize.encode_examples`: text in
DeepSpeed-Chat's layout, chat messages through the chat template; the prompt cut from the left when
too long), so a reward here equals the reward training and the PPO step compute for the same text.
Sequences are scored in length-sorted batches, padded on the right to the batch's longest. A
multi-attribute model's scores come with each attribute, in the data's units (its label scale undone).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from step2_reward_model.losses import combined_labels
from step2_reward_model.model import RewardModel
from utils.data.attributes import AttributeScale
from utils.data.chat import scoring_template, template_ends
from utils.data.collate import pad_right
from utils.data.fields import Messages
from utils.data.tokenize import TokenizedExamples, encode_examples, fit_prompt, special_affixes
from utils.errors import UserError


@dataclass
class Scorer:
    model: RewardModel
    tokenizer: object
    max_seq_len: int
    end_of_conversation_token: str
    batch_size: int = 16
    device: torch.device = torch.device("cpu")
    # How the forwards run: inference mode, except under ZeRO-3 in training (see `evaluate.inference`).
    grad_mode: Callable[[], AbstractContextManager] = torch.inference_mode
    # A multi-attribute model's label scale, to report its attributes in the data's units.
    scale: AttributeScale | None = None

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The attributes a multi-attribute model scores besides its reward; none for others."""
        attributes = self.model.attributes if self.model is not None else None
        return attributes.names if attributes else ()

    def encode_pairs(self, prompts: list[str | Messages], answers: list[str | Messages],
                     cut_long: bool = False) -> list[np.ndarray]:
        """Token ids of each prompt + answer exactly as training reads them (`encode_examples`): text in
        DeepSpeed-Chat's layout, or chat messages through the chat template. An answer that cannot fit
        is a UserError naming its position, or with `cut_long` (as benchmark runners do) loses its start
        too: the sequence keeps its last `max_seq_len` tokens after the leading ones."""
        examples = [{"prompt": prompt, "responses": [answer], "source": f"item {index}"}
                    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))]
        encoded = encode_examples(examples, self.tokenizer, self.max_seq_len, self.end_of_conversation_token,
                                  whole_responses=cut_long)
        sequences = []
        for index, (lead, prompt, (response,)) in enumerate(encoded):
            fitted = fit_prompt(prompt, [response], len(lead), self.max_seq_len)
            if fitted is None and cut_long:
                fitted, response = [], response[len(response) - (self.max_seq_len - len(lead)):]
            elif fitted is None:
                raise UserError(f"item {index}: the answer is {len(response)} tokens, longer than "
                                f"max_seq_len {self.max_seq_len}")
            sequences.append(np.asarray(lead + fitted + response, dtype=np.int64))
        return sequences

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of whole texts, scored as given (no end token added); a text longer than
        `max_seq_len` loses its left part, after the tokenizer's leading special tokens."""
        prefix, _ = special_affixes(self.tokenizer)
        sequences = []
        for ids in (self.tokenizer(list(texts))["input_ids"] if texts else []):
            if len(ids) > self.max_seq_len:
                ids = ids[:len(prefix)] + ids[len(ids) - (self.max_seq_len - len(prefix)):]
            sequences.append(np.asarray(ids, dtype=np.int64))
        return sequences

    def encode_rendered(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of whole conversations as a PPO step decodes its sequences (OpenRLHF's remote reward
        queries): the prompt laid out by the chat template, the policy's answer, then whatever end or
        pad tokens the policy emitted. Those special tokens (and an end of turn already there) are
        replaced by the template's end of an assistant turn, DeepSpeed-Chat's layout gets its leading
        special tokens back where they are missing, and the text is tokenised without special tokens,
        as training read it; a text longer than `max_seq_len` loses its left part after those."""
        template = scoring_template(self.tokenizer, None, self.end_of_conversation_token)
        lead, turn_end = template_ends(self.tokenizer, template)
        endings = sorted({*self.tokenizer.all_special_tokens, turn_end} - {""}, key=len, reverse=True)
        lead_length = len(self.tokenizer(lead, add_special_tokens=False)["input_ids"]) if lead else 0
        sequences = []
        for text in texts:
            while ending := next((end for end in endings if text.endswith(end)), None):
                text = text[:-len(ending)]
            text = ("" if text.startswith(lead) else lead) + text + turn_end
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_seq_len:
                ids = ids[:lead_length] + ids[len(ids) - (self.max_seq_len - lead_length):]
            sequences.append(np.asarray(ids, dtype=np.int64))
        return sequences

    def score_ids(self, sequences: list[np.ndarray], progress: bool = False) -> list[float]:
        """The end score of each sequence, in the order given: ceil(len / batch_size) forwards."""
        return self.score_all(sequences, progress)[0].tolist()

    def score_all(self, sequences: list[np.ndarray], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's end score and `[sequences, attributes]` attribute scores (no columns for a
        model without attributes), in the order given."""
        from tqdm import tqdm

        order = np.argsort([-len(sequence) for sequence in sequences], kind="stable")
        scores = np.zeros(len(sequences))
        attributes = np.zeros((len(sequences), len(self.attribute_names)))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, file=sys.stderr):
            chunk = order[start:start + self.batch_size]
            input_ids, attention_mask = pad_right([sequences[index] for index in chunk], 0)
            with self.grad_mode():
                out = self.model.forward_value(input_ids.to(self.device), attention_mask.to(self.device))
            # Detached: under ZeRO-3 in training the forwards run with gradients (see `grad_mode`).
            scores[chunk] = out["chosen_end_scores"].detach().float().cpu().numpy()
            if "end_attributes" in out:
                attributes[chunk] = out["end_attributes"].detach().float().cpu().numpy()
        if self.scale is not None and attributes.shape[1]:
            attributes = self.scale.invert(attributes)
        return scores, attributes

    def score_answers(self, prompt: str, answers: list[str]) -> list[float]:
        return self.rate_answers(prompt, answers)[0].tolist()

    def rate_answers(self, prompt: str, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The reward and the attribute scores of each answer to `prompt`."""
        return self.score_all(self.encode_pairs([prompt] * len(answers), answers))

    @torch.inference_mode()
    def score_steps(self, prompt: str, steps: list[str], separator: str) -> list[float]:
        """A process reward model's logit that each step is correct, read at the end of each step as
        in training (probability: its sigmoid)."""
        from utils.data.steps import StepExample, tokenize_steps

        example = StepExample(prompt=prompt, steps=steps, labels=[1] * len(steps), source="cli")
        tokenized = tokenize_steps([example], self.tokenizer, self.max_seq_len, separator)
        if not len(tokenized) or len(tokenized.positions[0]) < len(steps):
            raise UserError(f"the prompt and {len(steps)} steps do not fit in max_seq_len {self.max_seq_len}")
        input_ids = torch.from_numpy(tokenized.sequences[0].astype(np.int64))[None].to(self.device)
        values = self.model.forward_value(input_ids, torch.ones_like(input_ids), return_value_only=True)
        return values[0, torch.from_numpy(tokenized.positions[0].astype(np.int64))].float().tolist()


def load_scorer(model_path: str, tokenizer_path: str | None = None, max_seq_len: int | None = None,
                batch_size: int = 16, trust_remote_code: bool = False, device: str | None = None) -> Scorer:
    """A saved reward model (OUTPUT, OUTPUT/hf or a DeepSpeed-Chat folder) ready to score, on `device`
    (default: the GPU when there is one), with the max length and end token its manifest records."""
    from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer
    from utils.model_files import END_OF_CONVERSATION_TOKEN

    model = load_reward_model(model_path, trust_remote_code=trust_remote_code)
    tokenizer = load_scoring_tokenizer(model_path, tokenizer_path, trust_remote_code)
    manifest = load_manifest(model_path)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Scorer(model.to(where), tokenizer, max_seq_len or manifest.get("max_seq_len", 512),
                  manifest.get("end_of_conversation_token", END_OF_CONVERSATION_TOKEN), batch_size=batch_size,
                  device=where, scale=AttributeScale.from_manifest(manifest))


def score_tokenized(scorer: Scorer, tokenized: TokenizedExamples,
                    progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rewards of every response: per example its best and worst answer (a pair's chosen and
    rejected) with the lengths and sources the report breaks accuracy down by, and a table of
    (reward, example, rank) rows for ranking metrics over ranked lists."""
    sequences, table = [], []
    for index, (prompt, responses, ranks) in enumerate(zip(tokenized.prompts, tokenized.responses, tokenized.ranks,
                                                           strict=True)):
        for response, rank in zip(responses, ranks, strict=True):
            sequences.append(np.concatenate([prompt, response]).astype(np.int64))
            table.append((index, rank))
    scores = np.asarray(scorer.score_ids(sequences, progress=progress))
    counts = np.array([len(responses) for responses in tokenized.responses])
    best = np.concatenate([[0], np.cumsum(counts)[:-1]])
    worst = np.cumsum(counts) - 1
    scored = {"chosen": scores[best], "rejected": scores[worst],
              "chosen_lengths": np.array([len(r[0]) for r in tokenized.responses]),
              "rejected_lengths": np.array([len(r[-1]) for r in tokenized.responses]),
              "pair_lengths": np.array([len(p) + max(len(r[0]), len(r[-1]))
                                        for p, r in zip(tokenized.prompts, tokenized.responses, strict=True)]),
              "sources": [tokenized.source_names[s] for s in tokenized.sources]}
    return scored, np.column_stack([scores, np.asarray(table, dtype=np.float64).reshape(-1, 2)])


def score_data(scorer: Scorer, data_paths: list[str], data_split: str, split: str, seed: int, cache_dir: str,
               repo_root: str, log=print,
               bad_rows: str = "error") -> tuple[dict[str, np.ndarray], np.ndarray, TokenizedExamples]:
    """Score a split of training's data (same sources, cleaning, phase-2 split and truncation)."""
    from utils.data.build import DataSource, load_examples
    from utils.data.tokenize import tokenize_examples

    train, held_out = load_examples(DataSource(tuple(data_paths), data_split, seed, cache_dir, repo_root,
                                               bad_rows=bad_rows, log=log))
    tokenized = tokenize_examples(held_out if split == "eval" else train, scorer.tokenizer, scorer.max_seq_len,
                                  scorer.end_of_conversation_token, bad_rows=bad_rows)
    log(f"data: {len(tokenized)} pairs to score, {tokenized.truncated} with the prompt cut from the left, "
        f"{tokenized.too_long} skipped (an answer longer than {scorer.max_seq_len} tokens), "
        f"{tokenized.bad_ids} skipped (token ids outside the tokenizer's range)")
    if not len(tokenized):
        raise UserError(f"--data_path {' '.join(data_paths)}: no pair to score in the {split} split")
    return *score_tokenized(scorer, tokenized), tokenized


def score_rated_data(scorer: Scorer, data_paths: list[str], data_split: str, split: str, seed: int, cache_dir: str,
                     repo_root: str, log=print, bad_rows: str = "error") -> dict[str, np.ndarray]:
    """Score a split of attribute-rated data (same sources, cleaning, split and truncation as
    training) with a multi-attribute model: per response its reward, predicted and rated attributes
    (NaN: not rated) in the data's units, combined label (the reward it should get, in the model's
    units; NaN when unknown), prompt index, length in tokens and source."""
    from utils.data.attributes import group_by_prompt
    from utils.data.build import DataSource, load_rated
    from utils.data.tokenize import tokenize_examples

    names = list(scorer.attribute_names)
    rated = load_rated(DataSource(tuple(data_paths), data_split, seed, cache_dir, repo_root, bad_rows=bad_rows,
                                  log=log))[split]
    grouped, dropped = group_by_prompt(rated, names)
    tokenized = tokenize_examples(grouped, scorer.tokenizer, scorer.max_seq_len, scorer.end_of_conversation_token,
                                  bad_rows=bad_rows)
    log(f"data: {sum(map(len, tokenized.responses))} responses to {len(tokenized)} prompts to score, "
        f"{dropped.total()} rating none of {', '.join(names)}, {tokenized.too_long} prompts skipped (an answer "
        f"longer than {scorer.max_seq_len} tokens), {tokenized.responses_dropped} over-long answers left out")
    if not len(tokenized):
        raise UserError(f"--data_path {' '.join(data_paths)}: no rated response to score in the {split} split")
    sequences = [np.concatenate([prompt, response]).astype(np.int64)
                 for prompt, responses in zip(tokenized.prompts, tokenized.responses, strict=True)
                 for response in responses]
    rewards, predicted = scorer.score_all(sequences, progress=True)
    labels = np.concatenate(tokenized.labels).astype(np.float64)
    scaled = labels if scorer.scale is None else scorer.scale.apply(labels).astype(np.float64)
    weights = torch.tensor(scorer.model.attributes.weights)
    counts = [len(responses) for responses in tokenized.responses]
    return {"rewards": rewards, "predicted": predicted, "labels": labels,
            "targets": combined_labels(torch.from_numpy(scaled), weights).numpy(),
            "prompts": np.repeat(np.arange(len(counts)), counts),
            "lengths": np.array([len(response) for responses in tokenized.responses for response in responses]),
            "prompt_lengths": np.repeat([len(prompt) for prompt in tokenized.prompts], counts),
            "sources": np.repeat([tokenized.source_names[s] for s in tokenized.sources], counts)}
