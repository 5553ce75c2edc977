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
from typing import NamedTuple

import numpy as np
import torch
from rlhf_reward.utils.data.attributes import AttributeScale
from rlhf_reward.utils.data.chat import scoring_template, template_ends
from rlhf_reward.utils.data.collate import pad_right
from rlhf_reward.utils.data.fields import Messages
from rlhf_reward.utils.data.tokenize import encode_examples, fit_prompt, shared_length, special_affixes
from rlhf_reward.utils.errors import UserError

from step2_reward_model.calibration import LengthCalibration
from step2_reward_model.model import RewardModel, position_limit_problem


class Encoded(NamedTuple):
    """Token ids to score, and each answer's length in tokens after its prompt (None for whole texts,
    whose prompt is unknown): what a length-calibrated reward needs besides the model's score."""

    sequences: list[np.ndarray]
    answer_lengths: np.ndarray | None = None


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
    # `export.py --length_calibration`'s curve, subtracted from every reward (see calibration.py).
    length_calibration: LengthCalibration | None = None

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The attributes a multi-attribute model scores besides its reward; none for others."""
        attributes = self.model.attributes if self.model is not None else None
        return attributes.names if attributes else ()

    def encode_pairs(self, prompts: list[str | Messages], answers: list[str | Messages],
                     cut_long: bool = False) -> Encoded:
        """Token ids of each prompt + answer exactly as training reads them (`encode_examples`): text in
        DeepSpeed-Chat's layout, or chat messages through the chat template. An answer that cannot fit
        is a UserError naming its position, or with `cut_long` (as benchmark runners do) loses its start
        too: the sequence keeps its last `max_seq_len` tokens after the leading ones."""
        examples = [{"prompt": prompt, "responses": [answer], "source": f"item {index}"}
                    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))]
        encoded = encode_examples(examples, self.tokenizer, self.max_seq_len, self.end_of_conversation_token,
                                  whole_responses=cut_long)
        sequences, answer_lengths = [], []
        for index, (lead, prompt, (response,)) in enumerate(encoded):
            fitted = fit_prompt(prompt, [response], len(lead), self.max_seq_len)
            if fitted is None and cut_long:
                fitted, response = [], response[len(response) - (self.max_seq_len - len(lead)):]
            elif fitted is None:
                raise UserError(f"item {index}: the answer is {len(response)} tokens, longer than "
                                f"max_seq_len {self.max_seq_len}")
            sequences.append(np.asarray(lead + fitted + response, dtype=np.int64))
            answer_lengths.append(len(response))
        return Encoded(sequences, np.asarray(answer_lengths, dtype=np.int64))

    def encode_texts(self, texts: list[str]) -> Encoded:
        """Token ids of whole texts, scored as given (no end token added); a text longer than
        `max_seq_len` loses its left part, after the tokenizer's leading special tokens."""
        prefix, _ = special_affixes(self.tokenizer)
        sequences = []
        for ids in (self.tokenizer(list(texts))["input_ids"] if texts else []):
            if len(ids) > self.max_seq_len:
                ids = ids[:len(prefix)] + ids[len(ids) - (self.max_seq_len - len(prefix)):]
            sequences.append(np.asarray(ids, dtype=np.int64))
        return Encoded(sequences)

    def encode_rendered(self, texts: list[str], prompts: list[str] | None = None) -> Encoded:
        """Token ids of whole conversations as a PPO step decodes its sequences (OpenRLHF's remote reward
        queries): the prompt laid out by the chat template, the policy's answer, then whatever end or
        pad tokens the policy emitted. Those special tokens (and an end of turn already there) are
        replaced by the template's end of an assistant turn, DeepSpeed-Chat's layout gets its leading
        special tokens back where they are missing, and the text is tokenised without special tokens,
        as training read it; a text longer than `max_seq_len` loses its left part after those. With the
        prompt of each query (the text it begins with), each answer's length is known as well."""
        template = scoring_template(self.tokenizer, None, self.end_of_conversation_token)
        lead, turn_end = template_ends(self.tokenizer, template)
        endings = sorted({*self.tokenizer.all_special_tokens, turn_end} - {""}, key=len, reverse=True)
        lead_length = len(self.tokenizer(lead, add_special_tokens=False)["input_ids"]) if lead else 0
        sequences, answer_lengths = [], []
        for index, text in enumerate(texts):
            while ending := next((end for end in endings if text.endswith(end)), None):
                text = text[:-len(ending)]
            text = ("" if text.startswith(lead) else lead) + text + turn_end
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if prompts is not None:
                prompt = ("" if prompts[index].startswith(lead) else lead) + prompts[index]
                if not text.startswith(prompt):
                    raise UserError(f"item {index}: the query does not begin with its prompt")
                prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                answer_lengths.append(min(len(ids) - shared_length(prompt_ids, [ids]), self.max_seq_len - lead_length))
            if len(ids) > self.max_seq_len:
                ids = ids[:lead_length] + ids[len(ids) - (self.max_seq_len - lead_length):]
            sequences.append(np.asarray(ids, dtype=np.int64))
        return Encoded(sequences, np.asarray(answer_lengths, dtype=np.int64) if prompts is not None else None)

    def check_lengths(self, encoded: Encoded) -> None:
        """A length-calibrated reward needs each answer's length, which whole texts without their prompt
        do not give."""
        if self.length_calibration is not None and encoded.answer_lengths is None:
            raise UserError("this reward is length-calibrated (the manifest's length_calibration), so it needs "
                            "each answer's length: score prompt and answer apart, not whole texts")

    def score_ids(self, encoded: Encoded, progress: bool = False) -> list[float]:
        """The reward of each sequence, in the order given: ceil(len / batch_size) forwards."""
        return self.score_all(encoded, progress)[0].tolist()

    def score_all(self, encoded: Encoded, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's reward (its end score, length-calibrated when the model is) and
        `[sequences, attributes]` attribute scores (no columns for a model without attributes), in the
        order given."""
        from tqdm import tqdm

        self.check_lengths(encoded)
        sequences = encoded.sequences
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
        if self.length_calibration is not None:
            scores = self.length_calibration.apply(scores, encoded.answer_lengths)
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
        from rlhf_reward.utils.data.steps import StepExample, tokenize_steps

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
    from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN

    from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer

    model = load_reward_model(model_path, trust_remote_code=trust_remote_code)
    tokenizer = load_scoring_tokenizer(model_path, tokenizer_path, trust_remote_code)
    manifest = load_manifest(model_path)
    # A folder without a manifest (DeepSpeed-Chat's) scores 512 tokens, or as many as the model has positions.
    max_seq_len = max_seq_len or manifest.get("max_seq_len") or min(
        512, getattr(model.config, "max_position_embeddings", None) or 512)
    if problem := position_limit_problem(model.config, max_seq_len):
        raise UserError(problem)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Scorer(model.to(where), tokenizer, max_seq_len,
                  manifest.get("end_of_conversation_token", END_OF_CONVERSATION_TOKEN), batch_size=batch_size,
                  device=where, scale=AttributeScale.from_manifest(manifest),
                  length_calibration=LengthCalibration.from_manifest(manifest))
