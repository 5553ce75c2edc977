"""The standard Hugging Face export of a reward model, `OUTPUT/hf`, and the tokenizer every consumer gets.

`OUTPUT/hf` loads with `AutoModelForSequenceClassification.from_pretrained(OUTPUT/hf)`: one label
(a multi-attribute model: one per attribute, `id2label` naming them), safetensors, and a tokenizer
that pads on the right. Its logit is our end score (or attribute scores) on the same token ids:
transformers scores the rightmost token that is not the pad id, so the export gets a pad
token that no text ever produces (a tokenizer whose pad is eos, like GPT-2's, would otherwise make
it score the token before a final eos). A BERT export scores [CLS] through BERT's pooler, as
training does, with the classifier's bias zero. Encoders with no matching classifier (DeBERTa-v2,
T5) are known in advance: their export is skipped with the reason, which is no failure.

What the RL frameworks read besides the weights is in the files too (`handoff_tokenizer`,
`save_sequence_classification`): a chat template that renders a conversation to the text training read
(the model's own, or DeepSpeed-Chat's layout), truncation from the left at training's max_seq_len, and
in config.json the reward `mean` and `std` (OpenRLHF's `normalize_reward`) and `value_head_prefix`.
"""

from __future__ import annotations

import copy
import os

import torch
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import special_affixes

from step2_reward_model.model import BACKBONE, ENCODERS, embedding_rows

HF_DIR = "hf"
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class ExportUnavailable(UserError):
    """The model type has no sequence-classification class for our weights: known before trying."""


def handoff_tokenizer(tokenizer, end_of_conversation_token: str, max_seq_len: int):
    """The tokenizer saved in OUTPUT and OUTPUT/hf: a copy padding on the right with a pad token that
    never occurs in scored text, cutting from the left to `max_seq_len` tokens (training keeps the
    answer's end), with the chat template training read conversations through (`chat.scoring_template`:
    the model's own, trimmed after the last end-of-turn token, else DeepSpeed-Chat's layout)."""
    from rlhf_reward.utils.data.chat import scoring_template

    export = copy.deepcopy(tokenizer)
    export.padding_side, export.truncation_side, export.model_max_length = "right", "left", max_seq_len
    # save_pretrained writes the init arguments, not the attributes set since
    export.init_kwargs.update(padding_side="right", truncation_side="left", model_max_length=max_seq_len)
    export.chat_template = scoring_template(tokenizer, None, end_of_conversation_token)
    if bos_only_in_template(export):
        export.bos_token = None  # verl strips a rendering's leading bos text, for the tokenizer to add it back
        export.init_kwargs["bos_token"] = None
    if export.pad_token_id is None or export.pad_token_id in scored_ids(export, end_of_conversation_token):
        export.pad_token = free_pad(export, end_of_conversation_token)
        if export.pad_token_id is None:
            export.add_special_tokens({"pad_token": PAD_CANDIDATES[-1]})
    return export


def bos_only_in_template(tokenizer) -> bool:
    """Whether the bos token is only the first token the chat template writes (SmolLM2's bos is
    `<|im_start|>`): the tokenizer never adds it and the template does not name it. verl's reward loop
    cuts a leading bos text from the rendering and has its server add the tokenizer's own, which would
    lose that token; without a bos in the export, the rendering is read whole."""
    bos = tokenizer.bos_token
    if bos is None or special_affixes(tokenizer)[0] or "bos_token" in tokenizer.chat_template:
        return False
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}]
    return tokenizer.apply_chat_template(conversation, tokenize=False).startswith(bos)


def scored_ids(tokenizer, end_of_conversation_token: str) -> set[int]:
    """Special ids a scored text can hold: bos, eos, unk, the end-of-conversation token's and every
    special token the chat template writes."""
    template = tokenizer.chat_template or ""
    in_template = [added.content for added in tokenizer.added_tokens_decoder.values() if added.content in template]
    return {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id,
            *tokenizer(end_of_conversation_token, add_special_tokens=False)["input_ids"],
            *tokenizer.convert_tokens_to_ids(in_template)} - {None}


def free_pad(tokenizer, end_of_conversation_token: str) -> str | None:
    """A token already in the vocabulary that no scored text holds: a usual pad name, else a spare
    special token (Llama-3's reserved ones, SmolLM2's code markers), so that the vocabulary and the
    step-3 embedding keep their size; None when there is none."""
    scored, vocab = scored_ids(tokenizer, end_of_conversation_token), tokenizer.get_vocab()
    named = [token for token in PAD_CANDIDATES if token in vocab and vocab[token] not in scored]
    spare = [added.content for index, added in sorted(tokenizer.added_tokens_decoder.items())
             if added.special and index not in scored]
    return (named or spare or [None])[0]


def sequence_classification_state(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], object]:
    """Our `rwtransformer.*` / `v_head.weight` state renamed for `AutoModelForSequenceClassification`
    of `config` (`v_head.weight` has its num_labels rows); the embedding grows in steps of 8 rows if
    the vocabulary needs it, and a head bias (BERT's classifier has one) is zero, as our value head has
    none."""
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
        if source == "v_head.weight" and key.endswith(".bias") and expected.shape == (config.num_labels,):
            tensor = tensor.new_zeros(config.num_labels)
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
                                 attributes: tuple[str, ...] | None = None, stats: dict | None = None) -> None:
    """Write the export into `folder` (which the caller then moves into place): one label, or one per
    attribute, named; `tokenizer` is the `handoff_tokenizer`. With reward statistics, config.json gets
    the held-out reward `mean` and `std`, which OpenRLHF normalises by."""
    from safetensors.torch import save_file

    config = copy.deepcopy(config)
    rewards = (stats or {}).get("all") or {}
    if rewards.get("mean") is not None and rewards.get("std"):
        config.mean, config.std = rewards["mean"], rewards["std"]
    config.vocab_size = max(config.vocab_size, embedding_rows(len(tokenizer)))
    config.num_labels = len(attributes) if attributes else 1
    if attributes:
        config.id2label = dict(enumerate(attributes))
        config.label2id = {name: index for index, name in enumerate(attributes)}
    config.pad_token_id = tokenizer.pad_token_id
    tensors, model_class = sequence_classification_state(state, config)
    config.architectures = [model_class.__name__]
    # The head's name (`score` in the causal LMs' classifiers), which OpenRLHF reads to find it.
    config.value_head_prefix = next(key for key in tensors if not key.startswith(model_class.base_model_prefix + "."))\
        .split(".")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
