"""The memory estimate made before training: it follows the batch's rows and length, gradient
checkpointing, dtype, ZeRO and offload, matches what the model keeps for its backward pass, and a run
that will not fit stops with one line that names the flags that make it fit."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from rlhf_reward.utils.data.collate import RowShapes
from rlhf_reward.utils.data.sampler import LengthGroupedBatches
from rlhf_reward.utils.data.synthetic import write_dataset
from rlhf_reward.utils.errors import UserError
from transformers import AutoModel, GPT2Config, LlamaConfig

from step2_reward_model import memory
from step2_reward_model.flags import parse_training_args
from step2_reward_model.model import RewardModel

MIB = 2 ** 20
CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128),
    "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=64, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0),
}


def reward_model(family: str = "llama", attention: str = "sdpa") -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(AutoModel.from_config(CONFIGS[family](), attn_implementation=attention)).train()


def saved_for_backward(model: RewardModel, rows: int, tokens: int) -> int:
    """Bytes of the tensors a forward pass saves for the backward pass, weights left out."""
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(96, (rows, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.values(ids, torch.ones_like(ids))
    return sum(saved.values())


def test_the_tensor_counter_counts_each_storage_once_until_freed():
    weight = torch.zeros(MIB // 4)
    with memory.PeakBytes([weight]) as counter:
        first = torch.ones(MIB // 4)
        view = first[:10] + 0  # a new 40-byte tensor
        weight.view(-1).add_(1)  # in place on a weight: nothing new
        del first
        second = torch.ones(MIB // 8)
    assert counter.peak == MIB + 40 and counter.live == MIB // 2 + 40
    del view, second


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "eager")])
def test_the_activations_are_what_the_whole_model_keeps_for_backward(family, attention):
    """Fitted on one- and two-layer copies of one short row, the estimate for 8 rows of 256 tokens of the
    four-layer model is at least what its forward saves for the backward pass, and not much more."""
    model = reward_model(family, attention)
    estimate = memory.measure_activations(model, torch.float32, checkpointing=False).bytes(8, 256)
    saved = saved_for_backward(model, 8, 256)
    assert saved <= estimate < 1.5 * saved


def test_more_rows_and_longer_rows_need_more_and_checkpointing_and_bf16_less():
    eager = memory.measure_activations(reward_model(attention="eager"), torch.float32, checkpointing=False)
    assert eager.bytes(4, 128) == pytest.approx(4 * eager.bytes(1, 128))
    assert eager.bytes(1, 256) > 2 * eager.bytes(1, 128) > 0  # its attention scores grow with the square
    model = reward_model()
    plain = memory.measure_activations(model, torch.float32, checkpointing=False)
    checkpointed = memory.measure_activations(model, torch.float32, checkpointing=True)
    assert checkpointed.bytes(8, 256) < 0.5 * plain.bytes(8, 256)
    half = memory.measure_activations(model, torch.bfloat16, checkpointing=False)
    assert half.bytes(8, 256) < 0.75 * plain.bytes(8, 256)


def test_weights_gradients_and_optimizer_state_by_dtype_zero_stage_and_offload():
    params, trainable = 1000, 100  # e.g. LoRA: gradients and optimizer state only for the trainable

    def state(dtype="fp32", stage=0, world_size=4, offload=False):
        return memory.state_bytes(params, trainable, dtype, stage, world_size, offload)

    assert state() == (4 * params + 4 * trainable + 8 * trainable, 0)
    assert state("bf16") == (2 * params + 2 * trainable + 16 * trainable, 0)  # + fp32 master weights, grads
    assert state(stage=1) == (4 * params + 4 * trainable + 8 * trainable / 4, 0)
    assert state(stage=2) == (4 * params + 4 * trainable / 4 + 8 * trainable / 4, 0)
    assert state(stage=3) == (4 * params / 4 + 4 * trainable / 4 + 8 * trainable / 4, 0)
    assert state(stage=2, offload=True) == (4 * params + 4 * trainable / 4, 8 * trainable / 4)
    assert state(stage=3, offload=True) == (4 * trainable / 4, 4 * params / 4 + 8 * trainable / 4)


def sampler(rows: list[int], widths: list[int], lengths: list[int] | None = None) -> LengthGroupedBatches:
    """Batches of two examples, grouped by `lengths` (default: the widths)."""
    return LengthGroupedBatches(np.array(lengths or widths), 2, shapes=RowShapes(np.array(rows), np.array(widths)))


def test_the_costliest_batch_is_the_one_estimated():
    """Two 1-row examples, one of 300 tokens, against two 8-row examples of 100: the rows win unless
    attention dominates."""
    batches = sampler([1, 1, 8, 8], [300, 10, 100, 100], lengths=[4, 3, 2, 1])
    assert memory.costliest(batches, memory.Activations(1000.0, 1.0)) == (16, 104)
    assert memory.costliest(batches, memory.Activations(1.0, 1000.0)) == (2, 304)


def args(model_dir: str, *extra: str):
    return parse_training_args(["--model_name_or_path", model_dir, "--dtype", "fp32",
                                "--per_device_train_batch_size", "2", *extra])


def test_a_run_that_fits_prints_the_estimate(model_dirs, capsys):
    model = reward_model()
    memory.check_memory(args(model_dirs["llama"]), model, sampler([2] * 4, [64, 96, 128, 256]), torch.device("cpu"), 1)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("memory: about ") and "B available" in line and "4 rows of 256 tokens" in line


@pytest.mark.parametrize("extra", [(), ("--gradient_checkpointing",)])
def test_a_run_that_will_not_fit_stops_with_one_line_naming_the_flags(extra, model_dirs, monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: MIB)
    model = reward_model()
    with pytest.raises(UserError) as raised:
        memory.check_memory(args(model_dirs["llama"], *extra), model, sampler([2] * 4, [64, 96, 128, 256]),
                            torch.device("cpu"), 1)
    message = str(raised.value)
    assert "\n" not in message and "but 1 MiB is available" in message
    for flag in ("--per_device_train_batch_size (2)", "--max_responses_per_prompt", "--max_seq_len (512)",
                 "--dtype bf16", "--no_memory_check"):
        assert flag in message
    assert ("--gradient_checkpointing" in message) == (not extra)
    memory.check_memory(args(model_dirs["llama"], "--no_memory_check"), model, None, torch.device("cpu"), 1)


def test_offloaded_state_is_checked_against_host_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * memory.GIB, 80 * memory.GIB))
    monkeypatch.setattr(memory, "host_available", lambda: 5 * memory.GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    estimate = memory.Estimate(states=memory.GIB, offloaded=2 * memory.GIB, activations=3 * memory.GIB, rows=8,
                               width=512)
    assert memory.budgets(estimate, torch.device("cuda", 0)) == [
        ("cuda:0", 4 * memory.GIB, 10 * memory.GIB), ("host", 4 * memory.GIB, 5 * memory.GIB)]


NO_MEMORY = """
import sys
from step2_reward_model import memory
memory.host_available = lambda: 2 ** 20
sys.argv = ["main.py", *sys.argv[1:]]
from step2_reward_model.main import main
sys.exit(main())
"""


def test_the_cli_stops_before_training_with_one_line(tmp_path, model_dirs):
    write_dataset(str(tmp_path), train=40, evaluation=8)
    result = run_cli([sys.executable, "-c", NO_MEMORY, "--model_name_or_path", model_dirs["llama"], "--data_path",
                      str(tmp_path), "--data_split", "0,1,0", "--data_output_path", str(tmp_path / "cache"),
                      "--dtype", "fp32", "--deepspeed"], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Running training" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training needs about ") and "--per_device_train_batch_size (16)" in last, last


def test_flex_attention_activations_have_no_quadratic_part():
    """The probes run SDPA (FlexAttention has no backward pass on the CPU), whose mask grows with
    tokens^2; FlexAttention builds none, so only the linear part of the same probes counts."""
    sdpa = memory.measure_activations(reward_model(attention="sdpa"), torch.float32, checkpointing=False)
    flex = memory.measure_activations(reward_model(attention="flex_attention"), torch.float32, checkpointing=False)
    assert sdpa.quadratic > 0
    assert flex == memory.Activations(sdpa.linear, 0.0)
