"""The precision a run asks for, resolved for the machine: never the slow path by default, and a
note where the asked-for one is slow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_scripts import FP16_WARNING

from step2_reward_model import engine, flags


def on_device(monkeypatch, name: str) -> None:
    """Make engine.py see DeepSpeed's accelerator as `name`, so each device's rule is tested on any machine."""
    monkeypatch.setattr(engine, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: name))


@pytest.mark.parametrize("capabilities,dtype,expected,says,silent", [
    ({}, "fp16", "fp32", FP16_WARNING, "bf16 instructions"),
    ({"avx512_bf16": True}, "fp16", "fp32", "--dtype bf16 may train faster", None),
    ({}, "bf16", "bf16", "bf16 runs several times slower than fp32", None),
    ({"amx_bf16": True}, "bf16", "bf16", None, "slower"),
    ({}, "fp32", "fp32", None, "note"),
])
def test_dtype_on_the_cpu(monkeypatch, capsys, capabilities, dtype, expected, says, silent):
    on_device(monkeypatch, "cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    args = flags.parse_training_args(["--model_name_or_path", "m", "--dtype", dtype])
    engine.resolve_dtype(args)
    printed = capsys.readouterr().out
    assert args.dtype == expected
    assert says is None or says in printed
    assert silent is None or silent not in printed


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_dtype_on_a_gpu_is_as_asked(monkeypatch, capsys, dtype):
    """A GPU runs fp16 and bf16 as configured, and says nothing of the CPU's instructions."""
    on_device(monkeypatch, "cuda")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    args = flags.parse_training_args(["--model_name_or_path", "m", "--dtype", dtype])
    engine.resolve_dtype(args)
    assert args.dtype == dtype
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("device,flash_installed,dtype,sharing,expected", [
    ("cuda", True, "bf16", False, "flash_attention_2"),
    ("cuda", True, "fp16", False, "flash_attention_2"),
    ("cuda", True, "bf16", True, None),  # flash-attention takes no custom mask: prefix sharing needs SDPA
    ("cuda", True, "fp32", False, None),  # flash-attention runs in half precision only
    ("cuda", False, "bf16", False, None),
    ("cpu", True, "bf16", False, None),
])
def test_attention_auto_per_device(monkeypatch, device, flash_installed, dtype, sharing, expected):
    import importlib.util

    on_device(monkeypatch, device)
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *rest):
        if name == "flash_attn":
            return object() if flash_installed else None
        return real_find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    argv = ["--model_name_or_path", "m", "--dtype", dtype] + ([] if sharing else ["--no_prefix_sharing"])
    args = flags.parse_training_args(argv)
    assert engine.resolve_attention(args) == expected


def test_attention_auto_keeps_the_models_default_without_flash_attention():
    args = flags.parse_training_args(["--model_name_or_path", "m"])
    assert engine.resolve_attention(args) is None
    args = flags.parse_training_args(["--model_name_or_path", "m", "--attn_implementation", "eager"])
    assert engine.resolve_attention(args) == "eager"
