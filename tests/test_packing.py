"""Token-budget batches of packed documents (--max_tokens_per_batch): several prompts per row, with
or without prefix sharing, give the scores, losses and gradients of one padded row per response
(float64); step-labelled solutions too; the loss over a step's ranks and micro-batches is the
per-example mean of the whole global batch; the sampler keeps its budget, its ranks in lockstep
and its order on resume; FlexAttention's block mask sees what the dense mask sees."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import forward_backward, launcher, launcher_env, objective_forward, rounding_tolerance, run_ranks
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.data.packing import first_fit
from rlhf_reward.utils.data.sampler import LossDenominator, TokenBudgetBatches, WithDenominator
from rlhf_reward.utils.data.steps import UNLABELLED, StepCollator
from test_prefix_sharing import CONFIGS, FLOAT32_NORMS, LOSS_LAYOUTS, VOCAB, assert_close, make_items, reward_model
from transformers import AutoModel, GPT2Config

from step2_reward_model.flags import parse_training_args
from step2_reward_model.model import (
    RewardModel,
    flex_attention_problem,
    packing_problem,
    segment_attention_mask,
)
from step2_reward_model.objectives.preference import Preference
from step2_reward_model.objectives.process import Process

VENV_BIN = os.path.dirname(sys.executable)
TESTS = os.path.dirname(os.path.abspath(__file__))
END_TOKEN = Preference(loss_name="end_token")
PACKED = [(share, arrangement) for share in (True, False) for arrangement in ("fit", "flat")]


def rounding(model: RewardModel) -> torch.dtype:
    """The dtype the two layouts' values are rounded to (see test_prefix_sharing)."""
    eager = model.config._attn_implementation == "eager"
    return torch.float32 if model.config.model_type in FLOAT32_NORMS or eager else torch.float64


def assert_outputs_equal(model: RewardModel, packed: Batch, unpacked: Batch, keys: tuple[str, ...], objective,
                         reference: RewardModel | None = None) -> None:
    (out, grads), (expected, expected_grads) = forward_backward(model, packed, objective), \
        forward_backward(reference or model, unpacked, objective)
    dtype = rounding(model)
    scale = max(expected[key].abs().max().item() for key in keys)
    for key in keys:
        assert_close(out[key], expected[key], dtype, scale, key)
    grad_scale = max(grad.abs().max().item() for grad in expected_grads)
    assert grad_scale > 0 and len(grads) == len(expected_grads)
    for (name, _), grad, want in zip(model.named_parameters(), grads, expected_grads, strict=True):
        assert_close(grad, want, dtype, grad_scale, f"gradient of {name}")


def packing_items(responses: int, seed: int = 0) -> list[dict]:
    """`make_items`' examples, and short ones that fit beside them in a row."""
    short = make_items(responses, seed=seed + 100)
    for item in short:
        item["prompt"] = item["prompt"][:2]
        item["responses"] = [response[:3] for response in item["responses"]]
    return make_items(responses, seed=seed) + short


def pack_items(items: list[dict], share: bool, arrangement: str) -> Batch:
    batch = PairCollator(1, share_prompt=share, arrangement=arrangement)(items)
    documents = batch.layout.document_ids.unique()
    assert len(documents[documents >= 0]) == (len(items) if share else sum(len(it["responses"]) for it in items))
    if arrangement == "flat":
        assert batch.inputs.input_ids.shape[0] == 1
    else:  # several documents share a row
        assert batch.inputs.input_ids.shape[0] < len(documents) - 1
    return batch


@pytest.mark.numerics
@pytest.mark.parametrize("share,arrangement", PACKED)
@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("loss,responses", LOSS_LAYOUTS)
def test_packed_documents_give_the_unpacked_scores_loss_and_gradients(family, loss, responses, share, arrangement):
    model = reward_model(family)
    assert packing_problem(model.config) is None
    items = packing_items(responses)
    assert_outputs_equal(model, pack_items(items, share, arrangement), PairCollator(1)(items),
                         ("loss", "scores", "chosen_mean_scores", "rejected_mean_scores"), Preference(loss_name=loss))


@pytest.mark.numerics
@pytest.mark.parametrize("share,arrangement", PACKED)
def test_packed_documents_with_eager_attention_and_gradient_checkpointing(share, arrangement):
    reference = reward_model("llama", attention="eager").train()
    model = reward_model("llama", attention="eager").train()
    model.gradient_checkpointing_enable()
    items = packing_items(3, seed=4)
    assert_outputs_equal(model, pack_items(items, share, arrangement), PairCollator(1)(items), ("loss", "scores"),
                         END_TOKEN, reference=reference)


def step_items(count: int, seed: int = 0) -> list[dict]:
    """Solutions of varied lengths with a few steps each, some unlabelled."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        ids = rng.integers(3, VOCAB, size=int(rng.integers(6, 40)))
        positions = np.sort(rng.choice(np.arange(2, len(ids)), size=min(3, len(ids) - 2), replace=False))
        labels = rng.choice([0.0, 1.0, UNLABELLED], size=len(positions)).astype(np.float32)
        labels[0] = 1.0
        items.append({"input_ids": ids, "positions": positions.astype(np.int32), "labels": labels, "source": 0})
    return items


@pytest.mark.numerics
@pytest.mark.parametrize("arrangement", ["fit", "flat"])
@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_packed_solutions_give_the_padded_step_logits_loss_and_gradients(family, arrangement):
    model = reward_model(family)
    items = step_items(7)
    packed = StepCollator(1, arrangement=arrangement)(items)
    padded = StepCollator(1)(items)
    assert packed.inputs.input_ids.numel() < padded.inputs.input_ids.numel()
    assert torch.equal(packed.targets.rows, padded.targets.rows)
    assert_outputs_equal(model, packed, padded, ("loss", "scores"), Process())


def test_first_fit_keeps_every_item_within_capacity():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, size=200).tolist() + [150]
    bins = first_fit(sizes, 100)
    assert sorted(i for members in bins for i in members) == list(range(len(sizes)))
    assert [len(members) for members in bins if sum(sizes[i] for i in members) > 100] == [1]  # the 150 alone
    assert sum(sizes) / (100 * len(bins)) > 0.9  # the bins are nearly full


def mixed_sizes(count: int = 300, seed: int = 0) -> np.ndarray:
    """Token counts with a long tail, like preference data."""
    sizes = np.random.default_rng(seed).lognormal(np.log(150), 0.7, size=count).astype(np.int64) + 8
    return np.minimum(sizes, 900)


@pytest.mark.parametrize("world_size,window", [(1, 32), (2, 32), (3, 0)])
def test_budget_batches_keep_the_budget_every_example_and_the_ranks_in_lockstep(world_size, window):
    sizes = mixed_sizes()
    sizes[5] = 5000  # longer than the budget: alone in its share
    budget = 1024
    samplers = [TokenBudgetBatches(sizes, budget, rank, world_size, seed=3, window=window)
                for rank in range(world_size)]
    steps = samplers[0].global_batches()
    assert samplers[0].oversized.tolist() == [5]
    seen = np.concatenate([part for step in steps for part in step])
    assert set(seen.tolist()) == set(range(len(sizes)))
    assert len(seen) - len(sizes) < world_size  # only the last step's missing shares repeat examples
    for step in steps:
        assert len(step) == world_size
        for part in step:
            assert sizes[part].sum() <= budget or len(part) == 1
    per_rank = [[[i for i, _ in part] for part in sampler] for sampler in samplers]
    assert all(len(batches) == len(steps) for batches in per_rank)
    for rank, batches in enumerate(per_rank):
        assert batches == [step[rank].tolist() for step in steps]
    # Nearly full budgets: the packing leaves little room unused.
    assert sizes[seen].sum() / (budget * world_size * len(steps)) > (0.9 if window else 0.75)


def test_budget_batches_group_lengths_and_change_every_epoch():
    sizes = mixed_sizes(2000)
    grouped, plain = TokenBudgetBatches(sizes, 2048, seed=0, window=8), TokenBudgetBatches(sizes, 2048, seed=0,
                                                                                           window=0)

    def spread(sampler):  # mean within-step spread of the longest document
        return np.mean([sizes[step[0]].max() - np.median(sizes[step[0]]) for step in sampler.global_batches()])

    assert spread(grouped) < 0.7 * spread(plain)
    first = [part.tolist() for step in grouped.global_batches(0) for part in step]
    assert first != [part.tolist() for step in grouped.global_batches(1) for part in step]
    assert first == [part.tolist() for step in TokenBudgetBatches(sizes, 2048, seed=0, window=8).global_batches(0)
                     for part in step]


def test_a_resumed_epoch_takes_the_batches_not_yet_taken():
    sampler = TokenBudgetBatches(mixed_sizes(), 1024, rank=1, world_size=2, seed=5,
                                 denominator=LossDenominator(accumulation=2, epochs=3))
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.set_epoch(1, start=4)
    assert list(sampler) == whole[4:]
    assert len(sampler) == len(whole) == sampler.batches_in(1)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_loss_denominators_are_the_optimizer_steps_units_per_micro_batch_and_rank(accumulation):
    sizes = mixed_sizes(200)
    units = np.random.default_rng(1).integers(1, 5, size=len(sizes)).astype(float)
    sampler = TokenBudgetBatches(sizes, 900, world_size=2, seed=0,
                                 denominator=LossDenominator(units, accumulation, epochs=2))
    micro = [(e, b) for e in range(2) for b in range(sampler.batches_in(e))]
    denominators = {(e, b): d for e in range(2) for b, d in enumerate(sampler.denominators(e))}
    for start in range(0, len(micro), accumulation):
        group = micro[start:start + accumulation]
        total = sum(units[np.concatenate(sampler.global_batches(e)[b])].sum() for e, b in group)
        for key in group:
            assert denominators[key] == pytest.approx(total / (2 * accumulation))


def budget_parts(items: list[dict], world_size: int, accumulation: int, budget: int) -> list[list[list[dict]]]:
    """The items of each rank's share of the first optimizer step, with their loss denominators."""
    sizes = np.array([len(it["prompt"]) + sum(map(len, it["responses"])) for it in items])
    data = WithDenominator(items)
    samplers = [TokenBudgetBatches(sizes, budget, rank, world_size, seed=0,
                                   denominator=LossDenominator(accumulation=accumulation))
                for rank in range(world_size)]
    per_rank = [list(sampler)[:accumulation] for sampler in samplers]
    return [[[data[key] for key in per_rank[r][m]] for r in range(world_size)] for m in range(accumulation)]


@pytest.mark.numerics
@pytest.mark.parametrize("loss,responses", [("per_token", 2), ("end_token", 4), ("plackett_luce", 3)])
def test_budget_steps_average_the_loss_over_the_global_batch(loss, responses):
    """Two ranks and two accumulated micro-batches of different sizes: DeepSpeed's average of their
    gradients (each loss / micro-batches, then the mean over ranks) is the gradient of the mean loss
    over all the step's examples, as one unpacked batch (float64)."""
    model, objective = reward_model("llama"), Preference(loss_name=loss)
    items = make_items(responses, seed=7) + make_items(responses, seed=8) + make_items(responses, seed=9)
    world_size, accumulation = 2, 2
    parts = budget_parts(items, world_size, accumulation, budget=80)
    counts = [len(part) for step in parts for part in step]
    assert len(set(counts)) > 1, "equal shares: the test would not see the weighting"
    model.zero_grad()
    total = 0.0
    for step in parts:
        for part in step:
            batch = PairCollator(1, share_prompt=True, arrangement="fit")(part)
            out = objective_forward(model, batch, objective)["loss"] / (accumulation * world_size)
            out.backward()
            total += out.item()
    grads = [param.grad.clone() for param in model.parameters()]
    everything = [{key: value for key, value in item.items() if key != "loss_denominator"}
                  for step in parts for part in step for item in part]
    expected, expected_grads = forward_backward(model, PairCollator(1)(everything), objective)
    assert total == pytest.approx(expected["loss"].item(), abs=rounding_tolerance(expected["loss"],
                                                                                  dtype=torch.float32))
    scale = max(grad.abs().max().item() for grad in expected_grads)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert_close(grad, want, torch.float32, scale, "gradient")


@pytest.mark.numerics
def test_budget_steps_average_the_step_loss_over_labelled_steps():
    model = reward_model("opt")
    items = step_items(12, seed=3)
    units = np.array([(item["labels"] != UNLABELLED).sum() for item in items])
    sizes = np.array([len(item["input_ids"]) for item in items])
    sampler = TokenBudgetBatches(sizes, 80, world_size=1, seed=0, denominator=LossDenominator(units, accumulation=100))
    data = WithDenominator(items)
    model.zero_grad()
    for keys in sampler:
        batch = StepCollator(1, arrangement="flat")([data[key] for key in keys])
        (objective_forward(model, batch, Process())["loss"] / 100).backward()
    grads = [param.grad.clone() for param in model.parameters()]
    _, expected_grads = forward_backward(model, StepCollator(1)(items), Process())
    scale = max(grad.abs().max().item() for grad in expected_grads)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert_close(grad, want, torch.float32, scale, "gradient")


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_a_budget_below_one_token_is_refused_at_start(budget, capsys):
    with pytest.raises(SystemExit):
        parse_training_args(["--model_name_or_path", "m", "--max_tokens_per_batch", budget])
    assert f"--max_tokens_per_batch must be a positive number of tokens, not {budget}" in capsys.readouterr().err


def test_flex_attention_falls_back_where_it_cannot_train():
    assert "no backward pass on the CPU" in flex_attention_problem(CONFIGS["llama"](), on_gpu=False)
    assert flex_attention_problem(CONFIGS["llama"](), on_gpu=True) is None
    assert "model type gpt2" in flex_attention_problem(GPT2Config(), on_gpu=True)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_flex_attention_block_mask_scores_as_the_dense_mask(family, tmp_path, monkeypatch):
    """FlexAttention (forward only on the CPU, compiled, float32) on one flat row of shared
    prompts scores every response as the dense mask on padded rows does. It compiles into a cache
    of its own: a kernel cached by a process with another ATEN_CPU_CAPABILITY (the numerics
    reruns) gave wrong scores when reused."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = CONFIGS[family]()
    config._attn_implementation = "flex_attention"
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config)).eval()
    torch.nn.init.normal_(model.v_head.weight)
    reference = RewardModel(AutoModel.from_config(CONFIGS[family]())).eval()
    reference.load_state_dict(model.state_dict())
    items = make_items(3, seed=5)
    with torch.no_grad():
        packed = PairCollator(1, share_prompt=True, arrangement="flat", pad_to_multiple_of=128)(items)
        out = objective_forward(model, packed, END_TOKEN)
        expected = objective_forward(reference, PairCollator(1)(items), END_TOKEN)
    tolerance = rounding_tolerance(expected["scores"])
    torch.testing.assert_close(out["scores"], expected["scores"], atol=tolerance, rtol=0)


def test_the_dense_mask_keeps_documents_and_answers_apart():
    # Two documents in one row: [prompt, answer 1, answer 2] and [prompt, answer], then padding.
    segments = torch.tensor([[0, 0, 1, 2, 2, 0, 1, 1, -1]])
    documents = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
    visible = segment_attention_mask(segments, torch.float64, documents)[0, 0] == 0
    assert visible[3].tolist() == [True, True, False, True, False, False, False, False, False]
    assert visible[6].tolist() == [False] * 5 + [True, True, False, False]
    assert visible[8].tolist() == [False] * 8 + [True]
    assert visible.any(-1).all()


@pytest.mark.numerics
def test_zero3_two_ranks_with_checkpointing_step_by_the_global_mean_gradient(tmp_path):
    """`zero3_packed_step.py`: one ZeRO-3 optimizer step on two ranks (gradient checkpointing, two
    accumulated micro-batches of packed token-budget rows, SGD at rate 1) moves every weight by the
    gradient of the mean loss over the step's examples, computed here on one unpacked batch."""
    from zero3_packed_step import ACCUMULATION, BUDGET, WORLD_SIZE

    path = tmp_path / "weights.pt"
    result = run_ranks([*launcher(WORLD_SIZE), os.path.join(TESTS, "zero3_packed_step.py"), str(path)],
                       env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}", **launcher_env(WORLD_SIZE)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = torch.load(path, weights_only=True)
    model = reward_model("llama")
    steps = budget_parts(packing_items(3, seed=11), WORLD_SIZE, ACCUMULATION, BUDGET)
    everything = [{key: value for key, value in item.items() if key != "loss_denominator"}
                  for step in steps for part in step for item in part]
    assert len({len(part) for step in steps for part in step}) > 1
    _, grads = forward_backward(model, PairCollator(1)(everything), END_TOKEN)
    scale = max(grad.abs().max().item() for grad in grads)
    for (name, _), grad in zip(model.named_parameters(), grads, strict=True):
        moved = (saved["before"][name] - saved["after"][name]).double()
        assert_close(moved, grad, torch.float32, scale, f"step of {name}")


def test_a_token_budget_run_learns_from_packed_rows(tmp_path, model_dirs, synthetic_dir):
    from test_train import MIN_ACCURACY, train

    _, meta, log = train(tmp_path, model_dirs["opt"], synthetic_dir, "--max_tokens_per_batch", "1500")
    assert "batches: one packed row per prompt, computing it once, packed several to a row as wide as the " \
           "longest, 1500 tokens per device and step, grouped by length within windows of 32 steps" in log
    assert meta["final_eval"]["accuracy"] >= MIN_ACCURACY, log[-2000:]


class Sizes:
    """A stand-in training set of the given document sizes."""

    def __init__(self, sizes: list[int]):
        self.sizes = np.array(sizes)

    def tokens(self, share_prompt: bool) -> np.ndarray:
        return self.sizes

    def loss_units(self) -> np.ndarray:
        return np.ones(len(self.sizes))


def test_documents_over_the_budget_are_trained_alone_with_one_note(capsys):
    from step2_reward_model.main import train_sampler
    from step2_reward_model.training import Placement

    args = parse_training_args(["--model_name_or_path", "m", "--max_tokens_per_batch", "100"])
    capsys.readouterr()  # what importing DeepSpeed printed
    sizes = [30, 250, 40, 120, 60, 20]
    sampler, items = train_sampler(args, Sizes(sizes), PairCollator(0, share_prompt=True, arrangement="fit"),
                                   True, Placement(0, 1, torch.device("cpu")))
    assert capsys.readouterr().out == ("note: 2 training example(s) have more tokens than --max_tokens_per_batch 100 "
                                       "(the longest 250): each is trained alone in its device's share of a step\n")
    parts = [part.tolist() for step in sampler.global_batches() for part in step]
    assert sorted(i for part in parts for i in part) == list(range(len(sizes)))  # nothing dropped
    assert [1] in parts and [3] in parts
    assert isinstance(items, WithDenominator)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on a GPU only")
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("family", ["opt", "llama", "mistral", "qwen2"])
def test_flex_attention_trains_on_one_flat_row_as_on_padded_rows(family, share):
    """On a GPU, in float32 (no TF32): FlexAttention on one flat row of packed documents gives the
    loss, scores and gradients of SDPA on one padded row per response."""
    torch.backends.cuda.matmul.allow_tf32 = False
    models = {}
    for attention in ("flex_attention", "sdpa"):
        config = CONFIGS[family]()
        config._attn_implementation = attention
        torch.manual_seed(0)
        models[attention] = RewardModel(AutoModel.from_config(config)).cuda()
        torch.nn.init.normal_(models[attention].v_head.weight, generator=torch.Generator("cuda").manual_seed(1))
    models["flex_attention"].load_state_dict(models["sdpa"].state_dict())
    items = packing_items(3, seed=6)

    def on_gpu(batch: Batch) -> Batch:
        return batch.to(torch.device("cuda"))

    packed = on_gpu(PairCollator(1, share_prompt=share, arrangement="flat", pad_to_multiple_of=128)(items))
    padded = on_gpu(PairCollator(1)(items))
    (out, grads), (expected, expected_grads) = (forward_backward(models["flex_attention"], packed, END_TOKEN),
                                                forward_backward(models["sdpa"], padded, END_TOKEN))
    for key in ("loss", "scores"):
        torch.testing.assert_close(out[key], expected[key], atol=rounding_tolerance(expected[key]), rtol=0)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, atol=rounding_tolerance(*expected_grads), rtol=0)


@pytest.mark.parametrize("arrangement", ["row", "fit", "flat"])
def test_rows_wider_than_the_position_table_score_as_padded_rows(arrangement):
    """A prompt with three answers is longer than OPT's 64 positions, though each answer's own
    row fits: padding never takes a position past the table, and the scores are the padded ones."""
    config = CONFIGS["opt"]()
    config.max_position_embeddings = 64
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config)).double()
    rng = np.random.default_rng(0)
    items = [{"prompt": rng.integers(3, VOCAB, size=prompt),
              "responses": [rng.integers(3, VOCAB, size=answer) for _ in range(count)],
              "ranks": np.arange(count), "margin": 0.0, "source": 0}
             for prompt, answer, count in ((20, 30, 3), (4, 5, 2))]
    packed = PairCollator(1, share_prompt=True, arrangement=arrangement)(items)
    assert packed.inputs.input_ids.shape[1] > config.max_position_embeddings
    assert packed.layout.position_ids.max() == 49
    assert_outputs_equal(model, packed, PairCollator(1)(items), ("loss", "scores"), END_TOKEN)


@pytest.mark.parametrize("share,arrangement", PACKED)
def test_packed_training_never_waits_on_the_device(share, arrangement):
    """Packed rows with a loss denominator (pairs), and packed solutions: no tensor-to-Python
    conversion in the forward and backward."""
    from test_prefix_sharing import HostSyncs

    model = reward_model("opt")
    batch = PairCollator(1, share_prompt=share, arrangement=arrangement)(
        [{**item, "loss_denominator": 2.5} for item in packing_items(3)])
    steps = StepCollator(1, arrangement=arrangement)([{**item, "loss_denominator": 4.0} for item in step_items(5)])
    for layout, objective in ((batch, END_TOKEN), (steps, Process())):
        with HostSyncs() as syncs:
            objective.loss(model, model(layout.inputs, layout.layout), layout).loss.backward()
        assert syncs.seen == []
