#!/usr/bin/env python
"""The standard Hugging Face export of a reward model, and a converter for an existing OUTPUT.

`OUTPUT/hf` loads with `AutoModelForSequenceClassification.from_pretrained(OUTPUT/hf)`: one label,
safetensors, and a tokenizer that pads on the right. Its logit is our end score on the same token
ids: transformers scores the rightmost token that is not the pad id, so the export gets a pad
token that no text ever produces (a tokenizer whose pad is eos, like GPT-2's, would otherwise make
it score the token before a final eos). A BERT export scores [CLS] through BERT's pooler, as
training does, with the classifier's bias zero. Encoders with no matching classifier (DeBERTa-v2,
T5) are known in advance: their export is skipped with the reason, which is no failure.

Converter, for a folder written by an older version or by DeepSpeed-Chat:

    python step2_reward_model/export.py OUTPUT [--data_path DATA] [--step3_key_prefix rwtranrsformer]

It rewrites OUTPUT in the current layout (step-3 weights, tokenizer, manifest, hf/) and, with
--data_path, the reward statistics over that data's held-out split.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from step2_reward_model.model import BACKBONE, ENCODERS, TYPO_BACKBONE  # noqa: E402
from utils.data.collate import round_up  # noqa: E402
from utils.data.examples import BAD_ROWS  # noqa: E402
from utils.errors import UserError, exit_status  # noqa: E402

HF_DIR = "hf"
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class ExportUnavailable(UserError):
    """The model type has no sequence-classification class for our weights: known before trying."""


def export_tokenizer(tokenizer, end_of_conversation_token: str):
    """A copy padding on the right with a pad token that never occurs in scored text."""
    export = copy.deepcopy(tokenizer)
    export.padding_side = "right"
    reserved = {export.eos_token_id, export.bos_token_id,
                *export(end_of_conversation_token, add_special_tokens=False)["input_ids"]}
    if export.pad_token_id is None or export.pad_token_id in reserved:
        vocab = export.get_vocab()
        free = [token for token in PAD_CANDIDATES if token in vocab and vocab[token] not in reserved]
        if free:
            export.pad_token = free[0]
        else:
            export.add_special_tokens({"pad_token": PAD_CANDIDATES[-1]})
    return export


def sequence_classification_state(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], object]:
    """Our `rwtransformer.*` / `v_head.weight` state renamed for `AutoModelForSequenceClassification`
    of `config` (num_labels 1); the embedding grows in steps of 8 rows if the vocabulary needs it,
    and a head bias (BERT's classifier has one) is zero, as our value head has none."""
    from transformers import AutoModelForSequenceClassification

    encoder = ENCODERS.get(config.model_type)
    if encoder is not None and encoder.no_export:
        raise ExportUnavailable(f"model type {config.model_type} has no Hugging Face export: {encoder.no_export}")
    with torch.device("meta"):
        target = AutoModelForSequenceClassification.from_config(config)
    prefix = target.base_model_prefix
    embedding = target.get_input_embeddings().weight
    embedding_key = next(name for name, param in target.named_parameters() if param is embedding)
    renamed, missing = {}, []
    for key, expected in target.state_dict().items():
        source = f"{BACKBONE}.{key[len(prefix) + 1:]}" if key.startswith(f"{prefix}.") else "v_head.weight"
        if source not in state:
            missing.append(key)
            continue
        tensor = state[source]
        if source == "v_head.weight" and key.endswith(".bias") and expected.shape == (1,):
            tensor = tensor.new_zeros(1)
        if key == embedding_key and tensor.shape[0] < expected.shape[0]:
            tensor = torch.cat([tensor, tensor.new_zeros(expected.shape[0] - tensor.shape[0], tensor.shape[1])])
        if tensor.shape != expected.shape:
            missing.append(f"{key} (shape {tuple(tensor.shape)}, expected {tuple(expected.shape)})")
            continue
        renamed[key] = tensor.contiguous()
    unused = sorted(set(state) - {f"{BACKBONE}.{k[len(prefix) + 1:]}" for k in renamed} - {"v_head.weight"})
    if missing or unused:
        raise UserError(f"cannot export as {type(target).__name__}: keys without a source: "
                        f"{', '.join(missing[:5]) or 'none'}; "
                        f"our keys it has no place for: {', '.join(unused[:5]) or 'none'}")
    return renamed, type(target)


def save_sequence_classification(state: dict[str, torch.Tensor], config, tokenizer, folder: str,
                                 end_of_conversation_token: str) -> None:
    """Write the export into `folder` (which the caller then moves into place)."""
    from safetensors.torch import save_file

    tokenizer = export_tokenizer(tokenizer, end_of_conversation_token)
    config = copy.deepcopy(config)
    config.vocab_size = max(config.vocab_size, round_up(len(tokenizer), 8))
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    tensors, model_class = sequence_classification_state(state, config)
    config.architectures = [model_class.__name__]
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write the current export layout for an existing reward model folder.")
    p.add_argument("model_path", help="A step-2 output folder, or one DeepSpeed-Chat's step 2 wrote.")
    p.add_argument("--output_dir", default=None, help="Where to write (default: model_path itself).")
    p.add_argument("--tokenizer_path", default=None, help="Tokenizer, when model_path has only vocab files.")
    p.add_argument("--data_path", nargs="*", default=None, help="Compute reward statistics on this data.")
    p.add_argument("--data_split", default="2,4,4")
    p.add_argument("--data_output_path", default="/tmp/data_files/")
    p.add_argument("--bad_rows", choices=BAD_ROWS, default="error",
                   help="A malformed data row: error names its file, line and field; skip drops and counts it.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max_seq_len", type=int, default=None, help="Default: the manifest's, else 512.")
    p.add_argument("--step3_key_prefix", default=BACKBONE, choices=[BACKBONE, TYPO_BACKBONE],
                   help="Attribute name step 3 expects (newer DeepSpeed-Chat spells it rwtranrsformer).")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> None:
    from step2_reward_model.checkpoint import export_skipped_error, save_reward_model
    from step2_reward_model.evaluation import reward_statistics
    from step2_reward_model.model import load_manifest, load_reward_model, load_scoring_tokenizer
    from step2_reward_model.scoring import Scorer, score_data
    from utils.utils import END_OF_CONVERSATION_TOKEN

    model = load_reward_model(args.model_path, trust_remote_code=args.trust_remote_code)
    tokenizer = load_scoring_tokenizer(args.model_path, args.tokenizer_path, args.trust_remote_code)
    manifest = load_manifest(args.model_path)
    manifest.setdefault("end_of_conversation_token", END_OF_CONVERSATION_TOKEN)
    manifest["max_seq_len"] = args.max_seq_len or manifest.get("max_seq_len", 512)
    stats = None
    if args.data_path:
        scorer = Scorer(model, tokenizer, manifest["max_seq_len"], manifest["end_of_conversation_token"])
        scored, table, _ = score_data(scorer, args.data_path, args.data_split, "eval", args.seed, args.data_output_path,
                                      REPO_ROOT, log=lambda message: print(message, file=sys.stderr),
                                      bad_rows=args.bad_rows)
        stats = reward_statistics(scored["chosen"], scored["rejected"], "--data_path " + " ".join(args.data_path),
                                  all_rewards=table[:, 0], margins=scored["chosen"] - scored["rejected"])
    output_dir = args.output_dir or args.model_path
    skipped = save_reward_model(model, tokenizer, output_dir, zero_stage=0, rank=0, meta=manifest, stats=stats,
                                key_prefix=args.step3_key_prefix)
    if skipped:
        raise export_skipped_error(output_dir, skipped)
    print(f"wrote {output_dir} (step-3 weights with prefix {args.step3_key_prefix}, manifest, {HF_DIR}/"
          f"{', reward_stats.json' if stats else ''})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
