"""Ready adapters for the RL frameworks that take a reward model, each scoring through `Scorer` exactly as
training read the text (`tokenize.encode_examples`):

- TRL: `RewardFunction(OUTPUT)` is a callable for `reward_funcs` (GRPO, RLOO, online DPO, ...). It takes
  the prompts and completions TRL passes, as text or as chat messages.
- verl: `compute_score` is a `custom_reward_function` (see training_scripts/verl/reward.yaml). verl
  passes only the response, so each row's `extra_info` must hold its prompt (text or messages).
- OpenRLHF: its remote reward model is `rw_eval.py --serve` (POST /get_reward), in server.py.

Each model is loaded once per process. `normalize=True` gives (reward - mean) / std with the held-out
mean and std training measured.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from rlhf_reward.utils.data.fields import Messages
from rlhf_reward.utils.errors import UserError

from step2_reward_model.output import reward_mean_std
from step2_reward_model.scoring import load_scorer


class RewardFunction:
    """TRL's reward function: `GRPOTrainer(..., reward_funcs=[RewardFunction("OUTPUT")])`. TRL calls it
    with keyword arguments (`prompts`, `completions` and the dataset's other columns) and logs it by its
    `__name__`. An answer longer than the model's max_seq_len keeps its end, as a benchmark runner cuts it."""

    def __init__(self, model_path: str, batch_size: int = 16, normalize: bool = False, device: str | None = None,
                 name: str = "reward_model") -> None:
        self.scorer = load_scorer(model_path, batch_size=batch_size, device=device)
        self.normalize = reward_mean_std(model_path) if normalize else None
        self.__name__ = name

    def __call__(self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages],
                 **columns: object) -> list[float]:
        sequences = self.scorer.encode_pairs(list(prompts), list(completions), cut_long=True)
        rewards = self.scorer.score_ids(sequences)
        if self.normalize is None:
            return rewards
        mean, std = self.normalize
        return [(reward - mean) / std for reward in rewards]


@functools.lru_cache(maxsize=4)
def _reward_function(model_path: str, normalize: bool) -> RewardFunction:
    return RewardFunction(model_path, normalize=normalize)


def compute_score(data_source: str, solution_str: str, ground_truth: object, extra_info: dict | None = None,
                  model_path: str | None = None, normalize: bool = False, prompt_key: str = "prompt",
                  **kwargs: object) -> float:
    """verl's `custom_reward_function`: the reward of `solution_str` (the response alone, as verl decodes it)
    after `extra_info[prompt_key]` (the row's prompt: text, or chat messages the response answers).
    `model_path` (and `normalize`) come from `reward_kwargs`; verl's other keyword arguments are ignored."""
    if model_path is None:
        raise UserError("compute_score needs model_path: set reward.custom_reward_function.reward_kwargs.model_path")
    prompt = (extra_info or {}).get(prompt_key)
    if prompt is None:
        raise UserError(f"compute_score: extra_info has no '{prompt_key}' (put each row's prompt there: verl passes "
                        "the response alone)")
    answer: str | Messages = solution_str
    if not isinstance(prompt, str):  # messages (parquet gives them back as an array of dicts)
        prompt = [dict(message) for message in prompt]
        answer = [{"role": "assistant", "content": solution_str}]
    return _reward_function(model_path, normalize)([prompt], [answer])[0]
