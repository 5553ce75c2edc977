"""`--deepspeed_config FILE` overlays the DeepSpeed config main.py generates from its flags: nested
sections merge key by key, the file's values win, every generated key it does not name stays, and
a file that cannot be used is one `error:` line naming it. In-process: parse_args, build_ds_config
and main(--dry_run), no launcher."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from rlhf_reward.utils.ds_utils import merge_user_config
from rlhf_reward.utils.errors import UserError
from test_scripts import dry_run_json

from step2_reward_model.engine import build_ds_config
from step2_reward_model.flags import parse_training_args
from step2_reward_model.main import main

FLAGS = ["--model_name_or_path", "unused", "--dtype", "fp32", "--zero_stage", "3", "--offload",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
USER = {"zero_optimization": {"stage3_max_live_parameters": 1000, "reduce_bucket_size": 500000,
                              "offload_optimizer": {"pin_memory": True}},
        "steps_per_print": 1, "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 2,
        "bf16": {"enabled": True}}


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def expected_overlay(generated: dict) -> dict:
    """USER on top of `generated`, written out by hand."""
    expected = copy.deepcopy(generated)
    zero = expected["zero_optimization"]
    zero.update(stage3_max_live_parameters=1000, reduce_bucket_size=500000)
    zero["offload_optimizer"]["pin_memory"] = True
    expected.update(steps_per_print=1, gradient_clipping=0.5, train_micro_batch_size_per_gpu=2,
                    bf16={"enabled": True})
    return expected


def test_user_keys_overlay_the_generated_config(tmp_path):
    generated = build_ds_config(parse_training_args(FLAGS), world_size=2)
    assert generated["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}  # what the overlay extends
    assert generated["train_batch_size"] == 4 * 2 * 2
    path = write(tmp_path / "ds.json", json.dumps(USER))
    merged = build_ds_config(parse_training_args([*FLAGS, "--deepspeed_config", path]), world_size=2)
    assert merged == expected_overlay(generated)
    # the generated dict and its nested sections are copied, not changed in place
    before = copy.deepcopy(generated)
    merge_user_config(generated, path)
    assert generated == before


def test_dry_run_prints_the_merged_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    generated = build_ds_config(parse_training_args(FLAGS), world_size=2)
    path = write(tmp_path / "ds.json", json.dumps(USER))
    assert main([*FLAGS, "--deepspeed_config", path, "--dry_run"]) == 0
    resolved = dry_run_json(capsys.readouterr().out)
    assert resolved["world_size"] == 2 and resolved["args"]["deepspeed_config"] == path
    assert resolved["deepspeed_config"] == expected_overlay(generated)


@pytest.mark.parametrize("case", ["missing", "truncated", "folder", "not_utf8", "not_an_object"])
def test_an_unusable_file_is_one_line_naming_it(case, tmp_path, capsys):
    path = {"missing": lambda: str(tmp_path / "nope.json"),
            "truncated": lambda: write(tmp_path / "ds.json", '{"zero_optimization": {"stage": '),
            "folder": lambda: str(tmp_path),
            "not_utf8": lambda: write(tmp_path / "ds.json", b'{"steps_per_print": "\xff"}'),
            "not_an_object": lambda: write(tmp_path / "ds.json", "[1, 2]")}[case]()
    with pytest.raises(UserError) as raised:
        build_ds_config(parse_training_args([*FLAGS, "--deepspeed_config", path]), world_size=1)
    message = str(raised.value)
    assert message.startswith(f"--deepspeed_config {path}: ") and "\n" not in message

    assert main([*FLAGS, "--deepspeed_config", path, "--dry_run"]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {message}\n"
    assert "{" not in out.splitlines()  # no configuration printed
