"""Packed rows into the loss: the policy returns the loss mask's final hidden states as [n, H] rows (no padded
[B, L, H] grid) and fastpmd's fused loss and linear_logprobs give the grid's loss, log-probs and gradients."""
import pytest
import torch

import fastpmd
from fastpmd.train.model import Policy
from test_model import _batch, _model


def _inputs(B=4, L=7, H=16, V=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 4
    targets = torch.randint(0, V, (B, L), generator=g)
    lengths = [5, 0, 7, 2]
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    mask[0, 0] = False  # a hole: rows are any mask, not only prefixes
    old = torch.randn(B, L, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return hidden, weight, targets, mask, old, adv


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_fused_loss_on_packed_rows_equals_the_grid(backend):
    hidden, weight, targets, mask, old, adv = _inputs()
    grads = []
    for packed in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        x = h[mask] if packed else h  # [n, H] rows of the mask
        loss, _ = fastpmd.fused_linear_pmd_loss(x, w, targets, mask, old, adv, tau=0.3, chunk_size=3,
                                                num_sequences=4, backend=backend)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_logprobs_on_packed_rows_equals_the_grid():
    hidden, weight, targets, mask, _, _ = _inputs(seed=1)
    grid = fastpmd.linear_logprobs(hidden, weight, targets, mask=mask, chunk_size=4, return_entropy=True)
    rows = fastpmd.linear_logprobs(hidden[mask], weight, targets, mask=mask, chunk_size=4, return_entropy=True)
    for a, b in zip(grid, rows):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="packed rows"):
        fastpmd.linear_logprobs(hidden[mask][1:], weight, targets, mask=mask)


@pytest.mark.parametrize("row_tokens", [None, 8])
def test_policy_returns_the_selected_rows(row_tokens):
    hf = _model()
    lengths = [5, 3, 7, 1, 6]
    ids, pos, valid = _batch(lengths, 9)
    select = valid.clone()
    select[:, 0] = False  # e.g. a loss mask: a subset of the valid tokens
    policy = Policy(hf, row_tokens=row_tokens)
    with torch.no_grad():
        grid, w = policy(ids, pos, valid)  # [B, L, H]
        rows, w2 = policy(ids, pos, valid, select)  # [n, H]
    assert rows.shape == (int(select.sum()), grid.shape[-1]) and w2 is w
    torch.testing.assert_close(rows, grid[select], rtol=0, atol=0)


def test_old_logprobs_take_their_own_token_budget(tmp_path):
    from fastpmd.train.cli import build_config
    from fastpmd.train.distributed import init_distributed, shutdown_distributed
    from fastpmd.train.microbatch import pack_micro_batches
    from fastpmd.train.packing import pack_batch
    from fastpmd.train.trainer import Trainer

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    try:
        cfg, _ = build_config(["--preset", "tiny-arith", "--out", str(tmp_path), "--no-export",
                               "--set", "optim.micro_batch_tokens=24"])
        t = Trainer(cfg, d)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, t.tok.vocab_size, (int(n),), generator=g).tolist() for n in (5, 9, 4, 7, 6, 8)]
        responses = [torch.randint(3, t.tok.vocab_size, (int(n),), generator=g).tolist() for n in (3, 2, 4, 1, 3, 2)]
        batch = pack_batch(prompts, responses, t.tok.pad_id)
        calls = []
        hook = t.policy.register_forward_hook(lambda *a: calls.append(1))
        small = t.old_logprobs(batch)
        n_small, calls[:] = len(calls), []
        cfg.optim.logprob_micro_batch_tokens = 64
        big = t.old_logprobs(batch)
        hook.remove()
        lengths = batch.attention_mask.sum(1).tolist()
        assert (n_small, len(calls)) == (len(pack_micro_batches(lengths, 24)), len(pack_micro_batches(lengths, 64)))
        assert len(calls) < n_small
        for a, b in zip(small, big):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        shutdown_distributed()
