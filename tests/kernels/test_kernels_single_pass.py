"""backend="cublas" (issue 23): the single pass on cuBLAS GEMMs with the Triton row sweep (kernels/shifted_exp.py,
fastpmd/single_pass.py), against float64 references: values and gradients, ragged shapes, several chunks and
logits sub-blocks, the rare max-shift rows, bias, temperature, per-sequence tau and weights. Under the
interpreter on CPU (the GEMMs then run as fp32 torch.mm); compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in compiled mode before this module; "
                                "test_interpreter_subprocess runs this module in a fresh process")

import fastpmd  # noqa: E402
from fastpmd import cost_model  # noqa: E402
from fastpmd.kernels.shifted_exp import SHIFT_LIMIT, shifted_exp  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
B, T, H, V = 5, 11, 40, 203      # ragged vs the interpreter's BLOCK_V = 32


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _rel(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@in_process
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16])
def test_shifted_exp_against_float64(e_dtype):
    """logp and -inv_s * E = onehot - softmax, for ordinary rows, a confident row (logp ~ -1e-7: no 1 + x
    rounding) and rows whose target lies more than SHIFT_LIMIT below the max (the second, max-shifted sweep)."""
    n = 9
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(n, V, generator=g) * 3.0
    bias = torch.randn(V, generator=g) * 0.5
    tgt = torch.randint(0, V, (n,), generator=g)
    raw[1, tgt[1]] = 60.0                                  # confident: p_target = 1 - O(1e-20)
    raw[2, tgt[2]] = -2.0 * SHIFT_LIMIT                    # log p < -SHIFT_LIMIT: max-shifted
    raw[3, (tgt[3] + 7) % V] = 3.0 * SHIFT_LIMIT           # one far larger logit elsewhere: max-shifted
    inv_t = 1 / 0.9
    e = torch.full((n, V), float("nan"), dtype=e_dtype, device=DEV)
    logp, inv_s = shifted_exp(raw.to(DEV), bias.to(DEV), tgt.to(DEV), inv_t, e)
    logp, inv_s, e = logp.cpu(), inv_s.cpu(), e.cpu()
    z = (raw.double() + bias.double()) * inv_t
    ref_logp = z.log_softmax(-1).gather(1, tgt[:, None])[:, 0]
    assert (logp.double() - ref_logp).abs().max() < 2e-5
    assert abs(logp[1].item() - ref_logp[1].item()) < 1e-9 and logp[2].item() < -SHIFT_LIMIT
    onehot = torch.nn.functional.one_hot(tgt, V).double()
    got = -inv_s.double()[:, None] * e.double()
    p = z.softmax(-1)
    want = torch.where(onehot > 0, (p * (1 - onehot)).sum(-1, keepdim=True), -p)   # 1 - p_t without cancelling
    # fp32: the rounding of z = (raw + b) / T; bf16: one rounding of E (2^-8; the interpreter truncates: 2^-7)
    tol = 2e-5 if e_dtype == torch.float32 else 2 ** -7
    assert not got.isnan().any()
    assert ((got - want).abs() <= tol * want.abs() + 1e-30).all(), ((got - want).abs() / want.abs()).max()
    assert 0 < got[1, tgt[1]] < 1e-20                     # the confident row's 1 - p_t survives


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.5
    tgt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[3] = False                                         # a fully masked sequence
    old = torch.randn(B, T, generator=g) * 0.1 - 5.0
    adv = torch.randn(B, generator=g)
    cast = (lambda t: t.to(dtype).to(DEV))
    return cast(hid), cast(w), cast(b), tgt.to(DEV), mask.to(DEV), old.to(DEV), adv.to(DEV)


def _run(backend, hid, w, b, tgt, mask, old, adv, **kw):
    h1, w1, b1 = (t.detach().clone().requires_grad_() for t in (hid, w, b))
    loss, metrics = fastpmd.fused_linear_pmd_loss(h1, w1, tgt, mask, old, adv, bias=b1, backend=backend, **kw)
    (loss * 3.0).backward()                                 # an upstream gradient != 1
    return loss.detach(), metrics, h1.grad, w1.grad, b1.grad


@in_process
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_cublas_against_float64(dtype, tol, per_sequence, monkeypatch):
    """Several chunks of whole sequences (chunk_size 17) and logits sub-blocks of 5 rows, against the naive
    float64 loss of the same (rounded) inputs. bf16: E and the scaled hidden rows pass through bf16."""
    monkeypatch.setattr(cost_model, "CUBLAS_SUB_BYTES", 4 * V * 5)
    inputs = _inputs(dtype)
    kw = dict(temperature=0.9, length_norm=True)
    if per_sequence:
        kw.update(tau=torch.tensor([0.1, 0.03, 0.7, 0.2, 0.05], device=DEV),
                  weights=torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8], device=DEV))
    else:
        kw.update(tau=0.05)
    got = _run("cublas", *inputs, chunk_size=17, **kw)
    ref = _run("naive", *(t.double() if t.is_floating_point() else t for t in inputs), **kw)
    assert _rel(got[0], ref[0]) < 1e-5                                   # the loss: fp32 logits, exact softmax
    for key in ("logratio_mean", "logratio_min", "ppo_kl"):                # Delta_i: the sums of log-ratios
        assert _rel(got[1][key], ref[1][key]) < 1e-5, key
    for a, r, name in zip(got[2:], ref[2:], ("grad_hidden", "grad_weight", "grad_bias")):
        assert a.dtype == dtype
        assert _rel(a, r) < tol, (name, _rel(a, r))


@in_process
def test_cublas_equals_torch_single_pass_and_long_sequences_run_triton():
    """Same numbers as the torch backend's single pass; a sequence longer than chunk_size runs triton's two
    passes (same result again)."""
    inputs = _inputs(torch.float32, seed=1)
    kw = dict(tau=0.1, temperature=1.3)
    cub = _run("cublas", *inputs, chunk_size=20, **kw)
    tor = _run("torch", *inputs, chunk_size=20, **kw)
    long = _run("cublas", *inputs, chunk_size=4, **kw)              # every sequence (up to 11 tokens) too long
    for a, r, c in zip(cub[2:] + (cub[0],), tor[2:] + (tor[0],), long[2:] + (long[0],)):
        assert _rel(a, r) < 2e-6 and _rel(c, r) < 2e-5


@in_process
def test_cublas_runs_triton_where_no_single_pass_applies():
    """fp16 heads (E would overflow fp16) and linear_logprobs (no loss gradient at hand) run the triton kernels:
    same numbers as backend="triton"."""
    hid, w, b, tgt, mask, old, adv = _inputs(torch.float16)
    kw = dict(tau=0.1)
    cub = _run("cublas", hid, w, b, tgt, mask, old, adv, **kw)
    tri = _run("triton", hid, w, b, tgt, mask, old, adv, **kw)
    for a, r in zip(cub[2:] + (cub[0],), tri[2:] + (tri[0],)):
        assert torch.equal(a, r)
    lp_c = fastpmd.linear_logprobs(hid.float(), w.float(), tgt, mask=mask, backend="cublas")
    lp_t = fastpmd.linear_logprobs(hid.float(), w.float(), tgt, mask=mask, backend="triton")
    assert torch.equal(lp_c, lp_t)


@in_process
def test_cublas_without_grad_and_with_packed_rows():
    """torch.no_grad(): no gradient work, same loss; packed [n, H] rows give the padded layout's loss."""
    hid, w, b, tgt, mask, old, adv = _inputs(torch.float32, seed=2)
    with torch.no_grad():
        loss_ng, _ = fastpmd.fused_linear_pmd_loss(hid, w, tgt, mask, old, adv, tau=0.1, backend="cublas")
        packed, _ = fastpmd.fused_linear_pmd_loss(hid[mask], w, tgt, mask, old, adv, tau=0.1, backend="cublas")
        ref, _ = fastpmd.fused_linear_pmd_loss(hid.double(), w.double(), tgt, mask, old, adv, tau=0.1,
                                               backend="naive")
    assert _rel(loss_ng, ref) < 1e-5 and _rel(packed, ref) < 1e-5


@pytest.mark.skipif(IN_PROCESS, reason="kernels run in this process")
def test_interpreter_subprocess():
    run_module_in_subprocess(__file__)
