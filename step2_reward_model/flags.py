"""Every command-line flag, defined once: training (`main.py`), evaluation and serving (`rw_eval.py`)
and the converter (`export.py`) each pick theirs from `FLAGS`.

The training flags are DeepSpeed-Chat's step-2 flags (same names, defaults and meaning), so its
launch scripts run unchanged; added flags (`--loss`, `--dtype fp32`, `--dry_run`, ...) default to
the old behaviour.
"""

from __future__ import annotations

import argparse
import os

from rlhf_reward.utils.data.attributes import RECIPES, SCALES
from rlhf_reward.utils.data.build import MARGIN_SOURCES
from rlhf_reward.utils.data.examples import BAD_ROWS
from rlhf_reward.utils.data.steps import NEUTRAL
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN
from transformers import SchedulerType

from step2_reward_model.losses import LOSSES
from step2_reward_model.model import BACKBONE, TYPO_BACKBONE
from step2_reward_model.public_benchmarks import BENCHMARKS

# Flags whose default is read from the environment: the reference names the variable, not its value here.
ENV_DEFAULTS = {"token": "RW_EVAL_TOKEN"}

# Flag name -> argparse keywords. An entry point may override a keyword (a default, a help text).
FLAGS: dict[str, dict] = {
    # Data
    "data_path": dict(nargs="*", default=["Dahoas/rm-static"],
                      help="One or more sources: a known hub id, any hub id org/name, local/jsonfile, "
                           "or a local .json/.jsonl/.parquet/.csv file or folder."),
    "data_split": dict(default="2,4,4",
                       help="Proportions of each split for phases 1, 2, 3; the reward model takes phase 2."),
    "data_output_path": dict(default="/tmp/data_files/", help="Where split indices and tokenised data are cached."),
    "seed": dict(type=int, default=1234, help="Seeds training and fixes the data split."),
    "bad_rows": dict(choices=BAD_ROWS, default="error",
                     help="A malformed data row (unreadable, not an object, a missing field or one of the wrong "
                          "type): error names its file, line and field; skip drops it and counts it in the summary."),
    "data_weights": dict(type=float, nargs="*", default=None,
                         help="One sampling weight per --data_path: each source's share of the training examples."),
    "max_responses_per_prompt": dict(type=int, default=0, help="If > 0, keep at most this many responses of a "
                                                               "ranked list (best, worst, evenly between)."),
    "margin_source": dict(choices=MARGIN_SOURCES, default="column",
                          help="Margin in -log sigmoid(r_c - r_r - margin): the data's `margin` column, "
                               "score_chosen - score_rejected, or none."),
    "chat_template": dict(default=None,
                          help="A Jinja chat template file for conversational data (default: the tokenizer's); "
                               "saved with the tokenizer."),
    "max_seq_len": dict(type=int, default=512, help="Longest sequence, prompt + response."),
    # Model
    "model_name_or_path": dict(required=True, help="Path or hub id of the (SFT) causal LM to start from."),
    "num_padding_at_beginning": dict(type=int, default=1, help="Accepted for compatibility; the scored token "
                                                               "comes from the attention mask."),
    "trust_remote_code": dict(action="store_true", help="Allow model code from the checkpoint."),
    "dropout": dict(type=float, default=None, help="Override the model's dropout rates."),
    "disable_dropout": dict(action="store_true", help="Older DeepSpeed-Chat spelling of --dropout 0.0."),
    "add_eot_token": dict(action="store_true",
                          help=f"Add {END_OF_CONVERSATION_TOKEN} to the tokenizer as a special token."),
    "attn_implementation": dict(default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2",
                                                         "flex_attention"],
                                help="auto: flash-attention 2 when it is installed, on a GPU in fp16/bf16, with "
                                     "--no_prefix_sharing; else FlexAttention on a GPU with --max_tokens_per_batch, "
                                     "where the model has it; else the model's default (SDPA where it has it)."),
    "lora_dim": dict(type=int, default=0, help="If > 0, add LoRA adapters of this rank."),
    "lora_module_name": dict(default="decoder.layers.", help="LoRA goes on linear layers whose name contains this."),
    "only_optimize_lora": dict(action="store_true", help="Train only the adapters and the value head."),
    # Objective
    "loss": dict(default="per_token", choices=LOSSES,
                 help="per_token: DeepSpeed-Chat's loss over the tokens where the two answers differ (pairs, causal "
                      "LMs); end_token: Bradley-Terry on the end scores, over every ordered pair of a ranked list "
                      "(InstructGPT); plackett_luce: the listwise likelihood of each ranking."),
    "center_rewards_coefficient": dict(type=float, default=0.0, help="Add this times mean((r_chosen + "
                                       "r_rejected)^2) to the loss, to keep rewards centred on 0."),
    "length_head": dict(action="store_true",
                        help="ODIN (Chen et al. 2024): a length head beside the value (quality) head, both on the last "
                             "hidden state. The loss ranks their sum r_Q + r_L and adds --length_loss_coefficient x "
                             "(|pearson(r_Q, length)| + 1 - pearson(r_L, length)) over the step's answers and "
                             "--orthogonality_loss_coefficient x |cos(W_Q, W_L)|. Step 3, hf/ and every adapter get "
                             "r_Q alone; rw_eval.py reports both."),
    "length_loss_coefficient": dict(type=float, default=1.0,
                                    help="With --length_head, the weight of its length-correlation loss."),
    "orthogonality_loss_coefficient": dict(type=float, default=1.0,
                                           help="With --length_head, the weight of its head-orthogonality loss."),
    "compute_fp32_loss": dict(action="store_true", help="Compute the loss in fp32."),
    "no_bf16_to_fp32_loss": dict(action="store_false", dest="bf16_to_fp32_loss",
                                 help="With bf16, compute the loss in bf16 (default: fp32)."),
    "process_reward": dict(action="store_true", help="The same as --objective process."),
    "objective": dict(choices=["preference", "process", "regression"], default="preference",
                      help="preference: learn a reward from compared answers (--loss); process: learn whether each "
                           "step of a solution is correct from step-labelled solutions (prompt, steps, labels), "
                           "binary cross-entropy on the value at the end of each step; regression: learn one score "
                           "per attribute from rated answers (HelpSteer, UltraFeedback or {prompt, response, "
                           "attributes}), mean squared error over the rated ones; the reward is their weighted sum "
                           "(--attribute_weights)."),
    "attributes": dict(nargs="+", default=None, metavar="NAME",
                       help="With --objective regression: the attributes to learn, in this order (default: every "
                            "one the data rates)."),
    "attribute_weights": dict(nargs="+", default=None, metavar="NAME=W",
                              help="The reward is the sum of W times each attribute (unnamed ones weigh 0), or a "
                                   f"recipe: {', '.join(RECIPES)}. Default: equal weights summing to 1. Step 3 gets "
                                   "this sum as its one value head."),
    "attribute_scale": dict(choices=SCALES, default="none",
                            help="minmax: learn each attribute scaled from its training range to [0, 1], so that "
                                 "attributes rated on different ranges weigh alike; none: as rated."),
    "pair_loss_coefficient": dict(type=float, default=0.0,
                                  help="With --objective regression: add this times the Bradley-Terry loss of the "
                                       "reward on every two answers to one prompt whose weighted labels differ."),
    "step_separator": dict(default="\n\n", help="Appended to every step; the step is scored at its last token."),
    "prm_neutral": dict(choices=NEUTRAL, default="positive",
                        help="What a neutral (0) step label means: a good step, a bad one, or unlabelled."),
    "train_on_last_step_only": dict(action="store_true", help="Use only the last labelled step of each solution."),
    # Optimisation
    "per_device_train_batch_size": dict(type=int, default=16, help="Pairs per device per step."),
    "max_tokens_per_batch": dict(type=int, default=None, metavar="N",
                                 help="Size each device's training step by tokens instead of pairs (replaces "
                                      "--per_device_train_batch_size): as many prompts, with all their answers, as "
                                      "fit in N tokens, packed several to a row with no padding between them. The "
                                      "loss stays the mean per pair (per labelled step with --process_reward) over "
                                      "the global batch."),
    "per_device_eval_batch_size": dict(type=int, default=16, help="Pairs per device in evaluation."),
    "learning_rate": dict(type=float, default=5e-5, help="Peak learning rate."),
    "weight_decay": dict(type=float, default=0.0, help="AdamW weight decay (not on biases, norms)."),
    "num_train_epochs": dict(type=int, default=1, help="Passes over the training data."),
    "gradient_accumulation_steps": dict(type=int, default=1,
                                        help="Micro-batches summed into one optimizer step."),
    "lr_scheduler_type": dict(type=SchedulerType, default="cosine",
                              choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                       "constant_with_warmup"],
                              help="Learning-rate schedule after the warmup."),
    "num_warmup_steps": dict(type=int, default=0, help="Steps of linear warmup to the peak learning rate."),
    "lora_learning_rate": dict(type=float, default=5e-4, help="Learning rate of the LoRA adapters."),
    "max_nonfinite_steps": dict(type=int, default=10, help="A NaN or inf loss skips its step; this many in a row "
                                                           "stop training (with a checkpoint)."),
    # Speed and memory
    "dtype": dict(default="fp16", choices=["fp16", "bf16", "fp32"],
                  help="Training precision; fp16 on a machine without a GPU falls back to fp32."),
    "zero_stage": dict(type=int, default=0, choices=[0, 1, 2, 3],
                       help="DeepSpeed ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also weights."),
    "offload": dict(action="store_true", help="ZeRO-Offload of optimizer state (and params at stage 3)."),
    "gradient_checkpointing": dict(action="store_true", help="Recompute activations in the backward pass to save "
                                                                 "memory."),
    "no_fused_kernels": dict(action="store_true", help="Use torch's AdamW, unfused, instead of FusedAdam (GPU) or "
                                                       "fused AdamW (CPU)."),
    "no_prefix_sharing": dict(action="store_false", dest="prefix_sharing",
                              help="Give every response its own row with its own copy of the prompt, instead of "
                                   "one packed row per prompt that computes the prompt once."),
    "length_grouping_steps": dict(type=int, default=None,
                                  help="Shuffle, then sort by length within windows of this many steps, so a batch "
                                       "holds similar lengths and little padding; 0: plain shuffled batches. Default "
                                       "32, and 0 with --process_reward (grouped step batches learned worse in our "
                                       "tests) and with --length_head (whose correlations with length need batches "
                                       "of every length)."),
    "no_memory_check": dict(action="store_false", dest="memory_check", help="Train even when the estimated peak "
                            "memory of the largest batch exceeds the memory free."),
    "local_rank": dict(type=int, default=-1, help="Set by the deepspeed launcher."),
    # Evaluation, logging, saving
    "eval_interval": dict(type=int, default=0, help="If > 0, evaluate every this many steps."),
    "eval_iters": dict(type=int, default=100, help="Most evaluation batches per evaluation."),
    "eval_benchmark": dict(action="append", default=[], metavar="NAME[:PATH]",
                           help="Also score this public benchmark (rewardbench, rewardbench2, rmbench; from PATH, "
                                "else the hub) at every evaluation; repeatable."),
    "print_loss": dict(action="store_true", help="Print the loss at every logging interval."),
    "enable_tensorboard": dict(action="store_true", help="Log to TensorBoard."),
    "tensorboard_path": dict(default="step2_tensorboard", help="Where TensorBoard logs go."),
    "output_dir": dict(default=None, help="Where the trained model is saved."),
    "step3_key_prefix": dict(default=BACKBONE, choices=[BACKBONE, TYPO_BACKBONE],
                             help="Prefix of the backbone's keys in pytorch_model.bin; newer DeepSpeed-Chat step 3 "
                                  "expects the misspelt rwtranrsformer (and skips unknown keys without a word)."),
    "no_hf_export": dict(action="store_true",
                         help="Do not write OUTPUT/hf, the AutoModelForSequenceClassification export."),
    "save_interval": dict(type=int, default=0,
                          help="If > 0, save a training checkpoint (weights, optimizer, scheduler, random states, "
                               "data position) into OUTPUT/checkpoints every this many steps, and at the end."),
    "keep_last": dict(type=int, default=2, help="Keep only the newest this many training checkpoints (0: keep all)."),
    "resume": dict(nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="Continue a run exactly where it stopped: from the newest complete checkpoint in "
                        "OUTPUT/checkpoints (no value, or 'auto'; starts from the beginning if there is none) or "
                        "from the checkpoint folder given."),
    "dry_run": dict(action="store_true", help="Print the resolved configuration and exit, loading no model or data."),
    # Scoring a saved model (rw_eval.py, export.py)
    "model_path": dict(required=True, help="A step-2 output folder, its hf/ export, or a DeepSpeed-Chat step-2 "
                                           "folder."),
    "tokenizer_path": dict(default=None, help="Where the tokenizer is, when --model_path has none (DeepSpeed-Chat "
                                              "saves only vocab files)."),
    "prompt": dict(help="Score this prompt's --chosen and --rejected answers, or its --answer."),
    "chosen": dict(help="The answer that should score higher."),
    "rejected": dict(help="The answer that should score lower."),
    "answer": dict(help="Score one answer to --prompt (the PPO step's call)."),
    "steps": dict(nargs="+", help="Score each step of a solution to --prompt (process reward model)."),
    "split": dict(choices=["eval", "train"], default="eval",
                  help="Which half of the data to evaluate (default: the held-out one)."),
    "report": dict(help="Write the full evaluation as JSON to this file."),
    "plots": dict(help="Write PNG figures (histograms, reward vs length, reliability) here."),
    "batch_size": dict(type=int, default=16, help="Sequences per forward pass."),
    "benchmark": dict(choices=sorted(BENCHMARKS), default=None,
                      help="Score a public benchmark by its authors' rules: RewardBench, RewardBench 2 or RM-Bench."),
    "benchmark_path": dict(default=None, help="The benchmark's file (.json/.jsonl/.parquet) or hub id (default: the "
                                              "official hub data set, which needs the network)."),
    # Serving rewards over HTTP (rw_eval.py --serve)
    "serve": dict(action="store_true", help="Serve rewards over HTTP (POST /score, OpenRLHF's POST /get_reward)."),
    "normalize_reward": dict(action="store_true",
                             help="With --serve: answer (reward - mean) / std, the held-out rewards' mean and std "
                                  "(reward_stats.json), as OpenRLHF's --normalize_reward does."),
    "host": dict(default="127.0.0.1", help="Address to bind (default: this machine only)."),
    "port": dict(type=int, default=8000, help="Port to bind."),
    "token": dict(default=os.environ.get(ENV_DEFAULTS["token"]),
                  help="Require 'Authorization: Bearer TOKEN' (default: $RW_EVAL_TOKEN)."),
    "max_request_bytes": dict(type=int, default=4 << 20, help="Larger request bodies get 413."),
    "max_items": dict(type=int, default=256, help="Requests with more pairs or texts get 413."),
    "batch_wait_ms": dict(type=float, default=5.0,
                          help="How long the server waits for concurrent requests to fill a batch."),
}

TRAINING_FLAGS = (
    "data_path", "data_split", "data_output_path", "model_name_or_path", "num_padding_at_beginning",
    "per_device_train_batch_size", "max_tokens_per_batch", "per_device_eval_batch_size", "max_seq_len",
    "learning_rate", "weight_decay",
    "num_train_epochs", "gradient_accumulation_steps", "lr_scheduler_type", "num_warmup_steps", "output_dir", "seed",
    "local_rank", "gradient_checkpointing", "dropout", "disable_dropout", "offload", "dtype", "zero_stage",
    "lora_dim", "lora_module_name", "only_optimize_lora", "lora_learning_rate", "compute_fp32_loss",
    "no_bf16_to_fp32_loss", "eval_interval", "eval_iters",
    "eval_benchmark", "enable_tensorboard", "tensorboard_path", "add_eot_token",
    "print_loss", "no_fused_kernels", "loss", "center_rewards_coefficient", "length_head", "length_loss_coefficient",
    "orthogonality_loss_coefficient", "margin_source", "data_weights", "max_responses_per_prompt", "chat_template",
    "objective", "attributes", "attribute_weights", "attribute_scale",
    "pair_loss_coefficient", "process_reward", "step_separator", "prm_neutral",
    "train_on_last_step_only", "step3_key_prefix", "no_hf_export", "no_prefix_sharing", "length_grouping_steps",
    "attn_implementation", "save_interval", "keep_last", "resume", "max_nonfinite_steps", "bad_rows",
    "trust_remote_code", "dry_run", "no_memory_check",
)
EVAL_FLAGS = (
    "model_path", "tokenizer_path", "prompt", "chosen", "rejected", "answer", "steps", "data_path", "data_split",
    "split", "data_output_path", "bad_rows", "seed", "benchmark", "benchmark_path", "report", "plots", "batch_size",
    "max_seq_len",
    "num_padding_at_beginning", "serve", "normalize_reward", "host", "port", "token", "max_request_bytes",
    "max_items", "batch_wait_ms",
    "trust_remote_code",
)
# rw_eval.py's own defaults and help where they differ from training's.
EVAL_OVERRIDES = {
    "data_path": {"default": None, "help": "Evaluate on these sources (anything training's --data_path reads)."},
    "max_seq_len": {"default": None, "help": "Default: the training length."},
}
# The first flag of each group of `FLAGS` (in its order) and the group's title, for the flag reference.
GROUPS = {
    "data_path": "Data",
    "model_name_or_path": "Model",
    "loss": "Objective",
    "per_device_train_batch_size": "Optimisation",
    "dtype": "Speed and memory",
    "eval_interval": "Evaluation, logging, saving",
    "model_path": "Scoring a saved model",
    "serve": "Serving rewards over HTTP (--serve)",
}
# Flags that must be at least this much.
LEAST = {"save_interval": 0, "keep_last": 0, "max_nonfinite_steps": 1, "pair_loss_coefficient": 0.0,
         "length_loss_coefficient": 0.0, "orthogonality_loss_coefficient": 0.0}
# Flags of one objective, at their defaults under the other.
REGRESSION_ONLY = {"attributes": None, "attribute_weights": None, "attribute_scale": "none",
                   "pair_loss_coefficient": 0.0}
PREFERENCE_ONLY = {"loss": "per_token", "center_rewards_coefficient": 0.0, "margin_source": "column",
                   "data_weights": None, "max_responses_per_prompt": 0}
# Flags of compared answers only: a process reward model's steps have no answer length to decorrelate.
COMPARED_ANSWERS_ONLY = {"length_head": False, "length_loss_coefficient": 1.0, "orthogonality_loss_coefficient": 1.0}


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | list[str], **overrides: dict) -> None:
    """Add the flags `names` from `FLAGS`, each with the keywords in `overrides[name]` replaced."""
    for name in names:
        parser.add_argument(f"--{name}", **{**FLAGS[name], **overrides.get(name, {})})


def parse_training_args(argv: list[str] | None = None) -> argparse.Namespace:
    """main.py's flags (DeepSpeed's own included), with the defaults that depend on other flags filled in."""
    parser = argparse.ArgumentParser(description="Train a reward model (RLHF step 2) with DeepSpeed.")
    add_flags(parser, TRAINING_FLAGS)
    import deepspeed  # here, not above: rw_eval.py and export.py need no DeepSpeed

    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.disable_dropout:
        args.dropout = 0.0
    if args.process_reward and args.objective not in ("preference", "process"):
        parser.error(f"--process_reward (--objective process) and --objective {args.objective} are two different "
                     "objectives: give one")
    if args.process_reward:
        args.objective = "process"
    args.process_reward = args.objective == "process"
    if args.length_head and args.length_grouping_steps:
        parser.error("--length_head decorrelates the reward from length over each step's answers, which length "
                     "grouping makes alike in length: leave out --length_grouping_steps (0 with --length_head)")
    if args.length_grouping_steps is None:
        args.length_grouping_steps = 0 if args.objective == "process" or args.length_head else 32
    if args.max_tokens_per_batch is not None and args.max_tokens_per_batch <= 0:
        parser.error(f"--max_tokens_per_batch must be a positive number of tokens, not {args.max_tokens_per_batch}")
    for flag, least in LEAST.items():
        if getattr(args, flag) < least:
            parser.error(f"--{flag} must be at least {least}")
    for flag, default in REGRESSION_ONLY.items():
        if args.objective != "regression" and getattr(args, flag) != default:
            parser.error(f"--{flag} needs --objective regression")
    for flag, default in PREFERENCE_ONLY.items():
        if args.objective == "regression" and getattr(args, flag) != default:
            parser.error(f"--{flag} applies to --objective preference, not regression (see --pair_loss_coefficient)")
    for flag, default in COMPARED_ANSWERS_ONLY.items():
        if args.objective != "preference" and getattr(args, flag) != default:
            parser.error(f"--{flag} needs --objective preference (compared answers), not {args.objective}")
    return args


def _value(flag: str, keywords: dict) -> str:
    """How a flag's value is written on the command line: `N`, `[X ...]`, nothing for a switch."""
    if keywords.get("action") in ("store_true", "store_false"):
        return ""
    if keywords.get("action") == "append":
        return f" {keywords['metavar']}"
    name = keywords.get("metavar", flag.upper())
    shapes = {"*": f" [{name} ...]", "+": f" {name} [{name} ...]", "?": f" [{name}]"}
    return shapes.get(keywords.get("nargs"), f" {name}")


def _default(flag: str, keywords: dict) -> str:
    """A flag's default as the reference shows it, the same on every machine."""
    if flag in ENV_DEFAULTS:
        return f"`${ENV_DEFAULTS[flag]}`"
    if keywords.get("action") in ("store_true", "store_false"):
        return "off"
    if keywords.get("required"):
        return "required"
    default = keywords.get("default")
    if default is None or default == []:
        return "none"
    if isinstance(default, (list, tuple)):
        return "`" + " ".join(map(str, default)) + "`"
    if isinstance(default, str) and default != default.strip():
        return f"`{default!r}`"
    return f"`{default}`"


def _cell(text: str) -> str:
    """Text as one Markdown table cell: on one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _tables(names: tuple[str, ...], overrides: dict[str, dict]) -> list[str]:
    """The flags `names`, one table per group of `FLAGS`, each in `FLAGS`' order."""
    lines: list[str] = []
    group = shown = None
    for flag, keywords in FLAGS.items():
        group = GROUPS.get(flag, group)
        if flag not in names:
            continue
        if group != shown:
            lines += ["", f"### {group}", "", "| flag | default | choices | meaning |", "|---|---|---|---|"]
            shown = group
        keywords = {**keywords, **overrides.get(flag, {})}
        choices = ", ".join(f"`{choice}`" for choice in keywords.get("choices") or ())
        lines.append(f"| `--{flag}{_value(flag, keywords)}` | {_default(flag, keywords)} | {choices} | "
                     f"{_cell(keywords.get('help', ''))} |")
    return lines


def flag_reference() -> str:
    """The flag reference as Markdown (docs/flags.md), made from `FLAGS`: the same text on every machine."""
    lines = [
        "# Flag reference",
        "",
        "Generated from `step2_reward_model/flags.py`; do not edit by hand. Regenerate with",
        "`python -m step2_reward_model.flags > docs/flags.md` (`tests/test_docs.py` checks that this file is",
        "up to date). Each flag is defined once there; `main.py`, `rw_eval.py` and `export.py` pick theirs.",
        "",
        "## Training: `step2_reward_model/main.py`",
        "",
        "DeepSpeed-Chat's step-2 flags keep their names, defaults and meaning, so its launch scripts run",
        "unchanged; the added ones default to the old behaviour. DeepSpeed's own flags come on top",
        "(`--deepspeed`, `--deepspeed_config FILE`, whose keys override the generated DeepSpeed config).",
        *_tables(TRAINING_FLAGS, {}),
        "",
        "## Scoring, evaluating and serving: `rw_eval.py`",
        *_tables(EVAL_FLAGS, EVAL_OVERRIDES),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(flag_reference())
