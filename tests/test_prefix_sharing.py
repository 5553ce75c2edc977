"""Prefix sharing: one packed row per prompt gives the scores, losses and gradients of one row per
response, for every model family that takes it; the others fall back to unshared rows. Also: the
training forward and backward never wait on the device (no tensor-to-Python conversions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_chunks_change_nothing, forward_backward
from rlhf_reward.utils.data.collate import PairCollator
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModel,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from step2_reward_model.losses import ranked_pair_loss
from step2_reward_model.model import PREFIX_SHARING_MODELS, RewardModel, prefix_sharing_problem
from step2_reward_model.objectives.preference import Preference

pytestmark = pytest.mark.numerics

VOCAB = 96
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
CONFIGS = {
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                             word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, pad_token_id=1),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **SIZES),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, num_key_value_heads=2, **SIZES),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **SIZES),
}
LOSS_LAYOUTS = [("per_token", 2), ("end_token", 2), ("end_token", 4), ("plackett_luce", 3)]


def make_items(responses: int, seed: int = 0) -> list[dict]:
    """Examples of varied prompt and response lengths (one with an empty prompt); with more than two
    responses, lists of different lengths, some with ties, as the data module makes them."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(6):
        count = 2 if responses == 2 else int(rng.integers(2, responses + 1))
        prompt = rng.integers(3, VOCAB, size=0 if index == 0 else int(rng.integers(1, 30)))
        answers = [rng.integers(3, VOCAB, size=int(rng.integers(1, 20))) for _ in range(count)]
        if index == 1:  # answers that begin alike: the per-token loss starts where they differ
            answers[1] = np.concatenate([answers[0][:3], answers[1]])
        ranks = np.sort(rng.integers(0, count, size=count)) if count > 2 else np.arange(count)
        ranks[0] = 0
        items.append({"prompt": prompt, "responses": answers, "ranks": ranks, "margin": 0.0, "source": 0})
    return items


def layout_forward_backward(model: RewardModel, items: list[dict], share: bool,
                            loss: str) -> tuple[dict, list[torch.Tensor]]:
    return forward_backward(model, PairCollator(1, share_prompt=share)(items), Preference(loss_name=loss))


# The two layouts are equal in real arithmetic but sum in different orders, so they differ by
# rounding, and by how much depends on the CPU's kernels (AVX2 and AVX-512 reductions differ). The
# models run in float64, except where a layer computes in float32 whatever the model's dtype: the
# RMSNorm of Llama, Mistral and Qwen2, and eager attention's softmax. Values are compared with
# atol = SLACK * eps * scale: eps of the dtype the values are rounded to; scale the largest score,
# or the largest gradient of the model (some gradients are zero in real arithmetic, since the loss
# ignores a shift of all rewards, and are the rounding of sums of gradient-sized terms); SLACK
# allows for sums over a batch's ~200 tokens. Measured on AVX-512, AVX2 and plain kernels: at most
# 9.5 eps * scale in float64, 1.7 in float32. A real difference (a token seeing another answer)
# is ~1e-2 * scale, far above either bound.
SLACK = {torch.float64: 1024, torch.float32: 64}
FLOAT32_NORMS = ("llama", "mistral", "qwen2")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rounding: torch.dtype, scale: float, what: str) -> None:
    assert actual.dtype == expected.dtype == torch.float64, what
    atol = SLACK[rounding] * torch.finfo(rounding).eps * scale
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=what)


def assert_same(model: RewardModel, items: list[dict], loss: str, reference: RewardModel | None = None) -> None:
    config = model.config
    rounds_in_fp32 = config.model_type in FLOAT32_NORMS or config._attn_implementation == "eager"
    rounding = torch.float32 if rounds_in_fp32 else torch.float64
    unshared, unshared_grads = layout_forward_backward(reference or model, items, False, loss)
    shared, shared_grads = layout_forward_backward(model, items, True, loss)
    score_scale = unshared["scores"].abs().max().item()
    for key in ("loss", "scores", "chosen_mean_scores", "rejected_mean_scores"):
        assert_close(shared[key], unshared[key], rounding, max(score_scale, unshared[key].abs().max().item()), key)
    grad_scale = max(grad.abs().max().item() for grad in unshared_grads)
    names = [name for name, _ in model.named_parameters()]
    for name, shared_grad, unshared_grad in zip(names, shared_grads, unshared_grads, strict=True):
        assert_close(shared_grad, unshared_grad, rounding, grad_scale, f"gradient of {name}")


def reward_model(family: str, attention: str = "sdpa") -> RewardModel:
    config = CONFIGS[family]()
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config))
    torch.nn.init.normal_(model.v_head.weight)
    return model.double()


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("loss,responses", LOSS_LAYOUTS)
def test_shared_prefix_gives_the_unshared_scores_loss_and_gradients(family, loss, responses):
    assert prefix_sharing_problem(CONFIGS[family]()) is None
    assert_same(reward_model(family), make_items(responses), loss)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_eager_attention_takes_the_mask_too(family):
    assert_same(reward_model(family, attention="eager"), make_items(3, seed=1), "end_token")


def test_gradient_checkpointing_changes_nothing():
    reference = reward_model("llama")
    model = reward_model("llama")
    model.train()
    model.gradient_checkpointing_enable()
    assert_same(model, make_items(2, seed=2), "per_token", reference=reference.train())


def test_the_row_index_rebuilds_every_unshared_row():
    items = make_items(4, seed=3)
    unshared, shared = PairCollator(1)(items), PairCollator(1, share_prompt=True)(items)
    index = shared.layout.row_index
    ids = torch.where(index >= 0, shared.inputs.input_ids.flatten()[index.clamp(min=0)], 1)
    width = unshared.inputs.input_ids.shape[1]
    assert index.shape[1] == width
    assert torch.equal(ids, unshared.inputs.input_ids)
    assert torch.equal((index >= 0).long(), unshared.inputs.attention_mask)
    for key in ("group", "rank", "margin"):
        assert torch.equal(getattr(shared.targets, key), getattr(unshared.targets, key))
    # One packed row per example, each holding its prompt once.
    real = (shared.layout.segment_ids >= 0).sum(-1)
    assert real.tolist() == [len(it["prompt"]) + sum(len(r) for r in it["responses"]) for it in items]


@pytest.mark.parametrize("config,reason", [
    (BloomConfig(vocab_size=VOCAB), "model type bloom"),
    (GPTNeoXConfig(vocab_size=VOCAB), "model type gpt_neox"),
])
def test_untested_model_types_fall_back(config, reason):
    assert config.model_type not in PREFIX_SHARING_MODELS
    assert reason in prefix_sharing_problem(config)


def test_flash_attention_falls_back():
    config = CONFIGS["llama"]()
    config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2 takes no custom mask" in prefix_sharing_problem(config)


def test_a_fallback_model_trains_on_unshared_rows():
    """Bloom (ALiBi positions from the 2-D mask) cannot take packed rows. On unshared rows each answer
    scores as it does alone, unpadded, and the loss and its gradients are the end-token loss of
    those scores (float64, but Bloom's attention softmax computes in float32)."""
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    model = RewardModel(AutoModel.from_config(config)).double()
    torch.nn.init.normal_(model.v_head.weight)
    batch = PairCollator(1)(make_items(3))
    ids, mask, targets = batch.inputs.input_ids, batch.inputs.attention_mask, batch.targets
    assert (mask == 0).any(), "no padding: the test would not see it ignored"
    out, grads = layout_forward_backward(model, make_items(3), False, "end_token")

    model.zero_grad()
    alone = torch.stack([model.forward_value(ids[mask.bool()][None], return_value_only=True)[0, -1]
                         for ids, mask in zip(ids, mask, strict=True)])
    expected = ranked_pair_loss(alone, targets.group, targets.rank, targets.margin)
    expected.backward()
    scale = alone.abs().max().item()
    assert_close(out["scores"], alone.detach(), torch.float32, scale, "scores")
    assert_close(out["loss"], expected.detach(), torch.float32, scale, "loss")
    grad_scale = max(param.grad.abs().max().item() for param in model.parameters())
    assert grad_scale > 0
    for (name, param), grad in zip(model.named_parameters(), grads, strict=True):
        assert_close(grad, param.grad, torch.float32, grad_scale, f"gradient of {name}")


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: tensor-to-Python conversions
    (`.item()`, `int()`, `bool()`) and ops whose output size depends on the data."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in func.__name__ for name in self.SYNCING):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.numerics
@pytest.mark.parametrize("loss,responses", LOSS_LAYOUTS)
def test_length_chunks_of_ranked_lists_change_nothing(loss, responses):
    """Unpacked rows of pairs and ranked lists, run in length chunks: loss, scores and gradients as
    one forward of the padded batch (float64)."""
    assert_chunks_change_nothing(reward_model("llama"), make_items(responses), pad_token_id=1,
                                 objective=Preference(loss_name=loss))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("loss,responses", LOSS_LAYOUTS)
def test_training_forward_and_backward_never_wait_on_the_device(share, loss, responses):
    """Packed rows, and unpacked rows run in length chunks (every width its own chunk)."""
    model = reward_model("opt")
    batch = PairCollator(1, share_prompt=share, chunk_tokens=None if share else 0)(make_items(responses))
    assert share or len(batch.layout.chunks) > 1
    objective = Preference(loss_name=loss)
    with HostSyncs() as syncs:
        objective.loss(model, model(batch.inputs, batch.layout), batch).loss.backward()
    assert syncs.seen == []
