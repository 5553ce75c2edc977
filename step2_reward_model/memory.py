"""Peak memory of training, estimated before the first step, so that a run that cannot fit stops at
once with the flags that make it fit, rather than being killed by the kernel, without a word, some
steps in.

The peak is what the optimizer setup keeps (weights, gradients, AdamW's two moments and, in fp16 or
bf16, DeepSpeed's fp32 master weights and gradients; ZeRO divides them over the ranks and --offload
moves optimizer state to host memory) plus the activations of the costliest batch. Activations are
measured rather than modelled per architecture: copies of the model with one and with two layers
(same config, attention, dtype, dropout and checkpointing, random weights, a small vocabulary) run
forward and backward on one row of 64 and of 128 tokens while every tensor they allocate is
counted. Those peaks give the bytes of a row of the whole model, linear x tokens + quadratic x
tokens^2 (the quadratic part is attention), which scale to a batch's rows x padded length. The
copies run on the CPU whatever the device, before the model moves there.

This counts tensors; the process can hold more. On the CPU, glibc's malloc keeps freed blocks under
its (growing) mmap threshold in its heap, where they fragment: peak resident memory measured
1.25-1.3x this estimate, 2x with gradient checkpointing, and 0.9-0.95x with
MALLOC_MMAP_THRESHOLD_=131072 in the environment.
"""

from __future__ import annotations

import argparse
import copy
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from rlhf_reward.utils.data.packing import VARLEN_ATTENTION
from rlhf_reward.utils.data.sampler import LengthGroupedBatches
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.runtime import print_rank_0
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from step2_reward_model.model import RewardModel

PROBE_TOKENS = (64, 128)
PROBE_VOCAB = 128
# fp16 kernels are patchy on the CPU; bf16 activations take as many bytes.
PROBE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.bfloat16}
GIB = 2 ** 30


def readable(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2 ** 20:.0f} MiB"


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors allocated while it is active, each storage counted
    once until it is freed; the storages of `existing` tensors (weights) are left out."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.existing = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.alive: dict[int, weakref.ref] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor.untyped_storage())
        return out

    def track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self.alive or storage.data_ptr() in self.existing:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self.alive[key] = weakref.ref(storage, partial(self.freed, key, size))

    def freed(self, key: int, size: int, _ref: weakref.ref) -> None:
        self.live -= size
        self.alive.pop(key, None)


@dataclass(frozen=True)
class Activations:
    """Bytes a row of `tokens` holds at the peak of a forward and backward pass."""

    linear: float
    quadratic: float

    def bytes(self, rows: int, tokens: int) -> float:
        return rows * (self.linear * tokens + self.quadratic * tokens ** 2)


def probe_model(model: RewardModel, layers: int, dtype: torch.dtype, checkpointing: bool) -> RewardModel:
    """A random copy of `model` with `layers` layers and a small vocabulary, ready to train."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    config.vocab_size = PROBE_VOCAB
    for name, value in config.to_dict().items():
        if name.endswith("_token_id") and isinstance(value, int):
            setattr(config, name, 0)
    if config._attn_implementation not in ("sdpa", "eager"):
        config._attn_implementation = "sdpa"  # flash-attention needs a GPU; SDPA keeps as little
    probe = RewardModel(type(model.rwtransformer)(config)).to(dtype)
    if checkpointing:
        probe.gradient_checkpointing_enable()
    return probe.train()


def probe_peak(probe: RewardModel, tokens: int) -> int:
    """Peak bytes of a forward and backward pass of one row. The backward stops at the embeddings'
    outputs and skips the weights' gradients, which `state_bytes` counts."""
    ids = torch.randint(PROBE_VOCAB, (1, tokens))
    mask = torch.ones_like(ids)
    embedded = []
    hooks = [module.register_forward_hook(lambda _module, _inputs, output: embedded.append(output))
             for module in probe.modules() if isinstance(module, torch.nn.Embedding)]
    try:
        with PeakBytes(probe.parameters()) as counter:
            values = probe.values(ids, mask)
            torch.autograd.grad(values.sum(), [out for out in embedded if out.requires_grad], allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.peak


def measure_activations(model: RewardModel, dtype: torch.dtype, checkpointing: bool) -> Activations:
    """Fit the activations of a row of `model` from probes of one and two layers. The probes run
    SDPA; FlexAttention and flash-attention keep neither scores nor a mask of tokens^2, so for
    them only the linear part counts (a 16k-token flat row would otherwise add a 0.5 GiB mask)."""
    peaks = {layers: [probe_peak(probe_model(model, layers, dtype, checkpointing), tokens) for tokens in PROBE_TOKENS]
             for layers in (1, 2)}
    layers = model.config.num_hidden_layers
    per_row = [one + (layers - 1) * (two - one) for one, two in zip(peaks[1], peaks[2], strict=True)]
    activations = fit(PROBE_TOKENS, per_row)
    if model.config._attn_implementation in VARLEN_ATTENTION:
        return Activations(activations.linear, 0.0)
    return activations


def fit(tokens: tuple[int, int], peaks: list[int]) -> Activations:
    """linear x t + quadratic x t^2 through two (tokens, bytes) points, with quadratic >= 0."""
    (t1, t2), (y1, y2) = tokens, peaks
    quadratic = max((y2 / t2 - y1 / t1) / (t2 - t1), 0.0)
    return Activations(max(y / t - quadratic * t for t, y in zip(tokens, peaks, strict=True)), quadratic)


def state_bytes(params: int, trainable: int, dtype: str, zero_stage: int, world_size: int,
                offload: bool) -> tuple[float, float]:
    """Bytes of weights, gradients and optimizer state per rank: (on the device, in host memory)."""
    width = 4 if dtype == "fp32" else 2

    def shard(from_stage: int) -> int:
        return world_size if zero_stage >= from_stage else 1

    weights = params * width / shard(3)
    gradients = trainable * width / shard(2)
    # Two fp32 moments; in fp16/bf16 also the fp32 master weights and gradients they update.
    optimizer = trainable * (8 if dtype == "fp32" else 16) / shard(1)
    if not offload:
        return weights + gradients + optimizer, 0.0
    if zero_stage == 3:
        return gradients, weights + optimizer
    return weights + gradients, optimizer


@dataclass(frozen=True)
class Estimate:
    states: float  # weights, gradients and optimizer state on the device
    offloaded: float  # in host memory, with --offload
    activations: float
    rows: int
    width: int

    def describe(self) -> str:
        offloaded = f", {readable(self.offloaded)} offloaded to host memory" if self.offloaded else ""
        return (f"activations {readable(self.activations)} for the largest batch, {self.rows} rows of "
                f"{self.width} tokens; weights, gradients and optimizer state {readable(self.states)}{offloaded}")


def costliest(sampler: LengthGroupedBatches, activations: Activations) -> tuple[int, int]:
    """Rows and padded length of the batch that needs the most activation memory on any rank."""
    parts = (part for batch in sampler.global_batches() for part in sampler.parts(batch))
    return max((sampler.shapes.size(part) for part in parts), key=lambda size: activations.bytes(*size))


def parameter_count(model: torch.nn.Module, trainable: bool) -> int:
    """Whole sizes, also of parameters ZeRO-3 has partitioned."""
    return sum(getattr(param, "ds_numel", param.numel()) for param in model.parameters()
               if param.requires_grad or not trainable)


def estimate(args: argparse.Namespace, model: RewardModel, sampler: LengthGroupedBatches,
             world_size: int) -> Estimate:
    activations = measure_activations(model, PROBE_DTYPES[args.dtype], args.gradient_checkpointing)
    rows, width = costliest(sampler, activations)
    states, offloaded = state_bytes(parameter_count(model, False), parameter_count(model, True), args.dtype,
                                    args.zero_stage, world_size, args.offload)
    return Estimate(states, offloaded, activations.bytes(rows, width), rows, width)


def host_available() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def ranks_on_this_host() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def budgets(estimate: Estimate, device: torch.device) -> list[tuple[str, float, float | None]]:
    """(where, bytes needed, bytes available) for every memory the run fills. On the CPU, device and
    host are one memory, shared by this host's ranks."""
    ranks = ranks_on_this_host()
    if device.type == "cpu":
        return [("cpu", (estimate.states + estimate.offloaded + estimate.activations) * ranks, host_available())]
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    result = [(str(device), estimate.states + estimate.activations, free)]
    if estimate.offloaded:
        result.append(("host", estimate.offloaded * ranks, host_available()))
    return result


def fixes(args: argparse.Namespace) -> str:
    """The flags that lower the peak, of those this run can still change."""
    batch = f"--max_tokens_per_batch ({args.max_tokens_per_batch})" if args.max_tokens_per_batch else \
        f"--per_device_train_batch_size ({args.per_device_train_batch_size})"
    ways = [f"lower {batch}, --max_responses_per_prompt or --max_seq_len ({args.max_seq_len})"]
    if not args.gradient_checkpointing:
        ways.append("pass --gradient_checkpointing")
    if args.dtype == "fp32":
        ways.append("train in --dtype bf16")
    return "; or ".join(ways)


def check_memory(args: argparse.Namespace, model: RewardModel, sampler: LengthGroupedBatches,
                 device: torch.device, world_size: int) -> None:
    """Print the estimated peak, or stop with one line when it exceeds what is free."""
    if not args.memory_check:
        return
    found = estimate(args, model, sampler, world_size)
    for where, needed, available in budgets(found, device):
        if available is not None and needed > available:
            raise UserError(f"training needs about {readable(needed)} of {where} memory ({found.describe()}) "
                            f"but {readable(available)} is available: {fixes(args)} "
                            "(--no_memory_check skips this check)")
        free = "unknown" if available is None else readable(available)
        print_rank_0(f"memory: about {readable(needed)} of {where} memory at the peak, {free} available "
                     f"({found.describe()})")
