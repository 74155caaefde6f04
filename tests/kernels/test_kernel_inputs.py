"""Inputs real models produce (issue 11), each against a float64 reference: a masked vocabulary (bias -inf on
the tail, like Qwen's padded 151665..152063, and on single columns), a strided bias, the 32-bit offset guards,
segments that do not cover every token, the CUDA device of the tensors and the architecture families.
triton runs under the interpreter on CPU (tests/triton_interp.py); the torch and naive backends alike."""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in compiled mode before this module; "
                                "test_interpreter_subprocess runs this module in a fresh process")

import fastpmd  # noqa: E402
from fastpmd.kernels import _runtime, configs, fused_linear_pmd_loss_triton, linear_logprobs_triton  # noqa: E402
from fastpmd.kernels import linear_logprobs as ll_mod  # noqa: E402
from fastpmd.kernels.backward import chunk_columns, validate_linear  # noqa: E402
from fastpmd.kernels.logits import _split_plan  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
N, H, V = 37, 40, 203
MASK_FROM = 128             # interpreter: 4 vocab splits of 64 columns; the last two are entirely -inf
MASKED_COLS = (57,)         # and single -inf columns inside live splits
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _inputs(dtype, n=N, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    keep = torch.ones(V, dtype=torch.bool)
    if masked:
        keep[MASK_FROM:] = False
        keep[list(MASKED_COLS)] = False
        b[~keep] = float("-inf")
    live = keep.nonzero()[:, 0]
    tgt = live[torch.randint(0, live.numel(), (n,), generator=g)]
    tgt[0], tgt[-1] = 0, int(live[-1])
    return [t.to(dtype).to(DEV) for t in (hid, w, b)] + [tgt.to(DEV), keep.to(DEV)]


def _ref(hid, w, b, tgt, keep, T):
    """float64 log-probs and entropies over the unmasked columns only (masked columns have p = 0 exactly)."""
    z = (hid.double() @ w.double()[keep].T + b.double()[keep]) / T
    ls = torch.log_softmax(z, -1)
    new_idx = keep.long().cumsum(0) - 1                       # column index among the kept ones
    return ls.gather(-1, new_idx[tgt][:, None])[:, 0], -(ls.exp() * ls).sum(-1)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _close(got, ref, tol, what):
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol})"


def _check_masked(call, dtype, tol_grad):
    """call(h, w, b, tgt) -> (logp, entropy) vs the float64 reference, values and the gradients of
    sum(gl * logp) + sum(ge * entropy): masked columns give weight rows and bias entries a gradient of exactly 0."""
    hid, w, b, tgt, keep = _inputs(dtype)
    T = 0.8
    h1, w1, b1 = _leaves(hid, w, b)
    lp, ent = call(h1, w1, b1, tgt, T)
    gl = torch.linspace(-1.0, 1.0, N, device=DEV, dtype=torch.float64)
    ge = torch.linspace(0.5, -0.7, N, device=DEV, dtype=torch.float64)
    ((lp.double() * gl).sum() + (ent.double() * ge).sum()).backward()
    h2, w2, b2 = _leaves(hid.double(), w.double(), b.double())
    lp64, ent64 = _ref(h2, w2, b2, tgt, keep, T)
    ((lp64 * gl).sum() + (ent64 * ge).sum()).backward()
    _close(lp, lp64, 1e-5, "logp")
    _close(ent, ent64, 1e-5, "entropy")
    _close(h1.grad, h2.grad, tol_grad, "grad_hidden")
    _close(w1.grad, w2.grad, tol_grad, "grad_weight")      # reference: 0 on the masked rows
    _close(b1.grad, torch.nan_to_num(b2.grad, nan=0.0), tol_grad, "grad_bias")
    assert (w1.grad[~keep] == 0).all() and (b1.grad[~keep] == 0).all()


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_vocab_triton(dtype):
    assert _split_plan(3, 7, torch.device(DEV)) == (2, 4) or ON_GPU      # whole splits [128, 192), [192, 203)
    _check_masked(lambda h, w, b, t, T: linear_logprobs_triton(h, w, t, b, T, True), dtype, TOL[dtype])


@pytest.mark.parametrize("backend,chunk", [("torch", 8), ("torch", None), ("naive", None)])
def test_masked_vocab_torch_and_naive(backend, chunk):
    def call(h, w, b, t, T):
        return fastpmd.linear_logprobs(h, w, t, bias=b, temperature=T, return_entropy=True, chunk_size=chunk,
                                       backend=backend)
    _check_masked(call, torch.float32, 1e-5)


def _pmd_ref(hid, w, b, tgt, keep, old, adv, lens, tau, T):
    lp, _ = _ref(hid, w, b, tgt, keep, T)
    loss, s = 0.0, 0
    for i, n in enumerate(lens):
        d = (lp[s:s + n] - old[s:s + n].double()).sum()
        loss = loss + (adv[i].double() - tau * d) ** 2 / (2 * tau) / n / len(lens)
        s += n
    return loss


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_vocab_fused_pmd(backend):
    if backend == "triton" and not IN_PROCESS:
        pytest.skip("kernels run in the subprocess")
    lens = [20, 17]
    hid, w, b, tgt, keep = _inputs(torch.float32)
    g = torch.Generator().manual_seed(1)
    old = (torch.randn(N, generator=g) * 0.1 - 5.0).to(DEV)
    adv = torch.randn(2, generator=g).to(DEV)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEV)
    mask[1, 17:] = False
    pad = lambda x: torch.cat([x, x[:3]]).view(2, 20, *x.shape[1:])  # noqa: E731  [n] -> [2, 20] (3 padded)
    h1, w1, b1 = _leaves(hid, w, b)
    loss, _ = fastpmd.fused_linear_pmd_loss(pad(h1), w1, pad(tgt), mask, pad(old), adv, tau=0.1, temperature=0.8,
                                            bias=b1, backend=backend)
    loss.backward()
    h2, w2, b2 = _leaves(hid.double(), w.double(), b.double())
    loss64 = _pmd_ref(h2, w2, b2, tgt, keep, old, adv, lens, 0.1, 0.8)
    loss64.backward()
    _close(loss, loss64, 1e-5, "loss")
    for got, ref, name in ((h1, h2, "grad_hidden"), (w1, w2, "grad_weight"), (b1, b2, "grad_bias")):
        _close(got.grad, torch.nan_to_num(ref.grad, nan=0.0), 1e-5, name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["every_other", "offset_slice"])
def test_strided_bias(backend, layout):
    """A bias that is a view: every other entry of a [2V] tensor, or a slice at an offset of a bigger one."""
    if backend == "triton" and not IN_PROCESS:
        pytest.skip("kernels run in the subprocess")
    hid, w, _, tgt, keep = _inputs(torch.float32, masked=False, seed=3)
    big = torch.randn(2 * V + 5).to(DEV).requires_grad_()
    b = big[::2][:V] if layout == "every_other" else big[5:5 + V]
    assert b.shape == (V,) and (not b.is_contiguous() or b.storage_offset() == 5)
    h1 = hid.clone().requires_grad_()
    lp, ent = fastpmd.linear_logprobs(h1, w, tgt, bias=b, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    b_ref = b.detach().double().requires_grad_()
    lp64, ent64 = _ref(hid, w, b_ref, tgt, keep, 1.0)
    (lp64.sum() + ent64.sum()).backward()
    _close(lp, lp64, 1e-5, "logp")
    _close(ent, ent64, 1e-5, "entropy")
    grad_b = big.grad[::2][:V] if layout == "every_other" else big.grad[5:5 + V]
    _close(grad_b, b_ref.grad, 1e-5, "grad_bias")


# ----------------------------------------------------------------------------------------- 32-bit offsets
def _meta(*shape, stride=None):
    return torch.empty(shape, device="meta") if stride is None else torch.empty_strided(shape, stride, device="meta")


def test_offset_guard_counts_spans_and_names_the_culprit():
    """Real sizes on the meta device (no memory): V*H = 2**31 exactly fits (largest offset 2**31 - 1); one more
    row of the weight is rejected naming the weight; a strided hidden with few elements but a large span is
    rejected naming the tokens."""
    tgt = torch.zeros(16, dtype=torch.long, device="meta")
    hid = _meta(16, 2**16)
    with pytest.raises(RuntimeError, match="CUDA"):                  # past every size check: only the device fails
        validate_linear(hid, _meta(2**15, 2**16), tgt, None, 1.0, "f")
    with pytest.raises(ValueError, match="weight") as e:
        validate_linear(hid, _meta(2**15 + 1, 2**16), tgt, None, 1.0, "f")
    assert "split the tokens" not in str(e.value)
    strided = _meta(16, 64, stride=(2**28, 1))                       # 1024 elements spanning 15 * 2**28 + 64
    with pytest.raises(ValueError, match="hidden.*split the tokens"):
        validate_linear(strided, _meta(100, 64), tgt, None, 1.0, "f")


@in_process
def test_dlogits_chunk_capped_and_checked_before_launch(monkeypatch):
    """With a huge FASTPMD_DLOGITS_MB the dlogits buffer [n, chunk] still stays below the offset limit (lowered
    here to 8121 = V*H + 1 elements), the backward is still right in several chunks, and a hidden over the
    limit is rejected before any kernel runs."""
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", 1 << 40)
    monkeypatch.setattr(_runtime, "INDEX_LIMIT", V * H + 1)
    cv = chunk_columns(N, V, 4, 32)
    assert N * cv < _runtime.INDEX_LIMIT and cv == 192                # 2 chunks instead of one of 224 columns
    with pytest.raises(ValueError, match="split the tokens"):
        chunk_columns(300, V, 4, 32)                                  # 300 x 32 > 8121
    hid, w, b, tgt, keep = _inputs(torch.float32, masked=False, seed=4)
    h1, w1 = _leaves(hid, w)
    lp, _ = linear_logprobs_triton(h1, w1, tgt, b, 1.0, False)
    lp.sum().backward()
    h2, w2 = _leaves(hid.double(), w.double())
    _ref(h2, w2, b, tgt, keep, 1.0)[0].sum().backward()
    _close(h1.grad, h2.grad, 1e-5, "grad_hidden")
    _close(w1.grad, w2.grad, 1e-5, "grad_weight")
    monkeypatch.setattr(ll_mod, "logits_stats", lambda *a: pytest.fail("a kernel ran before the size check"))
    big = torch.zeros(V * H // 40 + 1, 40, device=DEV)                # span V*H + 39 >= limit
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs_triton(big, w, torch.zeros(big.shape[0], dtype=torch.long, device=DEV), b, 1.0, False)


# ----------------------------------------------------------------------------------------------- epilogue
@in_process
def test_tokens_outside_segments_get_zero_gradient():
    """cu_seqlens starting at 3: tokens 0..2 belong to no sequence; their gradient is exactly 0 (it was
    uninitialised memory), the rest matches float64."""
    hid, w, b, tgt, keep = _inputs(torch.float32, masked=False, seed=5)
    cu = torch.tensor([3, 20, N], dtype=torch.int32, device=DEV)
    old = torch.full((N,), -5.0, device=DEV)
    adv = torch.tensor([0.7, -0.4], device=DEV)
    div = torch.tensor([17.0, 17.0], device=DEV)
    torch.full((N,), float("nan"), device=DEV)                        # leave NaNs in the allocator's cache
    h1 = hid.clone().requires_grad_()
    loss, _, _ = fused_linear_pmd_loss_triton(h1, w, tgt, b, old, adv, cu, div, 0.1, 1.0,
                                              torch.tensor(2.0, device=DEV))
    loss.backward()
    assert (h1.grad[:3] == 0).all()
    h2 = hid.double().requires_grad_()
    lp, _ = _ref(h2, w, b, tgt, keep, 1.0)
    loss64 = sum((adv[i].double() - 0.1 * (lp[s:e] - old[s:e]).sum()) ** 2 / 0.2 / 17.0 / 2.0
                 for i, (s, e) in enumerate([(3, 20), (20, N)]))
    loss64.backward()
    _close(loss, loss64, 1e-5, "loss")
    _close(h1.grad, h2.grad, 1e-5, "grad_hidden")


@in_process
@pytest.mark.parametrize("cu", [[0, 20, N - 2], [0, 20, N + 5], [-1, 20, N], [0, 25, 20, N]])
def test_cu_seqlens_must_cover_the_tokens(cu):
    hid, w, b, tgt, _ = _inputs(torch.float32, masked=False, seed=6)
    B = len(cu) - 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_pmd_loss_triton(hid, w, tgt, b, torch.zeros(N, device=DEV), torch.zeros(B, device=DEV),
                                     torch.tensor(cu, dtype=torch.int32, device=DEV), torch.ones(B, device=DEV),
                                     0.1, 1.0, torch.tensor(2.0, device=DEV))


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("cc,family", [(80, "80"), (86, "80"), (89, "80"), (90, "90"), (100, "100"),
                                       (103, "100"), (110, "100"), (120, "120"), (121, "120")])
def test_arch_of_maps_capability_to_family(cc, family, monkeypatch):
    monkeypatch.setattr(_runtime, "_cuda_props", lambda index: (cc, 132))
    assert _runtime.arch_of(torch.device("cuda", 0)) == family
    for name, fams in configs.CONFIGS.items():                         # every kernel has the family pinned
        assert fams[family], name


def test_launch_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the launchers enter torch.cuda.device(hidden.device)."""
    guard = _runtime.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    if not IN_PROCESS:
        return
    seen = []
    real = ll_mod.on_device
    monkeypatch.setattr(ll_mod, "on_device", lambda d: seen.append(d) or real(d))
    hid, w, b, tgt, _ = _inputs(torch.float32, masked=False, seed=7)
    h1 = hid.clone().requires_grad_()
    linear_logprobs_triton(h1, w, tgt, b, 1.0, False)[0].sum().backward()
    assert seen == [h1.device, h1.device]                               # forward and backward


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    hid, w, b, tgt, keep = [t.to("cuda:1") for t in _inputs(torch.bfloat16, masked=False, seed=8)]
    with torch.cuda.device(0):
        lp, ent = linear_logprobs_triton(hid, w, tgt, b, 1.0, True)
    lp64, ent64 = _ref(hid, w, b, tgt, keep, 1.0)
    _close(lp, lp64, 1e-5, "logp")


def test_fused_torch_no_grad_does_no_gradient_work(monkeypatch):
    """Under torch.no_grad() the one-pass torch path must not compute dlogits or the [V, H] grad_weight."""
    import fastpmd.fused as fused
    hid, w, b, tgt, _ = _inputs(torch.float32, masked=False, seed=9)
    h1, w1 = _leaves(hid, w)
    args = (h1.view(1, N, H), w1, tgt.view(1, N), torch.ones(1, N, dtype=torch.bool, device=DEV),
            torch.full((1, N), -5.0, device=DEV), torch.tensor([0.5], device=DEV))
    want, _ = fused.fused_linear_pmd_loss(*args, tau=0.1, backend="torch")
    monkeypatch.setattr(fused, "grad_from_exp_", lambda *a: pytest.fail("gradient work under no_grad"))
    with torch.no_grad():
        got, _ = fused.fused_linear_pmd_loss(*args, tau=0.1, backend="torch")
    assert got.item() == want.item()


@pytest.mark.skipif(IN_PROCESS, reason="kernels run in this process")
def test_interpreter_subprocess():
    run_module_in_subprocess(__file__)
