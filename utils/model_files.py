"""Model paths and tokenizers: folders, hub ids and GGUF files, and the tokenizer with DeepSpeed-Chat's
conventions."""

from __future__ import annotations

import functools
import os

from rlhf_reward.utils.errors import UserError, first_line

END_OF_CONVERSATION_TOKEN = "<|endoftext|>"
GGUF_SUFFIX = ".gguf"


def pretrained_source(path: str, flag: str = "--model_name_or_path") -> tuple[str, dict]:
    """`from_pretrained`'s path and extra arguments for a model path. A GGUF file (llama.cpp's single
    file of config, tokenizer and weights) is read from its folder with `gguf_file=` its name, after a
    check that turns a missing or damaged file into one line naming it; any other path (a folder, a
    hub name) is passed on as it is."""
    if not path.lower().endswith(GGUF_SUFFIX):
        return path, {}
    check_gguf(path, flag)
    folder, name = os.path.split(os.path.abspath(path))
    return folder, {"gguf_file": name}


def dequantized(gguf: dict) -> dict:
    """`from_pretrained` arguments that unpack a GGUF's weights into plain float tensors at load, as
    training needs: transformers may otherwise keep them in quantized blocks, which cannot be
    trained, and records a `quantization_config` that would send a reload of the saved config.json
    looking for the GGUF file. Releases without `GgufConfig` always unpack."""
    if not gguf:
        return gguf
    try:
        from transformers import GgufConfig
    except ImportError:
        return gguf
    return {**gguf, "quantization_config": GgufConfig(dequantize=True)}


@functools.lru_cache
def check_gguf(path: str, flag: str) -> None:
    """Parse the file's header and tensor table once per process (a big vocabulary takes seconds),
    instead of letting each of the tokenizer, config and weight loaders fail on it differently."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise UserError(f"{flag} '{path}': no such GGUF file")
    try:
        GGUFReader(path)
    except (OSError, ValueError, IndexError) as err:  # what a truncated or corrupt file raises
        raise UserError(f"{flag} '{path}': not a readable GGUF file (truncated or corrupt?): "
                        f"{first_line(err)}") from None


def load_hf_tokenizer(model_name_or_path: str, add_eot_token: bool = False,
                      trust_remote_code: bool = False):
    """The tokenizer with DeepSpeed-Chat's conventions, so step 3 sees the same vocabulary size:
    right padding; pad = eos, except Llama paths, which get a `[PAD]` token when they have none, and
    tokenizers without an eos (BERT), which keep their own pad;
    `<|endoftext|>` added as a special token with `--add_eot_token`."""
    from transformers import AutoTokenizer

    source, gguf = pretrained_source(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=trust_remote_code,
                                                  **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"--model_name_or_path '{model_name_or_path}': cannot load a tokenizer "
                        f"(not a local model folder, or the hub is unreachable): "
                        f"{first_line(err)}") from None
    if "llama" in model_name_or_path.lower():
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if add_eot_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CONVERSATION_TOKEN]})
    return tokenizer


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (OPT: `</s>` before; GPT-2: none)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
