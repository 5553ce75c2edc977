"""The reward model: a causal-LM (or encoder) backbone and a linear value head on its last hidden states.

The reward of a sequence is the value at its last real token, located from the attention mask,
so left padding (as in the PPO step), right padding (as in training) and tokenizers whose pad id
equals eos or bos (OPT) all score the same token. Positions are derived from the mask too, so a
sequence scores the same whatever padding surrounds it.

Prefix sharing: in training, a batch can instead hold one packed row per prompt, [prompt,
response 1, response 2, ...] (see `utils/data/collate.py`). Each response then restarts its
position ids after the prompt and attends to the prompt and to itself only, through a 4-D
attention mask that SDPA and eager attention take as it is. The prompt is computed once instead
of once per response, and the values are gathered back into the usual one-row-per-response
layout, so every loss sees the same numbers as without sharing. Model types whose attention or
positions cannot take such a mask (ALiBi, flash-attention 2) fall back to unshared rows.

Token-budget batches (--max_tokens_per_batch) pack several such documents into a row, each with
its document id (`utils/data/packing.py`). `attention` turns the ids into what the configured
attention takes: the 4-D mask for SDPA and eager, a block mask for FlexAttention (which skips
the blocks no query may see), nothing for flash-attention 2 (whose variable-length kernel finds
the documents of a flat row where the position ids restart).

Encoders (BERT, DeBERTa-v2/v3, T5's encoder; the `ENCODERS` table) see the whole text at every
position, so the first token is as good a summary as the last: BERT-style models are scored at
their first real token ([CLS]), T5 at its last (the `</s>` its tokenizer appends). They attend
both ways through a plain padding mask, and never share prefixes: a shared prompt's hidden states
would depend on each response.

A multi-attribute model (`Attributes`, for `--objective regression`) has one value-head output per
attribute, regressed on rated responses; its reward is a fixed weighted sum of the outputs. As the
head is linear, that sum is itself one linear head, `w^T W`: the one step 3 gets (`output.py`).

Rows of one response each (encoders, or prefix sharing off) are right-padded to the batch's
longest. With `chunks` from the collator, their forward runs chunk by chunk, rows of similar
length together, each chunk cut to its own longest row: the same values, without computing most
of the padding.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from rlhf_reward.utils.data.batch import Layout, ModelInputs
from rlhf_reward.utils.errors import UserError, first_line
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, dequantized, pretrained_source
from torch import nn

from step2_reward_model.losses import end_index

BACKBONE, TYPO_BACKBONE = "rwtransformer", "rwtranrsformer"  # newer DeepSpeed-Chat spells it with the typo
# Model types whose position ids and 4-D attention mask are tested to give the same scores and
# gradients packed as unpacked (tests/test_prefix_sharing.py), and the attentions that take the mask.
PREFIX_SHARING_MODELS = ("opt", "gpt2", "llama", "mistral", "qwen2")
PREFIX_SHARING_ATTENTION = ("sdpa", "eager", "flex_attention")
T5_NO_EXPORT = "transformers has no encoder-only T5 sequence classifier (T5ForSequenceClassification runs a decoder)"


@dataclass(frozen=True)
class Encoder:
    """How an encoder family is built, scored and exported; any model type not in `ENCODERS` is a
    causal LM, scored at its last real token."""

    first_token: bool  # scored at the first real token ([CLS]); else at the last (T5's `</s>`)
    backbone: str = "AutoModel"  # the transformers class of the encoder alone
    pooler: bool = False  # through the backbone's pooler (dense + tanh), as its sequence classifier does
    no_export: str | None = None  # why no AutoModelForSequenceClassification takes our weights


ENCODERS = {
    "bert": Encoder(first_token=True, pooler=True),
    "deberta-v2": Encoder(first_token=True, no_export="DebertaV2ForSequenceClassification scores through a "
                          "ContextPooler dense layer that this model does not have"),
    "t5": Encoder(first_token=False, backbone="T5EncoderModel", no_export=T5_NO_EXPORT),
    "mt5": Encoder(first_token=False, backbone="MT5EncoderModel", no_export=T5_NO_EXPORT),
    "umt5": Encoder(first_token=False, backbone="UMT5EncoderModel", no_export=T5_NO_EXPORT),
}


@dataclass(frozen=True)
class Attributes:
    """The attributes a multi-attribute head predicts, in output order, and their weights in the reward;
    `hf_labels`: whether `hf/` gets one label per attribute (a regression's ratings) or only the
    reward (ODIN's quality and length, whose reward is the quality alone)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    hf_labels: bool = True

    @classmethod
    def from_manifest(cls, saved: dict) -> Attributes:
        return cls(tuple(saved["names"]), tuple(saved["weights"]), saved.get("hf_labels", True))

    def manifest(self) -> dict:
        return {"names": list(self.names), "weights": list(self.weights), "hf_labels": self.hf_labels}

    def collapse(self, weight: torch.Tensor) -> torch.Tensor:
        """The `[1, width]` head that gives the weighted sum of the `[attributes, width]` head `weight`'s
        outputs (computed in float64, stored in `weight`'s dtype)."""
        weights = torch.tensor(self.weights, dtype=torch.float64, device=weight.device)
        return (weights @ weight.double())[None].to(weight.dtype)


# ODIN's two heads (`--length_head`): trained on their sum, served as the quality head alone.
QUALITY_AND_LENGTH = Attributes(("quality", "length"), (1.0, 0.0), hf_labels=False)


def end_of_conversation_text(config) -> str:
    """The text appended to every answer. A causal LM reads its reward at DeepSpeed-Chat's
    `<|endoftext|>`, which step 3 appends too; an encoder reads its own [CLS] or `</s>`, so it gets
    none: a marker would only add tokens (8 wordpieces for BERT) its sequence classifier never saw."""
    return "" if config.model_type in ENCODERS else END_OF_CONVERSATION_TOKEN


# Model types whose position ids index a learned table of `max_position_embeddings` rows (GPT-2's
# `n_positions` under that name): a longer sequence reads past it. Rotary and relative positions
# (Llama, GPT-NeoX, T5, DeBERTa) have no such table.
LEARNED_POSITIONS = ("opt", "gpt2", "gpt_bigcode", "biogpt", "bert", "roberta", "xlm-roberta", "electra",
                     "distilbert")


def position_limit_problem(config, max_seq_len: int, flag: str = "--max_seq_len") -> str | None:
    """Why `max_seq_len` tokens do not fit the model's position table, or None. Every batch layout
    numbers a response's tokens from its prompt's start (packed and shared rows restart the count per
    document and per answer), so the longest sequence, not the row, is what must fit."""
    if config.model_type not in LEARNED_POSITIONS:
        return None
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or max_seq_len <= positions:
        return None
    return (f"{flag} {max_seq_len} is longer than the {positions} positions of model type {config.model_type}: "
            f"pass {flag} {positions} or less")


def prefix_sharing_problem(config) -> str | None:
    """Why a model cannot run packed prefix-shared rows, or None when it can."""
    if config.model_type in ENCODERS:
        return (f"model type {config.model_type} is an encoder: every token sees the whole text, so a shared "
                "prompt's hidden states would depend on each response")
    if config.model_type not in PREFIX_SHARING_MODELS:
        return f"model type {config.model_type} is not among {', '.join(PREFIX_SHARING_MODELS)}"
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in PREFIX_SHARING_ATTENTION:
        return f"attention {attention} takes no custom mask (use sdpa or eager)"
    return None


def flex_attention_problem(config, on_gpu: bool) -> str | None:
    """Why FlexAttention cannot train this model here, or None when it can."""
    if not on_gpu:
        return "it has no backward pass on the CPU"
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cls = backbone_class(config)
    if cls.__name__ == "AutoModel":
        cls = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    if not getattr(cls, "_supports_flex_attn", False):
        return f"transformers has none for model type {config.model_type}"
    return None


def packing_problem(config) -> str | None:
    """Why a model cannot read several documents in one row (position ids restarting in each, and
    a mask keeping documents apart), or None when it can. Flash-attention 2 takes no mask, but
    finds the documents of a flat row from its position ids."""
    if getattr(config, "_attn_implementation", None) == "flash_attention_2" \
            and config.model_type in PREFIX_SHARING_MODELS:
        return None
    return prefix_sharing_problem(config)


def segment_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype,
                           document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Additive `[rows, 1, seq, seq]` mask: causal, within the query's document (when there are
    `document_ids`, for rows of several documents), and a key is visible if it is in the prompt
    (segment 0) or in the query's own segment. Padding (-1) sees the prompt and padding, so no
    query row is empty (an empty row would make softmax NaN). An ordinary padded row is the case
    of segments 0 (real) and -1 (padding, left or right).

    Float, not boolean: SDPA turns a boolean mask into a float one inside every layer, and on the
    CPU each layer keeps its copy for the backward pass; this one copy serves all layers. Built
    with a single float allocation, as it has `rows x seq^2` elements."""
    seq = segment_ids.shape[1]
    causal = torch.ones((seq, seq), dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    visible = causal & ((key == 0) | (key == query))
    if document_ids is not None:
        visible &= document_ids[:, :, None] == document_ids[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None]


def segment_block_mask(segment_ids: torch.Tensor, document_ids: torch.Tensor | None = None):
    """The same visibility as `segment_attention_mask`, as FlexAttention's block mask: blocks of
    128 x 128 that no query may see (another document, one answer against another) are skipped,
    not computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = torch.zeros_like(segment_ids) if document_ids is None else document_ids
    rows, seq = segment_ids.shape

    def visible(row, head, query, key):
        same_segment = (segment_ids[row, key] == 0) | (segment_ids[row, key] == segment_ids[row, query])
        return (key <= query) & (documents[row, query] == documents[row, key]) & same_segment

    return create_block_mask(visible, rows, None, seq, seq, device=segment_ids.device,
                             _compile=segment_ids.device.type == "cuda")


def embedding_rows(tokenizer_length: int) -> int:
    """DeepSpeed-Chat's embedding size: the tokenizer's length rounded up to a multiple of 8, which
    its step 3 expects of the checkpoint."""
    return 8 * math.ceil(tokenizer_length / 8)


def value_head_width(config) -> int:
    """OPT's last hidden states have `word_embed_proj_dim` features; other models `hidden_size`."""
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


def backbone_class(config):
    """AutoModel, or the encoder-only class where AutoModel would build an encoder-decoder (T5)."""
    import transformers

    encoder = ENCODERS.get(config.model_type)
    return getattr(transformers, encoder.backbone if encoder else "AutoModel")


def new_backbone(config, trust_remote_code: bool) -> nn.Module:
    """A randomly initialised float32 backbone of `config`'s class, for saved weights to load into."""
    from transformers import AutoModel

    cls = backbone_class(config)
    if cls is AutoModel:
        return AutoModel.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return cls(config)


@dataclass
class RowValues:
    """The value head's outputs `[rows, seq, outputs]` of a batch's rows, with their ids and mask: one
    row per response for response batches, whatever their layout; the rows as given for solutions."""

    head: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None


class RewardModel(nn.Module):
    """A backbone and its value head. `forward` gives values; the objective's loss reads them
    (`step2_reward_model/objectives/`), so the model is the same whatever it is trained for."""

    def __init__(self, backbone: nn.Module, attributes: Attributes | None = None):
        super().__init__()
        self.config = backbone.config
        self.v_head = nn.Linear(value_head_width(self.config), 1, bias=False)
        self.rwtransformer = backbone
        self.attributes: Attributes | None = None
        if attributes is not None:
            self.set_attributes(attributes)
        self.encoder = ENCODERS.get(self.config.model_type)
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    def set_attributes(self, attributes: Attributes, weight: torch.Tensor | None = None) -> None:
        """Make this a multi-attribute model: a head of one output per attribute (`weight`, or newly
        initialised), and the weights of the reward, kept out of the state dict (step 3's keys)."""
        head = nn.Linear(self.v_head.in_features, len(attributes.names), bias=False)
        if weight is not None:
            head.weight.data.copy_(weight)
        self.v_head = head.to(self.v_head.weight)
        self.attributes = attributes
        self.register_buffer("attribute_weights", torch.tensor(attributes.weights, device=head.weight.device),
                             persistent=False)

    def combine(self, head: torch.Tensor) -> torch.Tensor:
        """The reward from the value head's outputs `[..., outputs]`: its one output, or the weighted sum
        of the attributes."""
        if self.attributes is None:
            return head.squeeze(-1)
        return head @ self.attribute_weights.to(head.dtype)

    def head_weight(self) -> torch.Tensor:
        """The value head's weight `[outputs, width]`, read through the head's own forward (of the identity),
        so that ZeRO-3 gathers it and its gradient flows as in any forward."""
        eye = torch.eye(self.v_head.in_features, dtype=self.v_head.weight.dtype, device=self.v_head.weight.device)
        return self.v_head(eye).T

    def gradient_checkpointing_enable(self) -> None:
        self.rwtransformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def attention(self, segment_ids: torch.Tensor, document_ids: torch.Tensor | None):
        """The mask of packed rows, in the form the model's attention takes: a block mask for
        FlexAttention, none for flash-attention 2 (which finds the documents of a flat row from
        where its position ids restart), else an additive 4-D mask."""
        attention = getattr(self.config, "_attn_implementation", None)
        if attention == "flex_attention":
            return segment_block_mask(segment_ids, document_ids)
        if attention == "flash_attention_2":
            return None
        return segment_attention_mask(segment_ids, self.v_head.weight.dtype, document_ids)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None, per_attribute: bool = False) -> torch.Tensor:
        """One value per token, `[rows, seq]` (with `per_attribute`, the head's outputs `[rows, seq,
        outputs]`): of padded rows (`attention_mask`), or of packed rows (`position_ids`,
        `segment_ids`, `document_ids`; see `utils/data/packing.py`)."""
        extra = {}
        if segment_ids is not None:
            extra["position_ids"], mask = position_ids, self.attention(segment_ids, document_ids)
        else:
            if self._takes_positions:
                extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            mask = attention_mask
            if prefix_sharing_problem(self.config) is None:
                # Our own mask spares transformers' check of whether the batch has padding, which
                # copies a flag from the device every step.
                mask = self.attention(attention_mask.long() - 1, None)
        hidden = self.rwtransformer(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                    **extra).last_hidden_state
        if self.encoder is not None and self.encoder.pooler:
            # Every token through the pooler: it reads position 0, which left padding fills with a pad.
            pooler = self.rwtransformer.pooler
            hidden = pooler.activation(pooler.dense(hidden))
        head = self.v_head(hidden)
        return head if per_attribute else self.combine(head)

    def chunked_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_order: torch.Tensor,
                       chunks: list[tuple[int, int]]) -> torch.Tensor:
        """The head's outputs of right-padded rows, one forward per chunk: `chunk_order` lists the rows
        chunk after chunk, `chunks` gives each chunk's row count and the width it is cut to. Zero past
        a chunk's width, where only padding is."""
        width, pieces, start = input_ids.shape[1], [], 0
        for count, cut in chunks:
            rows = chunk_order[start:start + count]
            values = self.values(input_ids[rows, :cut], attention_mask[rows, :cut], per_attribute=True)
            pieces.append(nn.functional.pad(values, (0, 0) * (values.dim() - 2) + (0, width - cut)))
            start += count
        return torch.cat(pieces)[chunk_order.argsort()]

    def scored_index(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each row's scored token: the first real one ([CLS]) for such encoders, else the last."""
        if self.encoder is not None and self.encoder.first_token:
            return attention_mask.argmax(-1)
        return end_index(attention_mask)

    def forward(self, inputs: ModelInputs, layout: Layout | None = None) -> RowValues:
        """The value head's outputs of a batch's rows, in the layout the collator made (`Layout`): packed
        documents mapped back to one row per response (`row_index`), rows run in length chunks, or the
        rows as given (padded, or packed solutions)."""
        layout = layout or Layout()
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        if layout.row_index is not None:
            head = self.values(input_ids, position_ids=layout.position_ids, segment_ids=layout.segment_ids,
                               document_ids=layout.document_ids, per_attribute=True)
            index = layout.row_index.clamp(min=0)
            return RowValues(head.flatten(0, 1)[index], input_ids.flatten()[index], (layout.row_index >= 0).long())
        if layout.chunks:
            return RowValues(self.chunked_values(input_ids, attention_mask, layout.chunk_order, layout.chunks),
                             input_ids, attention_mask)
        head = self.values(input_ids, attention_mask, layout.position_ids, layout.segment_ids, layout.document_ids,
                           per_attribute=True)
        return RowValues(head, input_ids, attention_mask)

    def end_outputs(self, rows: RowValues) -> torch.Tensor:
        """The head's outputs at each row's scored token, `[rows, outputs]`."""
        index = self.scored_index(rows.attention_mask)
        return rows.head[torch.arange(len(index), device=index.device), index]

    def forward_value(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      return_value_only: bool = False, prompt_length: int = 0,
                      use_cache: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """The PPO step's call: per-token values, and the score of each sequence (at its end, or at
        an encoder's pooled token).

        `prompt_length` and `use_cache` are accepted for the step-3 call signature; the scored token
        is found from the mask, which already excludes left-padded prompt and right-padded answer."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        head = self.values(input_ids, attention_mask, per_attribute=True)
        values = self.combine(head)
        if return_value_only:
            return values
        index = self.scored_index(attention_mask)
        out = {"values": values, "chosen_end_scores": values.gather(-1, index[:, None]).squeeze(-1)}
        if self.attributes is not None:  # each attribute of each sequence, as trained
            out["end_attributes"] = head[torch.arange(len(index), device=index.device), index]
        return out


def configure_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "attention_probs_dropout_prob", "hidden_dropout_prob"):
        if hasattr(config, key):
            setattr(config, key, dropout)


def load_config(path: str, trust_remote_code: bool, flag: str):
    """The model's config. A model that ships its own code (`auto_map`) is refused, with the reason,
    unless the user passed --trust_remote_code."""
    from transformers import AutoConfig

    source, gguf = pretrained_source(path, flag)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError) as err:
        hint = ": it ships its own model code, which runs only with --trust_remote_code" \
            if "custom code" in str(err) else ""
        raise UserError(f"{flag} '{path}': {first_line(err)}{hint}") from None


def create_reward_model(model_name_or_path: str, tokenizer, ds_config: dict | None = None,
                        dropout: float | None = None, trust_remote_code: bool = False,
                        attn_implementation: str | None = None, attributes: Attributes | None = None) -> RewardModel:
    """A reward model on pretrained weights, with DeepSpeed-Chat's embedding size (a multiple of 8
    of the tokenizer's length) so that its step 3 can load the checkpoint as it is.
    `attn_implementation` None keeps the model's default (SDPA where transformers has it)."""
    from transformers.integrations import HfDeepSpeedConfig

    config = load_config(model_name_or_path, trust_remote_code, "--model_name_or_path")
    configure_dropout(config, dropout)
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    # While this object lives, transformers partitions weights as it loads them (ZeRO-3) and
    # gathers them where it needs whole tensors (the embedding resize).
    zero3_context = HfDeepSpeedConfig(ds_config) if zero3 else None
    source, gguf = pretrained_source(model_name_or_path)
    backbone = backbone_class(config).from_pretrained(
        source, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, **dequantized(gguf))
    backbone.config.end_token_id = tokenizer.eos_token_id
    backbone.config.pad_token_id = backbone.config.eos_token_id
    backbone.resize_token_embeddings(embedding_rows(len(tokenizer)))
    del zero3_context
    return RewardModel(backbone, attributes=attributes)
