"""OUTPUT, the folder training hands on: what step 3 loads and what anyone else needs to use the
rewards; saving it, and loading it back to score with.

    pytorch_model.bin   the whole RewardModel (`rwtransformer.*`, `v_head.weight`), DeepSpeed-Chat's contract
    config.json, tokenizer files
    reward_model.json   the manifest: scored token, padding, end-of-conversation token, max length, ...
    reward_stats.json   reward mean, std and quantiles over the held-out set (for reward normalisation)
    hf/                 the AutoModelForSequenceClassification export (safetensors)
    attribute_head.safetensors   a multi-attribute model's whole head, one row per attribute

A multi-attribute model (`--objective regression`) gives step 3 what it can load: `v_head.weight` in
`pytorch_model.bin` is the head collapsed to the weighted sum of the attributes (`w^T W`, one row),
so its reward is that sum. The whole head stays in `attribute_head.safetensors` (and in `hf/`, one
label per attribute), with the names and weights in the manifest: `load_reward_model` scores each
attribute again, and `export.py --attribute_weights` collapses it anew. A model trained with
`--length_head` (ODIN) is saved the same way, its head being (quality, length) with weights (1, 0):
step 3 and `hf/` (one label) get the quality reward alone, and the length head stays beside it.

The state is gathered on rank 0 one parameter at a time (ZeRO-3 shards included), written into a
staging folder, then moved into place file by file with atomic renames, so a crash while writing
never leaves a half-written `pytorch_model.bin` where a good one was. The export is optional: a
model that cannot be exported (no sequence-classification class takes its weights) still gets
everything else, and the manifest says why `hf/` is missing; for a model type known to have no
such class (DeBERTa-v2, T5) that is a note, not a failure.

Loading rebuilds the model from its config alone and reads tensors only (`weights_only=True`, or
the export's safetensors); DeepSpeed-Chat's own step-2 folders load too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass

import torch
from rlhf_reward.utils.data.chat import own_template
from rlhf_reward.utils.errors import UserError, first_line
from rlhf_reward.utils.files import replace_folder, write_json
from rlhf_reward.utils.runtime import barrier
from torch import nn

from step2_reward_model.hf_export import HF_DIR, ExportUnavailable, handoff_tokenizer, save_sequence_classification
from step2_reward_model.lora import plain_state_dict
from step2_reward_model.model import (
    BACKBONE,
    ENCODERS,
    TYPO_BACKBONE,
    Attributes,
    RewardModel,
    load_config,
    new_backbone,
)

WEIGHTS_NAME = "pytorch_model.bin"
MANIFEST_NAME = "reward_model.json"
STATS_NAME = "reward_stats.json"
ATTRIBUTE_HEAD_NAME = "attribute_head.safetensors"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
MANIFEST_FORMAT = 1


def gather_state_dict(model: nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """The full state dict on CPU at rank 0 (empty elsewhere)."""
    import deepspeed  # here: loading and scoring a saved model need no DeepSpeed

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    state: dict[str, torch.Tensor] = {}
    for name in model.state_dict().keys():
        if name in params:
            with deepspeed.zero.GatheredParameters([params[name]], enabled=zero_stage == 3):
                if rank == 0:
                    state[name] = params[name].detach().cpu().clone()
        elif rank == 0:
            state[name] = buffers[name].detach().cpu().clone()
    return state


def step3_state(state: dict[str, torch.Tensor], key_prefix: str) -> dict[str, torch.Tensor]:
    """The saved keys: `rwtransformer.*` (DeepSpeed-Chat's documented name) or the newer
    DeepSpeed-Chat spelling `rwtranrsformer.*`, whose step 3 silently skips keys it does not know."""
    return {(key_prefix + key[len(BACKBONE):] if key.startswith(BACKBONE) else key): value
            for key, value in state.items()}


@dataclass(frozen=True)
class Shards:
    """Where the weights to save are: the ZeRO stage that partitions them, and this process's rank
    (every rank takes part in gathering ZeRO-3 shards; rank 0 writes)."""

    zero_stage: int = 0
    rank: int = 0


def save_reward_model(model: nn.Module, tokenizer, output_dir: str, meta: dict, stats: dict | None = None,
                      key_prefix: str = BACKBONE, hf_export: bool = True, shards: Shards = Shards()) -> str | None:
    """Write OUTPUT: the step-3 `pytorch_model.bin`, config, tokenizer, the manifest, the reward
    statistics (when given) and the Hugging Face export in `hf/`. Returns why the export failed
    (on rank 0), or None; everything else is saved either way. A model type known to have no export
    gets a note and the reason in the manifest, and None."""
    rank = shards.rank
    state = plain_state_dict(gather_state_dict(model, shards.zero_stage, rank))
    skipped = None
    if rank == 0:
        # One tokenizer for OUTPUT and hf/, so the pad id, chat template and truncation agree everywhere.
        tokenizer = handoff_tokenizer(tokenizer, meta["end_of_conversation_token"], meta["max_seq_len"])
        config = copy.deepcopy(model.rwtransformer.config)
        if tokenizer.pad_token_id < config.vocab_size:  # an added pad beyond the step-3 embedding stays in hf/ only
            config.pad_token_id = tokenizer.pad_token_id
        manifest = {**meta, **handoff_manifest(tokenizer, meta, config), "step3_key_prefix": key_prefix,
                    "hf_export": HF_DIR if hf_export else None}
        if model.attributes is not None:
            manifest["attributes"] = {**meta.get("attributes", {}), **model.attributes.manifest(),
                                      "head": ATTRIBUTE_HEAD_NAME}
        manifest.pop("hf_export_skipped", None)  # a converted folder's manifest may carry an old reason
        os.makedirs(output_dir, exist_ok=True)
        staging = os.path.join(output_dir, f".saving-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        served_only = model.attributes is not None and not model.attributes.hf_labels  # hf/: the reward alone
        hf_state = served_state(state, model.attributes) if served_only else state
        hf_manifest = manifest_without_head(manifest) if served_only else manifest
        hf_labels = model.attributes.names if model.attributes is not None and not served_only else None
        if hf_export:
            hf_staging = os.path.join(staging, HF_DIR)
            try:
                save_sequence_classification(hf_state, config, tokenizer, hf_staging, hf_labels, stats)
                write_json(os.path.join(hf_staging, MANIFEST_NAME), {**hf_manifest, "padding_side": "right"})
            except UserError as err:
                shutil.rmtree(hf_staging, ignore_errors=True)
                manifest.update(hf_export=None, hf_export_skipped=str(err))
                if isinstance(err, ExportUnavailable):
                    print(f"note: {err}; the manifest records why there is no {HF_DIR}/")
                else:
                    skipped = str(err)
        if model.attributes is not None:
            from safetensors.torch import save_file

            save_file({"weight": state["v_head.weight"].contiguous()}, os.path.join(staging, ATTRIBUTE_HEAD_NAME))
            state = served_state(state, model.attributes)
        torch.save(step3_state(state, key_prefix), os.path.join(staging, WEIGHTS_NAME))
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(os.path.join(staging, MANIFEST_NAME), manifest)
        if stats is not None:
            write_json(os.path.join(staging, STATS_NAME), stats)
        for name in sorted(os.listdir(staging), key=lambda n: n == WEIGHTS_NAME):  # weights last
            if os.path.isdir(os.path.join(staging, name)):
                replace_folder(os.path.join(staging, name), os.path.join(output_dir, name))
            else:
                os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
        if "hf_export_skipped" in manifest:  # an export of an earlier run would not match these weights
            shutil.rmtree(os.path.join(output_dir, HF_DIR), ignore_errors=True)
    barrier()
    return skipped


def export_skipped_error(output_dir: str, reason: str) -> UserError:
    """The one line a command ends with when it saved the model but not its export."""
    return UserError(f"saved the reward model to {output_dir} (step 3 loads it), but not its Hugging Face export "
                     f"{HF_DIR}/: {reason} (--no_hf_export skips the export)")


def handoff_manifest(tokenizer, meta: dict, config) -> dict:
    """What the PPO step must reproduce to get the rewards training measured."""
    eot = meta["end_of_conversation_token"]
    template = getattr(tokenizer, "chat_template", None)
    return {"format": MANIFEST_FORMAT, **scoring_manifest(config),
            "padding_side": "right (any padding scores the same: positions and the scored token come from the mask)",
            "end_of_conversation_token": eot,
            "end_of_conversation_token_ids": tokenizer(eot, add_special_tokens=False)["input_ids"],
            "truncation": "prompt cut from the left; answers kept whole",
            "pad_token_id": tokenizer.pad_token_id, "tokenizer_length": len(tokenizer),
            "chat_template": "the model's own" if own_template(tokenizer) else "DeepSpeed-Chat's text layout",
            "conversations": "rendered with the chat template and tokenised without special tokens; the reward is "
                             "read at the last token, nothing appended",
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str)
            else None}


def scoring_manifest(config) -> dict:
    """Which token is scored, and whether step 3 can start its PPO critic from this model: the critic
    needs a value per generated token from a causal LM, which an encoder's pooled score is not."""
    encoder = ENCODERS.get(config.model_type)
    if encoder is None:
        return {"scored_token": "the last token the attention mask marks: the end of prompt + answer + "
                                "end-of-conversation token",
                "ppo_critic": True, "ppo_critic_note": "a causal LM: step 3 can start its critic from these weights"}
    if encoder.first_token:
        scored = "the first token the attention mask marks (the tokenizer's leading [CLS])" + \
            (", through the backbone's pooler (dense + tanh)" if encoder.pooler else "")
    else:
        scored = "the last token the attention mask marks (the </s> the tokenizer appends)"
    return {"scored_token": f"{scored}; an encoder sees the whole prompt + answer + end-of-conversation "
                            "token from there",
            "ppo_critic": False,
            "ppo_critic_note": f"model type {config.model_type} is an encoder: one score per sequence, not the "
                               "value per generated token that the PPO critic needs. Start the critic from a "
                               "causal LM, and use this model as the reward model only through this package "
                               "(load_reward_model, or rw_eval.py --serve), which scores it as training did"}


def load_reward_model(path: str, trust_remote_code: bool = False) -> RewardModel:
    """Rebuild a saved reward model from its config alone and load its weights, tensors only:
    `pytorch_model.bin` (ours, or DeepSpeed-Chat's under either spelling of its prefix), or the
    `hf/` sequence-classification export. Missing or unexpected keys are an error, never a
    silently random head."""
    if not os.path.isdir(path):
        raise UserError(f"--model_path {path}: no such folder")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"{path}: no config.json (not a step-2 output folder?)")
    config = load_config(path, trust_remote_code, "--model_path")
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
            return _load_sequence_classification(path, trust_remote_code)
        raise UserError(f"{path}: no {WEIGHTS_NAME} and no sequence-classification export "
                        "(not a step-2 output folder?)")
    model = RewardModel(new_backbone(config, trust_remote_code))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{weights}: refused, it holds more than tensors ({first_line(err, 200)})") from None
    state = {(BACKBONE + key[len(TYPO_BACKBONE):] if key.startswith(TYPO_BACKBONE + ".") else key): value
             for key, value in state.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    resized = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or resized:
        raise UserError(f"{weights}: does not match {config_file} "
                        f"(missing keys: {', '.join(missing[:5]) or 'none'}; "
                        f"unexpected keys: {', '.join(unexpected[:5]) or 'none'}; "
                        f"other shapes: {', '.join(resized[:5]) or 'none'})")
    model.load_state_dict(state)
    attach_attribute_head(model, path)
    return model.eval()


def served_state(state: dict, attributes: Attributes) -> dict:
    """A multi-attribute model's weights with its head collapsed to the one reward it serves (`w^T W`)."""
    return {**state, "v_head.weight": attributes.collapse(state["v_head.weight"])}


def manifest_without_head(manifest: dict) -> dict:
    """The manifest of a folder that holds the served reward alone: no attribute head to load, no length
    head to report."""
    return {key: value for key, value in manifest.items() if key not in ("attributes", "length_head")}


def attach_attribute_head(model: RewardModel, path: str) -> None:
    """Give a multi-attribute model's step-3 weights back their whole head (`attribute_head.safetensors`,
    named and weighted by the manifest), once it is checked to collapse to the saved `v_head`; other
    folders are left as they are."""
    attributes = load_manifest(path).get("attributes")
    head_file = os.path.join(path, ATTRIBUTE_HEAD_NAME)
    if not attributes or not os.path.isfile(head_file):
        return
    from safetensors.torch import load_file

    weight = load_file(head_file)["weight"]
    head = Attributes.from_manifest(attributes)
    # Both were saved from one tensor, in its dtype (fp16 after fp16 training), so they agree exactly.
    if weight.shape != (len(head.names), model.v_head.in_features) or not torch.allclose(
            head.collapse(weight).float(), model.v_head.weight.data.float(), rtol=1e-5, atol=1e-6):
        raise UserError(f"{head_file}: does not match the value head in {WEIGHTS_NAME} with the manifest's weights "
                        "(written by another run?): rewrite the folder with export.py")
    model.set_attributes(head, weight)


def _load_sequence_classification(path: str, trust_remote_code: bool) -> RewardModel:
    """Our `hf/` export (or any one-label sequence classifier) as a RewardModel."""
    from transformers import AutoModelForSequenceClassification

    try:
        classifier, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load the sequence-classification export: {first_line(err)}") from None
    problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)}
    if problems:
        details = "; ".join(f"{name}: {', '.join(map(str, sorted(keys)[:5]))}" for name, keys in problems.items())
        raise UserError(f"{path}: weights do not match config.json ({details})")
    attributes = load_manifest(path).get("attributes")
    labels = len(attributes["names"]) if attributes else 1
    if classifier.config.num_labels != labels:
        raise UserError(f"{path}: a reward model has one label (or one per attribute its {MANIFEST_NAME} names), "
                        f"this classifier has {classifier.config.num_labels}")
    prefix = classifier.base_model_prefix
    head = {name: param for name, param in classifier.named_parameters() if not name.startswith(f"{prefix}.")}
    weights = [param for name, param in head.items() if not name.endswith(".bias")]
    biases = [param for name, param in head.items() if name.endswith(".bias")]
    model = RewardModel(getattr(classifier, prefix))
    if attributes:
        model.set_attributes(Attributes.from_manifest(attributes))
    # BERT's classifier has a bias, which our export sets to zero; the value head has none.
    if len(weights) != 1 or weights[0].shape != model.v_head.weight.shape or len(biases) > 1 \
            or any(bias.any() for bias in biases):
        raise UserError(f"{path}: expected one linear score head of width {model.v_head.in_features} "
                        "without a bias (or with a zero one)")
    model.v_head.weight.data.copy_(weights[0].data)
    return model.eval()


def load_manifest(path: str) -> dict:
    """What training recorded for the scorer (max length, end token, ...); {} when absent,
    as in a folder DeepSpeed-Chat wrote."""
    return _read_json(os.path.join(path, MANIFEST_NAME)) or {}


def _read_json(path: str) -> dict | None:
    """A JSON file of the folder, or None when it is absent; a damaged one is a one-line error."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_stats(path: str) -> dict | None:
    """The folder's reward statistics (`reward_stats.json`), or None when it has none."""
    return _read_json(os.path.join(path, STATS_NAME))


def reward_mean_std(path: str) -> tuple[float, float]:
    """The held-out rewards' mean and std that PPO normalises rewards by: from `reward_stats.json`, or
    from an `hf/` export's config.json."""
    stats = load_stats(path)
    try:
        rewards = stats["all"] if stats is not None else _read_json(os.path.join(path, "config.json"))
        mean, std = float(rewards["mean"]), float(rewards["std"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: no reward mean and std ({STATS_NAME} or config.json 'mean'/'std'); they come "
                        "from the held-out split at the end of training, or export.py --data_path") from None
    if not std > 0:
        raise UserError(f"{path}: the reward std is {std}, so rewards cannot be normalised")
    return mean, std


def load_scoring_tokenizer(path: str, tokenizer_path: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved beside the model; for a DeepSpeed-Chat folder, which holds only vocab
    files, the one of the model it was trained from (config `_name_or_path`), unless given."""
    from transformers import AutoTokenizer

    source = tokenizer_path
    if source is None:
        if any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            source = path
        else:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                source = json.load(handle).get("_name_or_path") or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load its tokenizer from '{source}' (pass --tokenizer_path): "
                        f"{first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
