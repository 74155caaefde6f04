"""The public LM-head ops under torch.compile(fullgraph=True) (issue 23): no data-dependent host sync (row
compaction, the targets-range check, the sequence boundaries) breaks the graph; values and gradients equal eager.
CPU, torch backend, the aot_eager compile backend (dynamo + AOT autograd, no C++ toolchain needed)."""
from __future__ import annotations

import pytest
import torch

import fastpmd

B, T, H, V = 3, 6, 16, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.5
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    tgt[~mask] = -100                          # padding ids outside [0, V) where masked, as trainers pass them
    old = torch.randn(B, T, generator=g) * 0.1 - 3.0
    adv = torch.tensor([0.7, -0.4, 1.1])
    return hid, w, b, tgt, mask, old, adv


def _run(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o * (i + 1.0)).sum() for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _check(fn, *tensors):
    torch._dynamo.reset()
    want_out, want_grad = _run(fn, *tensors)
    got_out, got_grad = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), *tensors)
    for got, want in zip(got_out + got_grad, want_out + want_grad):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprobs_compiles_fullgraph(entropy, chunk):
    hid, w, b, tgt, mask, _, _ = _inputs()

    def fn(h, w_, b_):
        return fastpmd.linear_logprobs(h, w_, tgt, mask=mask, bias=b_, temperature=0.9, return_entropy=entropy,
                                       chunk_size=chunk, backend="torch")
    _check(fn, hid, w, b)


@pytest.mark.parametrize("chunk", [None, 4])          # 4: a sequence longer than the chunk (two-pass path)
def test_fused_pmd_loss_compiles_fullgraph(chunk):
    hid, w, _, tgt, mask, old, adv = _inputs(1)

    def fn(h, w_):
        loss, metrics = fastpmd.fused_linear_pmd_loss(h, w_, tgt, mask, old, adv, tau=0.3, chunk_size=chunk,
                                                      backend="torch")
        return loss, metrics["logratio_mean"]
    _check(fn, hid, w)


def test_targets_out_of_range_still_raise_in_eager():
    hid, w, b, tgt, mask, _, _ = _inputs()
    tgt = tgt.clone()
    tgt[0, 0] = V
    with pytest.raises(ValueError, match="targets"):
        fastpmd.linear_logprobs(hid, w, tgt, mask=mask, backend="torch")
