"""fastpmd.kernels against float64 references. CPU: Triton interpreter (TRITON_INTERPRET=1, set per test, read by
fastpmd.kernels at launch); CUDA: the compiled kernels (bench/gpu_check.sh runs this file on a GPU machine).
Shapes are small and not powers of two (the interpreter is slow)."""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in compiled mode before this module; "
                                "test_interpreter_subprocess runs this module in a fresh process")

from fastpmd.kernels import configs, fused_linear_pmd_loss_triton, is_available, linear_logprobs_triton
from fastpmd.kernels.backward import chunk_columns

DEV = "cuda" if ON_GPU else "cpu"
N, H, V = 37, 40, 203          # ragged vs the interpreter blocks (16 tokens x 32 vocab x 16 hidden)
# (dtype, tolerance relative to the largest reference value): fp32 is exact up to rounding; fp16/bf16
# gradients pass through 16-bit outputs (bf16: also bf16 dlogits; fp16: fp32 dlogits, TF32 matmuls on a GPU). A missing 1/temperature or a wrong sign gives errors >= 30%.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _inputs(dtype, n=N, h=H, v=V, scale=0.3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    tgt = torch.randint(0, v, (n,), generator=g)
    if n:
        tgt[0], tgt[-1] = 0, v - 1                               # first and last vocab column
    return [t.to(DEV) if t is not None else None for t in (hid, w, b, tgt)]


def _ref(hid, w, b, tgt, temperature):
    """float64 oracle: log_softmax((h @ W.T + b) / T) gathered at targets, and the entropy."""
    z = hid.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    ls = torch.log_softmax(z / temperature, -1)
    return ls.gather(-1, tgt[:, None])[:, 0], -(ls.exp() * ls).sum(-1)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in ts]


def _close(got, ref, tol, what):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol})"


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_logprobs_values_and_grads(dtype, monkeypatch):
    if dtype == torch.float32:  # several backward vocab chunks (dlogits buffer of 64 columns)
        monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", N * 4 * 64)
        assert chunk_columns(N, V, 4, 32) == 64
    hid, w, b, tgt = _inputs(dtype)
    T = 0.7
    h1, w1, b1 = _leaves(hid, w, b)
    lp, ent = linear_logprobs_triton(h1, w1, tgt, b1, T, True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (N,)
    gl = torch.linspace(-1.0, 1.0, N, device=DEV, dtype=torch.float64)
    ge = torch.linspace(0.5, -0.7, N, device=DEV, dtype=torch.float64)
    ((lp.double() * gl).sum() + (ent.double() * ge).sum()).backward()
    h2, w2, b2 = _leaves(hid.double(), w.double(), b.double())
    lp64, ent64 = _ref(h2, w2, b2, tgt, T)
    ((lp64 * gl).sum() + (ent64 * ge).sum()).backward()
    _close(lp, lp64, 1e-5, "logp")
    _close(ent, ent64, 1e-5, "entropy")
    for got, ref, name in ((h1, h2, "grad_hidden"), (w1, w2, "grad_weight"), (b1, b2, "grad_bias")):
        assert got.grad.dtype == dtype
        _close(got.grad, ref.grad, TOL[dtype], name)


@in_process
def test_no_bias_no_entropy_large_logits():
    """Logits of magnitude ~60 (online max/sum-exp must be stable), temperature 1, no bias, grad on logp only."""
    hid, w, _, tgt = _inputs(torch.float32, n=21, v=131, scale=3.0, bias=False, seed=1)
    h1, w1 = _leaves(hid, w)
    lp, ent = linear_logprobs_triton(h1, w1, tgt, None, 1.0, False)
    assert ent is None
    lp.sum().backward()
    h2, w2 = _leaves(hid.double(), w.double())
    lp64, _ = _ref(h2, w2, None, tgt, 1.0)
    lp64.sum().backward()
    assert torch.isfinite(lp).all()
    _close(lp, lp64, 1e-5, "logp")
    _close(h1.grad, h2.grad, 1e-5, "grad_hidden")
    _close(w1.grad, w2.grad, 1e-5, "grad_weight")


@in_process
def test_entropy_only_gradient_and_no_weight_grad():
    """Peaked distributions (logits ~ +-40): the entropy is a small difference of large numbers unless it is
    accumulated relative to the running max."""
    hid, w, b, tgt = _inputs(torch.float32, n=19, scale=3.0, seed=2)
    h1 = hid.clone().requires_grad_()
    _, ent = linear_logprobs_triton(h1, w, tgt, b, 1.3, True)
    ent.sum().backward()
    h2 = hid.double().requires_grad_()
    _, ent64 = _ref(h2, w.double(), b.double(), tgt, 1.3)
    ent64.sum().backward()
    assert (ent.double() - ent64).abs().max().item() < 2e-5
    _close(h1.grad, h2.grad, 1e-5, "grad_hidden (entropy)")


def _pmd_ref(hid, w, b, tgt, old, adv, cu, div, tau, T, nseq):
    lp, _ = _ref(hid, w, b, tgt, T)
    loss = hid.new_zeros((), dtype=torch.float64)
    deltas = []
    for i in range(adv.shape[0]):
        s, e = int(cu[i]), int(cu[i + 1])
        d = (lp[s:e] - old[s:e].double()).sum()
        deltas.append(d)
        if e > s:
            loss = loss + (adv[i].double() - tau * d) ** 2 / (2 * tau) / div[i].double() / nseq
    return loss, torch.stack(deltas), lp


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pmd_loss_matches_reference(dtype):
    lens = [9, 0, 13, 1, 14]                                      # an empty segment; sum = N
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    hid, w, b, tgt = _inputs(dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    old = (torch.randn(N, generator=g) * 0.1 - 5.0).to(DEV)
    adv = torch.randn(len(lens), generator=g).to(DEV)
    div = torch.tensor([max(x, 1) for x in lens], dtype=torch.float32, device=DEV)
    nseq = torch.tensor(4.0, device=DEV)
    tau, T = 0.05, 0.9
    h1, w1, b1 = _leaves(hid, w, b)
    loss, delta, lp = fused_linear_pmd_loss_triton(h1, w1, tgt, b1, old, adv, cu, div, tau, T, nseq)
    assert loss.shape == () and not delta.requires_grad and not lp.requires_grad
    (loss * 3.0).backward()                                       # upstream grad != 1 reaches the kernels
    h2, w2, b2 = _leaves(hid.double(), w.double(), b.double())
    loss64, delta64, lp64 = _pmd_ref(h2, w2, b2, tgt, old, adv, cu, div, tau, T, 4.0)
    (loss64 * 3.0).backward()
    _close(lp, lp64, 1e-5, "logp")
    _close(delta, delta64, 1e-5, "delta")
    assert delta[1].item() == 0.0
    _close(loss, loss64, 1e-5, "loss")
    for got, ref, name in ((h1, h2, "grad_hidden"), (w1, w2, "grad_weight"), (b1, b2, "grad_bias")):
        _close(got.grad, ref.grad, TOL[dtype], name)


@in_process
@pytest.mark.parametrize("per_sequence_tau", [False, True])
def test_fused_matches_torch_backend(per_sequence_tau):
    """fastpmd.fused_linear_pmd_loss(backend="triton") against the torch backend, masks and [B, T] layout;
    a [B] tau goes through the scalar-tau kernel rescaled (tau' = 1, A/tau_i, divisor/tau_i)."""
    import fastpmd
    B, T_, Hh, Vv = 3, 11, 40, 203
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(B, T_, Hh, generator=g).to(DEV)
    w = (torch.randn(Vv, Hh, generator=g) * 0.3).to(DEV)
    tgt = torch.randint(0, Vv, (B, T_), generator=g).to(DEV)
    mask = torch.rand(B, T_, generator=g) > 0.3
    mask[2] = False                                                # a fully masked sequence
    mask = mask.to(DEV)
    old = (torch.randn(B, T_, generator=g) * 0.1 - 5.0).to(DEV)
    adv = torch.randn(B, generator=g).to(DEV)
    out = {}
    for backend in ("triton", "torch"):
        h1, w1 = _leaves(hid, w)
        tau = torch.tensor([0.1, 0.03, 0.7], device=DEV) if per_sequence_tau else 0.1
        loss, metrics = fastpmd.fused_linear_pmd_loss(h1, w1, tgt, mask, old, adv, tau=tau, temperature=0.8,
                                                      backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), h1.grad, w1.grad)
    for a, r, name in zip(out["triton"], out["torch"], ("loss", "grad_hidden", "grad_weight")):
        _close(a, r.double(), 1e-4, name)


@in_process
def test_public_linear_logprobs_matches_torch_backend():
    import fastpmd
    B, T_, Hh, Vv = 2, 9, 40, 203
    hid, w, b, tgt = _inputs(torch.float32, n=B * T_, seed=8)
    mask = (torch.arange(T_) < torch.tensor([[6], [9]])).to(DEV)
    out = {}
    for backend in ("triton", "torch"):
        h1, w1 = _leaves(hid.view(B, T_, Hh), w)
        lp, ent = fastpmd.linear_logprobs(h1, w1, tgt.view(B, T_), mask=mask, bias=b, temperature=1.7,
                                          return_entropy=True, backend=backend)
        ((lp * 0.5).sum() + ent.sum()).backward()
        out[backend] = (lp.detach(), ent.detach(), h1.grad, w1.grad)
    assert out["triton"][0][0, 6:].abs().max().item() == 0.0           # masked positions are 0
    for a, r, name in zip(out["triton"], out["torch"], ("logp", "entropy", "grad_hidden", "grad_weight")):
        _close(a, r.double(), 1e-5, name)


@in_process
def test_validation_and_unavailable_backend(monkeypatch):
    hid, w, b, tgt = _inputs(torch.float32, n=5, seed=6)
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs_triton(hid, w[:, :-1], tgt, b, 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs_triton(hid, w, tgt[:-1], b, 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs_triton(hid, w, tgt, b, 0.0, False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_pmd_loss_triton(hid, w, tgt, b, torch.zeros(5, device=DEV), torch.zeros(2, device=DEV),
                                     torch.zeros(2, dtype=torch.int32, device=DEV), torch.ones(2, device=DEV),
                                     0.1, 1.0, torch.tensor(2.0, device=DEV))
    if DEV == "cpu":
        assert is_available(torch.device("cpu"))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not is_available(torch.device("cpu"))
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            linear_logprobs_triton(hid, w, tgt, b, 1.0, False)


@in_process
def test_empty_batch():
    hid, w, b, tgt = _inputs(torch.float32, n=0, seed=7)
    h1, w1 = _leaves(hid, w)
    lp, _ = linear_logprobs_triton(h1, w1, tgt, b, 1.0, False)
    assert lp.shape == (0,)
    lp.sum().backward()
    assert w1.grad.abs().sum().item() == 0.0 and h1.grad.shape == (0, H)


def _check_entropy_and_grads(hid, w, b, tgt, gl):
    """Kernels vs the float64 reference at temperature 0.8: log-probs, entropy, and the gradients of
    sum(gl * logp) + 0.1 * sum(entropy) w.r.t. hidden, weight and bias."""
    h1, w1, b1 = _leaves(hid, w, b)
    lp, ent = linear_logprobs_triton(h1, w1, tgt, b1, 0.8, True)
    ((lp.double() * gl).sum() + ent.double().sum() * 0.1).backward()
    h2, w2, b2 = _leaves(hid.double(), w.double(), b.double())
    lp64, ent64 = _ref(h2, w2, b2, tgt, 0.8)
    ((lp64 * gl).sum() + ent64.sum() * 0.1).backward()
    _close(lp, lp64, 1e-5, "logp")
    _close(ent, ent64, 1e-5, "entropy")
    for got, ref, name in ((h1, h2, "grad_hidden"), (w1, w2, "grad_weight"), (b1, b2, "grad_bias")):
        _close(got.grad, ref.grad, TOL[hid.dtype], name)


@in_process
@pytest.mark.parametrize("arch", ["90", "80"])
def test_pinned_gpu_configs_under_interpreter(arch, monkeypatch):
    """The pinned sm_90/sm_80 block sizes and group orderings (128-wide tiles, GROUP 8 with a partial last group,
    several vocab splits and backward chunks), run by the interpreter (on a GPU: compiled, same configs)."""
    if DEV == "cpu":
        for name, fam in configs.CONFIGS.items():
            monkeypatch.setitem(fam, "interp", fam[arch])
    n, h, v = 1050, 40, 520                         # 9 token tiles: one full group of 8 + a partial one
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", n * 2 * 256)      # 3 backward chunks
    hid, w, b, tgt = _inputs(torch.bfloat16, n=n, h=h, v=v, scale=0.2, seed=10)
    _check_entropy_and_grads(hid, w, b, tgt, torch.linspace(-1.0, 1.0, n, device=DEV, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: the pinned GPU configs (128-wide tiles) on a realistic shape")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pinned_configs_multi_chunk(dtype, monkeypatch):
    n, h, v = 1531, 520, 9001                        # several token tiles, vocab splits and backward chunks
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", n * 4 * 1024)
    hid, w, b, tgt = _inputs(dtype, n=n, h=h, v=v, scale=0.1, seed=9)
    _check_entropy_and_grads(hid, w, b, tgt, torch.randn(n, device=DEV, dtype=torch.float64))


@pytest.mark.skipif(IN_PROCESS, reason="kernels run in this process")
def test_interpreter_subprocess():
    run_module_in_subprocess(__file__)


def test_autotune_picks_fastest_and_caches(monkeypatch):
    """Four candidates: the first fails to launch, the other three have distinct times; the fastest of them wins
    (not the first that works, not the last), per shape key, timed once per key and cached."""
    cands = [object(), object(), object(), object()]
    monkeypatch.setitem(configs.CONFIGS, "fake", {"90": cands, "interp": cands[:1]})
    times = {("k1",): {1: 3.0, 2: 1.0, 3: 2.0}, ("k2",): {1: 0.5, 2: 1.0, 3: 2.0}}
    calls = []

    def run(key):
        def bench(cfg):
            calls.append(cfg)
            if cfg is cands[0]:
                raise RuntimeError("out of resources")
            bench.last = cands.index(cfg)

        def timer(fn):
            fn()
            return times[key][bench.last]
        return configs.pick("fake", "90", key, bench=bench, timer=timer)

    assert run(("k1",)) is cands[0] and calls == []          # autotune off: the pinned (first) config, no timing
    monkeypatch.setenv(configs.ENV_AUTOTUNE, "1")
    monkeypatch.setattr(configs, "_TUNED", {})
    assert run(("k1",)) is cands[2]                           # fastest of the three that launch
    assert len(calls) == 4
    assert run(("k1",)) is cands[2] and len(calls) == 4       # cached: no new timing
    assert run(("k2",)) is cands[1] and len(calls) == 8       # another shape key is timed on its own
    assert configs.pick("fake", "interp", ("k1",)) is cands[0]  # the interpreter never autotunes