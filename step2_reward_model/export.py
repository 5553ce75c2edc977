#!/usr/bin/env python
"""Rewrite a reward-model folder written by an older version or by DeepSpeed-Chat in the current layout:

    python step2_reward_model/export.py OUTPUT [--data_path DATA] [--step3_key_prefix rwtranrsformer]
    python step2_reward_model/export.py OUTPUT --attribute_weights helpfulness=1 verbosity=-0.5
    python step2_reward_model/export.py OUTPUT --length_calibration --data_path DATA

It writes step-3 weights, tokenizer, manifest and the Hugging Face export `hf/` and, with
--data_path, the reward statistics over that data's held-out split. For a multi-attribute model,
--attribute_weights sets new weights of the reward, collapsed into the step-3 value head without
retraining. --length_calibration fits the reward's dependence on answer length over the held-out
split and stores it in the manifest, from where every reward `Scorer` gives is calibrated
(`calibration.py`); --remove_length_calibration takes it out. Reward statistics of a changed reward
are removed unless --data_path recomputes them.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from rlhf_reward.utils.data.attributes import AttributeScale, parse_weights
from rlhf_reward.utils.errors import UserError, exit_status
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN

from step2_reward_model.calibration import LengthCalibration, fit_length_calibration
from step2_reward_model.flags import add_flags
from step2_reward_model.heldout import HeldOut, length_columns, score_split
from step2_reward_model.hf_export import HF_DIR
from step2_reward_model.model import position_limit_problem
from step2_reward_model.objectives import saved_objective
from step2_reward_model.objectives.base import DataRequest
from step2_reward_model.output import (
    STATS_NAME,
    export_skipped_error,
    load_manifest,
    load_reward_model,
    load_scoring_tokenizer,
    load_stats,
    save_reward_model,
)
from step2_reward_model.report import correlation_table
from step2_reward_model.scoring import Scorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write the current export layout for an existing reward model folder.")
    p.add_argument("model_path", help="A step-2 output folder, or one DeepSpeed-Chat's step 2 wrote.")
    p.add_argument("--output_dir", default=None, help="Where to write (default: model_path itself).")
    calibration = p.add_mutually_exclusive_group()
    calibration.add_argument("--length_calibration", action="store_true",
                             help="Fit a length calibration on the held-out split of --data_path (a preference "
                                  "model): the reward minus its local mean at the answer's length.")
    calibration.add_argument("--remove_length_calibration", action="store_true",
                             help="Take the length calibration out of the manifest: the reward is the model's again.")
    add_flags(p, ["tokenizer_path", "data_path", "data_split", "data_output_path", "bad_rows", "seed", "max_seq_len",
                  "step3_key_prefix", "trust_remote_code", "attribute_weights"],
              data_path={"default": None, "help": "Compute reward statistics on this data."},
              max_seq_len={"default": None, "help": "Default: the manifest's, else 512."})
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> None:
    model = load_reward_model(args.model_path, trust_remote_code=args.trust_remote_code)
    tokenizer = load_scoring_tokenizer(args.model_path, args.tokenizer_path, args.trust_remote_code)
    manifest = load_manifest(args.model_path)
    manifest.setdefault("end_of_conversation_token", END_OF_CONVERSATION_TOKEN)
    manifest["max_seq_len"] = args.max_seq_len or manifest.get("max_seq_len", 512)
    if problem := position_limit_problem(model.config, manifest["max_seq_len"]):
        raise UserError(problem)
    if args.length_calibration and not args.data_path:
        raise UserError("--length_calibration is fitted on held-out data: give --data_path")
    if args.attribute_weights:
        reweigh(model, args.attribute_weights)
        if manifest.pop("length_calibration", None) is not None:
            print("note: removed the length calibration of the old weights (--length_calibration fits it anew)")
    if args.remove_length_calibration or args.length_calibration:
        manifest.pop("length_calibration", None)
    changed = args.attribute_weights or args.remove_length_calibration or args.length_calibration
    stats = None
    if args.data_path:
        held_out, label = score_held_out(model, tokenizer, manifest, args)
        if args.length_calibration:
            manifest["length_calibration"] = calibrate(held_out, label).manifest()
        stats = held_out.objective.statistics(held_out.table, label)
    elif not changed:  # the held-out statistics still hold: they go into hf/config.json too
        stats = load_stats(args.model_path)
    output_dir = args.output_dir or args.model_path
    if changed and stats is None and os.path.isfile(os.path.join(output_dir, STATS_NAME)):
        os.remove(os.path.join(output_dir, STATS_NAME))
        print(f"note: removed {STATS_NAME}, the rewards before this change (--data_path recomputes it)")
    skipped = save_reward_model(model, tokenizer, output_dir, meta=manifest, stats=stats,
                                key_prefix=args.step3_key_prefix)
    if skipped:
        raise export_skipped_error(output_dir, skipped)
    print(f"wrote {output_dir} (step-3 weights with prefix {args.step3_key_prefix}, manifest, {HF_DIR}/"
          f"{', reward_stats.json' if stats else ''})")


def reweigh(model, specs: list[str]) -> None:
    """Give a multi-attribute model new weights for its reward."""
    if model.attributes is None:
        raise UserError("--attribute_weights: this model has one reward, not attributes (train it with "
                        "--objective regression)")
    names = model.attributes.names
    weights = parse_weights(specs, list(names))
    model.set_attributes(replace(model.attributes, weights=tuple(weights)), model.v_head.weight.data)
    print("reward = " + " + ".join(f"{weight:g} * {name}" for name, weight in zip(names, weights, strict=True)
                                   if weight))


def score_held_out(model, tokenizer, manifest: dict, args: argparse.Namespace) -> tuple[HeldOut, str]:
    """The held-out split of --data_path scored as training scores it (`step2_reward_model/heldout.py`),
    with the model's current weights and the manifest's length calibration, and what that data was."""
    scorer = Scorer(model, tokenizer, manifest["max_seq_len"], manifest["end_of_conversation_token"],
                    scale=AttributeScale.from_manifest(manifest),
                    length_calibration=LengthCalibration.from_manifest(manifest))
    request = DataRequest.from_args(args, scorer.max_seq_len, log=lambda message: print(message, file=sys.stderr))
    objective = saved_objective({**manifest, "attributes": current_attributes(model, manifest)})
    return score_split(scorer, objective, request, "eval"), request.label()


def calibrate(held_out: HeldOut, label: str) -> LengthCalibration:
    """Fit the length calibration on a held-out table of uncalibrated rewards and calibrate the table."""
    reward, length = length_columns(held_out.objective)
    calibration = fit_length_calibration(held_out.table[:, length], held_out.table[:, reward], label)
    held_out.calibrate(calibration)
    print(f"length calibration: fitted on {calibration.answers} answers ({label}), {len(calibration.lengths)} knots")
    print(correlation_table("Length calibration", "reward", held_out.calibration_effect()))
    return calibration


def current_attributes(model, manifest: dict) -> dict | None:
    """The manifest's attribute fields with the model's names and weights (--attribute_weights changes them)."""
    if model.attributes is None:
        return None
    return {**manifest.get("attributes", {}), **model.attributes.manifest()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
