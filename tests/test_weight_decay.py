"""The optimizer groups engine.make_optimizer builds: weight decay on every matrix (the value head's
too), none on biases and norms of any model family, LoRA factors at their own learning rate, and
every trainable parameter in exactly one group. The expected side is read from the module that
holds each parameter (a norm layer, a linear, convolution or embedding layer), independent of the
shape rule the code applies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from step2_reward_model.engine import make_optimizer
from step2_reward_model.flags import parse_training_args
from step2_reward_model.lora import apply_lora
from step2_reward_model.model import RewardModel

WEIGHT_DECAY, LEARNING_RATE, LORA_LEARNING_RATE = 0.1, 1e-4, 3e-3
IDS = {"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_LIKE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 64}
# One layer of each, at the smallest width; OPT with a projection (word_embed_proj_dim != hidden_size)
# and post-norm layers as in opt-350m.
CONFIGS = {
    "opt": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64,
            "word_embed_proj_dim": 16, "do_layer_norm_before": False},
    "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 2},
    "gpt_neox": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": {**LLAMA_LIKE, "head_dim": 16},
    "phi": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "gptj": {"n_embd": 32, "n_layer": 1, "n_head": 2, "rotary_dim": 8},
    "bloom": {"hidden_size": 32, "n_layer": 1, "n_head": 2},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_kv_heads": 2,
               "new_decoder_architecture": True},
    "mpt": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "stablelm": {**LLAMA_LIKE, "qk_layernorm": True},
}
def reward_model(family: str) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(AutoModel.from_config(AutoConfig.for_model(family, **IDS, **CONFIGS[family])))


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    args = parse_training_args(["--model_name_or_path", "unused", "--weight_decay", str(WEIGHT_DECAY),
                                "--learning_rate", str(LEARNING_RATE), "--lora_learning_rate", str(LORA_LEARNING_RATE)])
    return make_optimizer(args, model)


def decay_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each trainable parameter's weight decay, asserting it sits in exactly one group and that the
    groups hold nothing else (no frozen parameter)."""
    names = {id(param): name for name, param in model.named_parameters()}
    placed = [(names[id(param)], group) for group in optimizer.param_groups for param in group["params"]]
    assert len(placed) == len({name for name, _ in placed}), "a parameter is in more than one group"
    assert {name for name, _ in placed} == {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: group["weight_decay"] for name, group in placed}


MATRIX_LAYERS = ("Linear", "Conv1D", "Embedding")  # Conv1D: GPT-2's linear layers


def expected_decay(model: torch.nn.Module) -> dict[str, float]:
    """Weights of linear, Conv1D and embedding layers decay; biases, and every parameter of a layer
    whose class is a norm (LayerNorm, RMSNorm, Falcon's ln_attn, MPT's norm_1, StableLM's per-head
    q_layernorm norms, ...), do not."""
    expected = {}
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if "Norm" in kind or name == "bias":
                expected[full] = 0.0
            elif kind in MATRIX_LAYERS or kind.endswith(MATRIX_LAYERS):
                expected[full] = WEIGHT_DECAY
    return expected


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_matrices_decay_and_biases_and_norms_do_not(family):
    model = reward_model(family)
    decay = decay_by_name(model, optimizer_for(model))
    assert decay["v_head.weight"] == WEIGHT_DECAY
    assert sum(rate == 0.0 for rate in decay.values()) >= 2  # every family has norms to exclude
    assert decay == expected_decay(model)


@pytest.mark.parametrize("family, module_name", [("opt", "decoder.layers."), ("gpt2", "h."), ("llama", "layers.")])
@pytest.mark.parametrize("only_lora", [False, True])
def test_lora_factors_get_their_own_learning_rate(family, module_name, only_lora):
    model = reward_model(family)
    apply_lora(model, 4, module_name, only_lora)
    optimizer = optimizer_for(model)
    decay = decay_by_name(model, optimizer)
    assert decay == expected_decay(model)  # LoRA factors are matrices: they decay too
    lora = {name for name, _ in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert lora
    names = {id(param): name for name, param in model.named_parameters()}
    for group in optimizer.param_groups:
        in_group = {names[id(param)] for param in group["params"]}
        assert in_group <= lora or not in_group & lora, "a group mixes LoRA factors and other parameters"
        assert group["lr"] == (LORA_LEARNING_RATE if in_group <= lora else LEARNING_RATE)
    if only_lora:
        assert set(decay) == lora | {"v_head.weight"}
