"""The precision a run asks for, resolved for the machine: never the slow path by default, and a
note where the asked-for one is slow."""

from __future__ import annotations

import pytest
import torch
from test_scripts import FP16_WARNING

from step2_reward_model import main


@pytest.mark.parametrize("capabilities,dtype,expected,says,silent", [
    ({}, "fp16", "fp32", FP16_WARNING, "bf16 instructions"),
    ({"avx512_bf16": True}, "fp16", "fp32", "--dtype bf16 may train faster", None),
    ({}, "bf16", "bf16", "bf16 runs several times slower than fp32", None),
    ({"amx_bf16": True}, "bf16", "bf16", None, "slower"),
    ({}, "fp32", "fp32", None, "note"),
])
def test_dtype_on_the_cpu(monkeypatch, capsys, capabilities, dtype, expected, says, silent):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    args = main.parse_args(["--model_name_or_path", "m", "--dtype", dtype])
    main.resolve_dtype(args)
    printed = capsys.readouterr().out
    assert args.dtype == expected
    assert says is None or says in printed
    assert silent is None or silent not in printed


def test_attention_auto_keeps_the_models_default_without_flash_attention():
    args = main.parse_args(["--model_name_or_path", "m"])
    main.resolve_attention(args)
    assert args.attn_implementation is None
    args = main.parse_args(["--model_name_or_path", "m", "--attn_implementation", "eager"])
    main.resolve_attention(args)
    assert args.attn_implementation == "eager"
