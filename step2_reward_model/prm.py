"""Process reward models (PRM): a score for every reasoning step, read from the reward model's value head.

The value at the last token of a step (see `utils.data.steps`) is the logit of "this step is correct", trained
with binary cross-entropy against the step labels. One scalar per step, from the same linear head as outcome
rewards, rather than a language-model head over "good"/"bad" tokens or a separate classifier: the saved
checkpoint keeps exactly the layout of an outcome reward model, so every loader, export and server reads it
unchanged, and the PPO step reads step rewards from `forward_value`'s per-token values at the step ends.

`step_metrics` returns sums rather than means, so that they can be all-reduced across ranks before dividing.
"""

from __future__ import annotations

import torch


def step_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logit of each step of a `StepCollator` batch being correct, `[S]`."""
    values = model.values(batch["input_ids"], batch["attention_mask"])
    return values[batch["step_rows"], batch["step_positions"]]


def step_metrics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, step_rows: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Evaluation counts over the labelled steps (`mask`), as float64 sums.

    A step is predicted good when sigmoid(logit) > 0.5. steps / steps_correct: labelled steps and those predicted
    right. solutions: rows with a labelled step; solutions_correct: those where "every labelled step is good" is
    predicted right; first_error_correct: those where the first bad labelled step (or that there is none) is
    predicted right. Steps must be flattened row by row, in order, as `StepCollator` does.

    Rows are summed through a [batch, S] membership mask rather than scatter ops: deterministic on GPU, and small.
    """
    count = logits.numel()
    predicted_bad = mask & (logits.detach() <= 0)
    bad = mask & (labels <= 0.5)
    member = torch.arange(batch_size, device=step_rows.device)[:, None] == step_rows[None, :]
    index = torch.arange(count, device=step_rows.device)

    def first(flags: torch.Tensor) -> torch.Tensor:  # each row's first flagged step, or `count` for none
        return torch.where(member & flags, index, count).amin(-1)

    solutions = (member & mask).any(-1)
    all_good_right = (member & predicted_bad).any(-1) == (member & bad).any(-1)
    return {"steps": mask.sum().double(), "steps_correct": (mask & (predicted_bad == bad)).sum().double(),
            "solutions": solutions.sum().double(), "solutions_correct": (solutions & all_good_right).sum().double(),
            "first_error_correct": (solutions & (first(predicted_bad) == first(bad))).sum().double()}
