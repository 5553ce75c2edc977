"""LoRA on the layers DeepSpeed-Chat's `--lora_module_name` selects, through peft, merged before saving.

As in DeepSpeed-Chat: every linear layer whose name contains `--lora_module_name` gets a rank
`--lora_dim` adapter scaled by 1 / lora_dim; the base weights keep training unless
`--only_optimize_lora`, and the value head always trains.
"""

from __future__ import annotations

from rlhf_reward.utils.errors import UserError
from torch import nn
from transformers.pytorch_utils import Conv1D


def apply_lora(model: nn.Module, lora_dim: int, module_name: str, only_optimize_lora: bool) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    backbone = model.rwtransformer
    targets = [name for name, module in backbone.named_modules()
               if isinstance(module, (nn.Linear, Conv1D)) and module_name in name]
    if not targets:
        raise UserError(f"--lora_module_name '{module_name}' matches no linear layer of the model "
                        f"(e.g. 'decoder.layers.' for OPT, 'layers.' for Llama, 'h.' for GPT-2)")
    fan_in_fan_out = isinstance(backbone.get_submodule(targets[0]), Conv1D)
    config = LoraConfig(r=lora_dim, lora_alpha=1, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out)
    inject_adapter_in_model(config, backbone)
    for name, param in model.named_parameters():
        param.requires_grad = not only_optimize_lora or "lora_" in name or name.startswith("v_head")


def merge_lora(model: nn.Module, zero_stage: int) -> None:
    """Fold every adapter into its base weight, gathering ZeRO-3 partitions one layer at a time."""
    import deepspeed  # here: loading and scoring a saved model need no DeepSpeed
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0,
                                                   enabled=zero_stage == 3):
                module.merge()


def plain_state_dict(state: dict) -> dict:
    """A merged model's state under the original layer names: adapters dropped, `base_layer.` unwrapped."""
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if ".lora_" not in key}
