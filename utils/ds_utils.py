"""DeepSpeed configuration for reward-model training, as DeepSpeed-Chat builds it."""

from __future__ import annotations

import json

from rlhf_reward.utils.errors import UserError, first_line

DTYPE_SECTIONS = {"fp16": ("fp16", {"enabled": True, "loss_scale_window": 100}),
                  "bf16": ("bf16", {"enabled": True}),
                  "fp32": None}


def get_train_ds_config(offload: bool, dtype: str, stage: int = 0, enable_tensorboard: bool = False,
                        tb_path: str = "", tb_name: str = "") -> dict:
    device = "cpu" if offload else "none"
    config = {
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "offload_param": {"device": device},
            "offload_optimizer": {"device": device},
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            "memory_efficient_linear": False,
        },
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "tensorboard": {"enabled": enable_tensorboard, "output_path": f"{tb_path}/ds_tensorboard_logs/",
                        "job_name": f"{tb_name}_tensorboard"},
    }
    if DTYPE_SECTIONS[dtype]:
        section, value = DTYPE_SECTIONS[dtype]
        config[section] = value
    return config


def merge_user_config(config: dict, path: str | None) -> dict:
    """Overlay a user's `--deepspeed_config` JSON on the generated config (user keys win)."""
    if not path:
        return config
    try:
        with open(path, encoding="utf-8") as handle:
            user = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or not UTF-8
        raise UserError(f"--deepspeed_config {path}: {first_line(err)}") from None
    if not isinstance(user, dict):
        raise UserError(f"--deepspeed_config {path}: not a JSON object of DeepSpeed settings "
                        f"(it is a {type(user).__name__})")

    def overlay(base: dict, extra: dict) -> dict:
        merged = dict(base)
        for key, value in extra.items():
            nested = isinstance(value, dict) and isinstance(base.get(key), dict)
            merged[key] = overlay(base[key], value) if nested else value
        return merged

    return overlay(config, user)
