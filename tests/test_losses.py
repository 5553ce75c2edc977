"""The vectorised losses against plain per-row implementations written here, values and gradients,
in float64: the two sum in different orders, so in float32 their rounding would depend on the CPU's
kernels; in float64 the default tolerance (1e-7) sits far above rounding and far below any error."""

import pytest
import torch
import torch.nn.functional as F

from step2_reward_model.losses import end_index, per_token_loss, ranked_pair_loss

pytestmark = pytest.mark.numerics

PAD = 1


def random_pairs(pairs: int, seed: int, bos: int | None = 2):
    """Right-padded chosen/rejected rows that share a prompt, as the collator builds them."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(pairs):
        prompt = torch.randint(3, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        if bos is not None:
            prompt = torch.cat([torch.tensor([bos]), prompt])
        for _ in range(2):
            answer = torch.randint(3, 50, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen)
            rows.append(torch.cat([prompt, answer]))
    chosen, rejected = rows[0::2], rows[1::2]
    width = max(len(r) for r in rows) + 3
    ids = torch.full((2 * pairs, width), PAD)
    mask = torch.zeros((2 * pairs, width), dtype=torch.long)
    for i, row in enumerate(chosen + rejected):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    values = torch.randn(2 * pairs, width, generator=gen, dtype=torch.float64, requires_grad=True)
    return ids, mask, values


def reference_per_token(values, ids, pad_id, num_padding_at_beginning):
    """DeepSpeed-Chat's loop: the end is the first pad after the leading ones, one row at a time."""
    pairs, width = ids.shape[0] // 2, ids.shape[1]
    total = 0.0
    for i in range(pairs):
        c_ids, r_ids = ids[i], ids[pairs + i]
        c_pads = (c_ids == pad_id).nonzero()
        c_end = c_pads[num_padding_at_beginning].item() if len(c_pads) > num_padding_at_beginning else width
        r_pads = (r_ids == pad_id).nonzero()
        r_end = r_pads[num_padding_at_beginning].item() if len(r_pads) > num_padding_at_beginning else width
        start = (c_ids != r_ids).nonzero()[0].item()
        stop = max(c_end, r_end)
        total = total + -F.logsigmoid(values[i, start:stop] - values[pairs + i, start:stop]).mean()
    return total / pairs


def test_per_token_loss_matches_per_row_reference_values_and_gradients():
    for seed in range(5):
        ids, mask, values = random_pairs(6, seed)
        n = ids.shape[0] // 2
        ours = per_token_loss(values[:n], values[n:], ids[:n], ids[n:], mask[:n], mask[n:])
        (grad_ours,) = torch.autograd.grad(ours, values)
        ref = reference_per_token(values, ids, PAD, num_padding_at_beginning=0)
        (grad_ref,) = torch.autograd.grad(ref, values)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad_ours, grad_ref)


def test_per_token_loss_with_opt_pad_equal_to_bos():
    """OPT: `</s>` is bos and pad, so DeepSpeed-Chat skips one leading pad; the mask needs no such count."""
    ids, mask, values = random_pairs(4, seed=7, bos=PAD)
    n = ids.shape[0] // 2
    ours = per_token_loss(values[:n], values[n:], ids[:n], ids[n:], mask[:n], mask[n:])
    torch.testing.assert_close(ours, reference_per_token(values, ids, PAD, num_padding_at_beginning=1))


def test_per_token_loss_counts_only_the_span_where_answers_differ():
    ids = torch.tensor([[2, 5, 6, 7, 1, 1], [2, 5, 6, 9, 9, 1]])
    mask = (ids != 1).long()
    values = torch.zeros(2, 6, dtype=torch.float64)
    values[0, 3] = 2.0  # chosen value where the answers start to differ
    values[0, 0] = 100.0  # shared prompt: outside the span, must not count
    loss = per_token_loss(values[:1], values[1:], ids[:1], ids[1:], mask[:1], mask[1:])
    expected = -F.logsigmoid(torch.tensor([2.0, 0.0], dtype=torch.float64)).mean()  # span = [3, 5)
    torch.testing.assert_close(loss, expected)


def test_bradley_terry_matches_per_row_formula_and_gradient():
    """--loss end_token on pairs (chosen rows, then rejected rows) is Bradley-Terry on the end scores."""
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    group, rank = torch.arange(8).repeat(2), torch.arange(2).repeat_interleave(8)
    loss = ranked_pair_loss(torch.cat([chosen, rejected]), group, rank)
    expected = sum(torch.log1p(torch.exp(-(c - r))) for c, r in zip(chosen, rejected, strict=True)) / 8
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, chosen)
    torch.testing.assert_close(grad, -(1 - torch.sigmoid(chosen - rejected)).detach() / 8)


def test_end_index_from_mask_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert end_index(mask).tolist() == [2, 4, 4, 0]
