"""Tiny models and tokenizers built offline in a second: for the CPU demo, tests and benchmarks.

`save_tiny_model` writes a folder that `--model_name_or_path` loads exactly like a hub model: a
randomly initialised backbone of a real architecture and a byte-level BPE tokenizer trained on
the given texts, with the special-token conventions of that model family.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

# Special tokens per family: OPT prepends `</s>` (its bos, eos and DeepSpeed-Chat's pad) to every
# text; GPT-2 and GPT-NeoX add nothing and have bos = eos; Llama prepends `<s>` and has no pad.
# `ids` lists the special tokens in the order (so with the ids) of the real vocabularies.
FAMILIES = {
    "opt": {"ids": ["<s>", "<pad>", "</s>", "<unk>"], "bos": "</s>", "eos": "</s>", "pad": "<pad>",
            "unk": "<unk>", "prefix": True},
    "gpt2": {"ids": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None,
             "unk": "<|endoftext|>", "prefix": False},
    "gpt_neox": {"ids": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None,
                 "unk": "<|endoftext|>", "prefix": False},
    "llama": {"ids": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "pad": None, "unk": "<unk>",
              "prefix": True},
}


def train_tokenizer(texts: list[str], family: str = "opt", vocab_size: int = 512) -> PreTrainedTokenizerFast:
    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["ids"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if spec["prefix"]:
        bos = spec["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=spec["bos"], eos_token=spec["eos"],
                                   unk_token=spec["unk"], pad_token=spec["pad"])


def tiny_config(family: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512) -> AutoConfig:
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if family == "opt":
        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         ffn_dim=4 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=max_positions,
                         pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0, **ids)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=4 * hidden, max_position_embeddings=max_positions, **ids)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=4 * hidden,
                           max_position_embeddings=max_positions, **ids)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def save_tiny_model(folder: str, texts: list[str], family: str = "opt", seed: int = 0, **sizes) -> None:
    """A randomly initialised `family` backbone and its trained tokenizer, saved to `folder`."""
    import torch

    tokenizer = train_tokenizer(texts, family)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family, tokenizer, **sizes))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
