"""Objectives: what a reward model learns from its data. Each is one module behind the `Objective`
interface, and `--objective` picks one from `OBJECTIVES`:

- `preference`: pairs and ranked lists (Bradley-Terry, Plackett-Luce or DeepSpeed-Chat's per-token loss);
- `process`: step-labelled solutions, a logit per step (`--process_reward` is an alias);
- `regression`: attribute-rated responses, a value per attribute whose weighted sum is the reward.

The training loop, evaluation, `rw_eval.py` and `export.py` call only this interface. Held-out data
becomes a table of float64 rows, one per scored unit (a response, a labelled step), whose column 0
is the reward and column 1 the example's index in its data set; `summarize` and `statistics` read
that table, so training, `rw_eval.py --data_path` and `export.py --data_path` compute the same
metrics and `reward_stats.json` from it (`step2_reward_model/heldout.py` makes the table).

Adding an objective is a module here with a class that provides the interface, and one line in
`OBJECTIVES`.
"""

from __future__ import annotations

import argparse

from step2_reward_model.objectives.base import Objective
from step2_reward_model.objectives.preference import Preference
from step2_reward_model.objectives.process import Process
from step2_reward_model.objectives.regression import Regression

OBJECTIVES = {"preference": Preference, "process": Process, "regression": Regression}


def objective_for(args: argparse.Namespace) -> Objective:
    """The objective `--objective` names, with its settings from the flags."""
    return OBJECTIVES[args.objective].from_args(args)


def saved_objective(manifest: dict) -> Objective:
    """The objective a saved model was trained with, from its manifest (older manifests say it by
    their fields: `process_reward`, `attributes`)."""
    name = manifest.get("objective") or ("process" if manifest.get("process_reward") else
                                         "regression" if manifest.get("attributes") else "preference")
    return OBJECTIVES[name].from_manifest(manifest)
