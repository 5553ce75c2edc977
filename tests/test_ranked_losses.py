"""Ranked, listwise and step losses against formulas written here with explicit loops, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from rlhf_reward.utils.data.batch import Batch, Layout, ModelInputs, Ranking
from rlhf_reward.utils.model_files import load_hf_tokenizer

from step2_reward_model.flags import parse_training_args
from step2_reward_model.losses import LOSSES, plackett_luce_loss, ranked_pair_loss, step_loss
from step2_reward_model.metrics import ranking_metrics
from step2_reward_model.model import create_reward_model
from step2_reward_model.objectives import objective_for

pytestmark = pytest.mark.numerics


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


def softplus(x):
    """-log sigmoid(-x), written out rather than taken from torch."""
    return torch.log1p(torch.exp(x))


def reference_pair_loss(scores, group, rank, margin=None, center_coefficient=0.0):
    """Loop over groups, then over ordered pairs: mean per group, then mean over groups with a pair."""
    group_losses = []
    for g in sorted(set(group.tolist())):
        rows = [i for i in range(len(scores)) if group[i] == g]
        terms = []
        for i in rows:
            for j in rows:
                if rank[i] < rank[j]:
                    m = 0.0 if margin is None else margin[g]
                    terms.append(softplus(-(scores[i] - scores[j] - m))
                                 + center_coefficient * (scores[i] + scores[j]) ** 2)
        if terms:
            group_losses.append(sum(terms) / len(terms))
    return sum(group_losses) / len(group_losses)


def reference_plackett_luce(scores, group, rank):
    """Loop over groups and rows: -log(e^{s_i} / sum of e^{s_j} over the group's rows ranked no better than i)."""
    group_losses = []
    for g in sorted(set(group.tolist())):
        rows = [i for i in range(len(scores)) if group[i] == g]
        worst = max(rank[i] for i in rows)
        terms = [-torch.log(torch.exp(scores[i]) / sum(torch.exp(scores[j]) for j in rows if rank[j] >= rank[i]))
                 for i in rows if rank[i] < worst]
        if terms:
            group_losses.append(sum(terms) / len(terms))
    return sum(group_losses) / len(group_losses)


def mixed_batch(seed: int):
    """Groups of sizes 1..5 with tied ranks and an all-tied group, rows shuffled so that groups interleave."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 5, 2, 4, 3]
    group = torch.cat([torch.full((k,), g) for g, k in enumerate(sizes)])
    rank = torch.cat([torch.randint(0, 3, (k,), generator=gen) for k in sizes])
    rank[group == 5] = 1  # all tied: no pair, no term
    order = torch.randperm(len(group), generator=gen)
    scores = torch.randn(len(group), generator=gen, dtype=torch.float64).requires_grad_()
    margin = torch.rand(len(sizes), generator=gen, dtype=torch.float64)
    return scores, group[order], rank[order], margin


def pairs_batch(pairs: int, seed: int):
    """K=2: chosen rows first, then rejected rows, as the pairwise collator lays them out."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randn(pairs, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(pairs, generator=gen, dtype=torch.float64, requires_grad=True)
    group = torch.cat([torch.arange(pairs), torch.arange(pairs)])
    rank = torch.cat([torch.zeros(pairs, dtype=torch.long), torch.ones(pairs, dtype=torch.long)])
    return chosen, rejected, group, rank


def assert_same_value_and_grad(ours, ref, inputs):
    torch.testing.assert_close(ours, ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs), strict=True):
        torch.testing.assert_close(g_ours, g_ref)


PROMPT_TOKENS, ANSWER_TOKENS = 5, 7
# Responses per prompt of the batch on which each loss differs from every other loss that can score it:
# on pairs Plackett-Luce is Bradley-Terry, and the per-token loss takes pairs only.
TELLING_RESPONSES = {"per_token": 2, "end_token": 3, "plackett_luce": 3}


def responses_batch(prompts: int, responses: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Unpadded rows in PairCollator's layout: block k holds every prompt's answer of rank k (for pairs: all
    chosen, then all rejected), with `group`, `rank` and a zero `margin`. The answers of a prompt differ from
    their first token on, and every row ends at its last column."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(vocab, (prompts, PROMPT_TOKENS), generator=gen)
    answers = torch.randint(vocab, (responses, prompts, ANSWER_TOKENS), generator=gen)
    answers[:, :, 0] = torch.randperm(vocab, generator=gen)[:responses, None]
    input_ids = torch.cat([prompt.expand(responses, -1, -1), answers], -1).reshape(responses * prompts, -1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "group": torch.arange(prompts).repeat(responses),
            "rank": torch.arange(responses).repeat_interleave(prompts), "margin": torch.zeros(prompts)}


def reference_per_token(values: torch.Tensor, input_ids: torch.Tensor, pairs: int) -> torch.Tensor:
    """Unpadded rows of one length: per pair, the mean of -log sigmoid(v_chosen - v_rejected) from the first
    token where the two rows differ to the end; then the mean over pairs."""
    width, pair_losses = input_ids.shape[1], []
    for p in range(pairs):
        start = next(t for t in range(width) if input_ids[p, t] != input_ids[pairs + p, t])
        terms = [softplus(values[pairs + p, t] - values[p, t]) for t in range(start, width)]
        pair_losses.append(sum(terms) / len(terms))
    return sum(pair_losses) / pairs


def reference_losses(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every loss that can score this batch, by loops over the model's per-token values."""
    scores, group, rank = values[:, -1], batch["group"], batch["rank"]
    losses = {"end_token": reference_pair_loss(scores, group, rank),
              "plackett_luce": reference_plackett_luce(scores, group, rank)}
    if rank.max() == 1:
        losses["per_token"] = reference_per_token(values, batch["input_ids"], len(batch["margin"]))
    return losses


def test_every_loss_name_parses_and_reaches_its_own_loss(model_dirs):
    """Each --loss choice, built into a reward model as main builds it, trains on its own loss and on no other;
    a name that is not a choice is refused instead of falling through to RewardModel's pairwise branch."""
    assert set(TELLING_RESPONSES) == set(LOSSES)
    with pytest.raises(SystemExit):
        parse_training_args(["--model_name_or_path", model_dirs["opt"], "--loss", "bradley_terry"])
    tokenizer = load_hf_tokenizer(model_dirs["opt"])
    eps = torch.finfo(torch.float64).eps
    for name in LOSSES:
        args = parse_training_args(["--model_name_or_path", model_dirs["opt"], "--loss", name])
        model = create_reward_model(args.model_name_or_path, tokenizer).double()
        torch.nn.init.normal_(model.v_head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        batch = responses_batch(prompts=3, responses=TELLING_RESPONSES[name], vocab=len(tokenizer), seed=0)
        typed = Batch(ModelInputs(batch["input_ids"], batch["attention_mask"]),
                      Ranking(batch["group"], batch["rank"], batch["margin"]), Layout())
        loss = objective_for(args).loss(model, model(typed.inputs, typed.layout), typed).loss
        with torch.no_grad():
            references = reference_losses(model.values(batch["input_ids"], batch["attention_mask"]), batch)
        torch.testing.assert_close(loss, references.pop(name), rtol=100 * eps, atol=0,
                                   msg=lambda message, name=name: f"--loss {name}: {message}")
        for other, reference in references.items():
            assert abs(loss.item() - reference.item()) > 0.01, f"--loss {name} gives the {other} loss"


def test_ranked_pair_loss_best_of_n_by_hand():
    a, b, c, d = 2.0, 0.5, -1.0, 3.0
    scores = torch.tensor([a, b, c, d], requires_grad=True)
    loss = ranked_pair_loss(scores, torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 1, 1]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(math.log1p(math.exp(-(a - x))) for x in (b, c, d)) / 3
    torch.testing.assert_close(loss, torch.tensor(expected))
    (grad,) = torch.autograd.grad(loss, scores)
    losers = [-(1 - sig(a - x)) for x in (b, c, d)]  # d/ds_i of each pair loss
    torch.testing.assert_close(grad, torch.tensor([sum(losers), -losers[0], -losers[1], -losers[2]]) / 3)


def test_ranked_pair_loss_matches_loops_with_ties_margin_and_centering():
    for seed in range(5):
        scores, group, rank, margin = mixed_batch(seed)
        for kwargs in ({}, {"margin": margin}, {"center_coefficient": 0.1},
                       {"margin": margin, "center_coefficient": 0.3}):
            ours = ranked_pair_loss(scores, group, rank, **kwargs)
            ref = reference_pair_loss(scores, group, rank, **kwargs)
            assert_same_value_and_grad(ours, ref, [scores])


def test_ranked_pair_loss_weighs_groups_equally():
    """A 2-pair group and a 1-pair group: mean of the group means, not of the 3 pairs."""
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    group, rank = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 0, 1, 1, 1])
    g0 = (softplus(-(scores[0] - scores[2])) + softplus(-(scores[0] - scores[4]))) / 2
    g1 = softplus(-(scores[1] - scores[3]))
    torch.testing.assert_close(ranked_pair_loss(scores, group, rank), (g0 + g1) / 2)


def test_ranked_pair_loss_with_k2_is_bradley_terry():
    chosen, rejected, group, rank = pairs_batch(8, seed=0)
    scores = torch.cat([chosen, rejected])
    assert_same_value_and_grad(ranked_pair_loss(scores, group, rank), bradley_terry(chosen, rejected),
                               [chosen, rejected])
    margin = torch.rand(8, dtype=torch.float64)
    assert_same_value_and_grad(ranked_pair_loss(scores, group, rank, margin=margin),
                               bradley_terry(chosen - margin, rejected), [chosen, rejected])
    centered = bradley_terry(chosen, rejected) + 0.2 * ((chosen + rejected) ** 2).mean()
    assert_same_value_and_grad(ranked_pair_loss(scores, group, rank, center_coefficient=0.2), centered,
                               [chosen, rejected])


def test_ranked_pair_loss_zero_margin_and_zero_coefficient_change_nothing():
    scores, group, rank, margin = mixed_batch(seed=1)
    zero_margin = ranked_pair_loss(scores, group, rank, margin=torch.zeros_like(margin))
    assert_same_value_and_grad(zero_margin, ranked_pair_loss(scores, group, rank), [scores])
    zero_center = ranked_pair_loss(scores, group, rank, margin=margin, center_coefficient=0.0)
    assert_same_value_and_grad(zero_center, ranked_pair_loss(scores, group, rank, margin=margin), [scores])


def test_all_tied_group_contributes_nothing():
    """Appending a fully tied group (interleaved) leaves both losses and their gradients unchanged."""
    scores = torch.tensor([1.0, -0.5, 0.3, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    group, rank = torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 1, 1, 1, 2])
    alone = scores[[0, 2, 4]]
    for loss in (ranked_pair_loss, plackett_luce_loss):
        with_tied = loss(scores, group, rank)
        torch.testing.assert_close(with_tied, loss(alone, torch.zeros(3, dtype=torch.long), rank[[0, 2, 4]]))
        (grad,) = torch.autograd.grad(with_tied, scores)
        assert grad[1] == 0 and grad[3] == 0


def test_no_pair_at_all_gives_a_connected_zero():
    scores = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    group, rank = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0])
    for loss in (ranked_pair_loss(scores, group, rank), plackett_luce_loss(scores, group, rank)):
        assert loss.item() == 0 and loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.equal(grad, torch.zeros(3))


def test_losses_keep_the_input_dtype():
    scores, group, rank, margin = mixed_batch(seed=2)
    for dtype in (torch.float64, torch.bfloat16):
        s = scores.detach().to(dtype)
        assert ranked_pair_loss(s, group, rank, margin=margin, center_coefficient=0.1).dtype == dtype
        assert plackett_luce_loss(s, group, rank).dtype == dtype


def test_plackett_luce_strict_k3_is_the_product_formula():
    a, b, c = torch.tensor([1.5, -0.2, 0.4], requires_grad=True)
    scores = torch.stack([c, a, b])  # rows out of rank order
    loss = plackett_luce_loss(scores, torch.zeros(3, dtype=torch.long), torch.tensor([2, 0, 1]))
    p = torch.exp(a) / (torch.exp(a) + torch.exp(b) + torch.exp(c)) * torch.exp(b) / (torch.exp(b) + torch.exp(c))
    torch.testing.assert_close(loss, -torch.log(p) / 2)


def test_plackett_luce_best_of_n_is_a_softmax_over_the_group():
    scores = torch.tensor([0.3, 1.0, -2.0, 0.5], requires_grad=True)
    loss = plackett_luce_loss(scores, torch.zeros(4, dtype=torch.long), torch.tensor([1, 0, 1, 1]))
    torch.testing.assert_close(loss, -torch.log_softmax(scores, 0)[1])
    (grad,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(grad, torch.softmax(scores, 0).detach() - torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_plackett_luce_matches_loops_with_ties_and_interleaved_groups():
    for seed in range(5):
        scores, group, rank, _ = mixed_batch(seed)
        assert_same_value_and_grad(plackett_luce_loss(scores, group, rank),
                                   reference_plackett_luce(scores, group, rank), [scores])


def test_plackett_luce_breslow_ties_by_hand():
    """Ranks [0, 1, 1, 2]: both tied rows compete against {themselves, each other, the worst}."""
    s = torch.tensor([0.2, -0.4, 1.1, 0.0], dtype=torch.float64)
    loss = plackett_luce_loss(s, torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 1, 2]))
    e = torch.exp(s)
    terms = [-torch.log(e[0] / e.sum()), -torch.log(e[1] / e[1:].sum()), -torch.log(e[2] / e[1:].sum())]
    torch.testing.assert_close(loss, sum(terms) / 3)


def test_plackett_luce_with_k2_is_bradley_terry():
    chosen, rejected, group, rank = pairs_batch(8, seed=3)
    assert_same_value_and_grad(plackett_luce_loss(torch.cat([chosen, rejected]), group, rank),
                               bradley_terry(chosen, rejected), [chosen, rejected])


def test_ranking_metrics_on_a_handmade_batch():
    rows = [  # (group, rank, score)
        (0, 0, 3.0), (0, 1, 1.0), (0, 2, 2.0),  # pairs 3, correct 2; top-1 right
        (1, 0, 0.5), (1, 1, 0.5),  # score tie: 0.5 of a pair; top-1 not strictly best
        (2, 1, 4.0), (2, 1, 0.0),  # all tied: no pair, no single best
        (3, 1, 1.0), (3, 0, 2.0), (3, 1, -1.0), (3, 1, 2.0),  # best-of-N: correct 2.5 of 3; top-1 tied, wrong
        (4, 0, 9.0),  # single row: nothing
        (5, 2, -1.0), (5, 5, -3.0),  # pairs 1, correct 1; top-1 right
    ]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    group, rank, scores = (torch.tensor([rows[i][k] for i in order]) for k in range(3))
    metrics = ranking_metrics(scores, group, rank)
    expected = {"pairs_correct": 6.0, "pairs": 8.0, "top1_correct": 2.0, "groups_with_top1": 4.0}
    assert {k: v.item() for k, v in metrics.items()} == expected
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in metrics.values())


def test_ranking_metrics_with_k2_is_pairwise_accuracy():
    chosen, rejected, group, rank = pairs_batch(50, seed=4)
    metrics = ranking_metrics(torch.cat([chosen, rejected]), group, rank)
    accuracy = (chosen > rejected).double().mean()
    torch.testing.assert_close(metrics["pairs_correct"] / metrics["pairs"], accuracy)
    assert metrics["top1_correct"] == (chosen > rejected).sum() and metrics["groups_with_top1"] == 50


def test_step_loss_matches_hand_formula_on_masked_steps():
    logits = torch.tensor([0.8, -1.2, 3.0, 0.1, -0.5], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([True, True, False, True, False])
    loss = step_loss(logits, labels, mask)
    used = [i for i in range(5) if mask[i]]
    sig = torch.sigmoid(logits.detach())
    expected = -sum(labels[i] * torch.log(sig[i]) + (1 - labels[i]) * torch.log(1 - sig[i]) for i in used) / len(used)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[mask], labels[mask]))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.where(mask, sig - labels, 0.0) / len(used))


def test_step_loss_without_labelled_steps_is_a_connected_zero():
    logits = torch.tensor([0.8, -1.2], requires_grad=True)
    loss = step_loss(logits, torch.ones(2), torch.zeros(2, dtype=torch.bool))
    assert loss.item() == 0 and loss.grad_fn is not None
    assert torch.equal(torch.autograd.grad(loss, logits)[0], torch.zeros(2))
