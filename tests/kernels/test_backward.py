"""The backward's gradient GEMMs: cuBLAS (torch.mm / torch.addmm) against the Triton matmul, forced each way
under the interpreter on CPU (on a GPU: compiled), and the auto choice (cuBLAS on CUDA for bf16)."""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in compiled mode before this module; "
                                "test_interpreter_subprocess runs this module in a fresh process")

from fastpmd.kernels import _runtime, backward, configs, grad_filter, linear_logprobs_triton  # noqa: E402
from fastpmd.kernels.dlogits import dlogits_chunk  # noqa: E402
from fastpmd.kernels.logits import logits_stats  # noqa: E402
from fastpmd.kernels.matmul import matmul_into  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
N, H, V = 37, 40, 203


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _inputs(dtype, n=N, v=V, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, H, generator=g).to(dtype).to(DEV)
    w = (torch.randn(v, H, generator=g) * scale).to(dtype).to(DEV)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).to(DEV)
    tgt = torch.randint(0, v, (n,), generator=g).to(DEV)
    return hid, w, b, tgt


def _grads(hid, w, b, tgt, gemm, monkeypatch):
    """Gradients of sum(gl * logp) + sum(ge * entropy) with the GEMMs forced to `gemm`."""
    monkeypatch.setenv(configs.ENV_GRAD_GEMM, gemm)
    h1, w1, b1 = (t.detach().clone().requires_grad_() for t in (hid, w, b))
    lp, ent = linear_logprobs_triton(h1, w1, tgt, b1, 0.9, True)
    gl = torch.linspace(-1.0, 1.0, N, device=DEV)
    ge = torch.linspace(0.5, -0.7, N, device=DEV)
    ((lp * gl).sum() + (ent * ge).sum()).backward()
    return h1.grad, w1.grad, b1.grad


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_path_equals_triton_matmul(dtype, monkeypatch):
    """Same dlogits, two GEMM backends, several vocab chunks (grad_h accumulated across them): fp32 within
    2e-6 of the gradient's scale (fp32 sums in a different order); bf16 gradients (rounded once to bf16 from
    those fp32 sums) within one bf16 rounding step (one ulp, <= 2**-7 relative) of each other, elementwise."""
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", N * 4 * 64)   # 4 chunks of 64 columns
    hid, w, b, tgt = _inputs(dtype)
    ref = _grads(hid, w, b, tgt, "triton", monkeypatch)
    monkeypatch.setattr(backward, "matmul_into", lambda *a, **k: pytest.fail("Triton matmul on the cublas path"))
    got = _grads(hid, w, b, tgt, "cublas", monkeypatch)
    for g, r, name in zip(got, ref, ("grad_hidden", "grad_weight", "grad_bias")):
        assert g.dtype == r.dtype == dtype, name
        scale = r.double().abs().max()
        bound = 2e-6 * scale if dtype == torch.float32 else 2**-7 * r.double().abs() + 4e-6 * scale
        assert ((g.double() - r.double()).abs() <= bound).all(), f"{name}: {(g.double() - r.double()).abs().max()}"
        assert not torch.equal(r, torch.zeros_like(r)), name


def test_grad_gemm_choice(monkeypatch):
    monkeypatch.delenv(configs.ENV_GRAD_GEMM, raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert configs.grad_gemm(cuda, torch.bfloat16) == "cublas"          # the CUDA default
    assert configs.grad_gemm(cuda, torch.float16) == "triton"           # fp32 dlogits x fp16 operands
    assert configs.grad_gemm(cuda, torch.float32) == "cublas"           # cuBLAS follows the fp32 matmul precision
    assert configs.grad_gemm(cpu, torch.bfloat16) == "triton"           # the interpreter
    monkeypatch.setenv(configs.ENV_GRAD_GEMM, "triton")
    assert configs.grad_gemm(cuda, torch.bfloat16) == "triton"
    monkeypatch.setenv(configs.ENV_GRAD_GEMM, "cublas")
    assert configs.grad_gemm(cpu, torch.float32) == "cublas"
    monkeypatch.setenv(configs.ENV_GRAD_GEMM, "cutlass")
    with pytest.raises(ValueError, match="FASTPMD_GRAD_GEMM"):
        configs.grad_gemm(cuda, torch.bfloat16)


def test_torch_mm_into_accumulates_in_fp32():
    """The cuBLAS helper: c = a @ b, then c += a @ b, in fp32 from bf16 operands (an fp32 reference)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(33, 70, generator=g).bfloat16().to(DEV)
    bm = torch.randn(70, 19, generator=g).bfloat16().to(DEV)
    c = torch.full((33, 19), float("nan"), device=DEV)
    ref = a.double() @ bm.double()
    backward.torch_mm_into(a, bm, c, accumulate=False)
    assert (c.double() - ref).abs().max() < 1e-4
    backward.torch_mm_into(a, bm, c, accumulate=True)
    assert (c.double() - 2 * ref).abs().max() < 2e-4
    cw = torch.empty(33, 19, dtype=torch.bfloat16, device=DEV)
    backward.torch_mm_into(a, bm, cw, accumulate=False)
    assert ((cw.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()


# ------------------------------------------------------------------------------------- gradient filtering
def test_filter_switch(monkeypatch):
    for raw, eps in (("", None), ("0", None), ("off", None), ("1", 2.0**-12), ("on", 2.0**-12), ("1e-3", 1e-3)):
        monkeypatch.setenv(grad_filter.ENV_GRAD_FILTER, raw)
        assert grad_filter.filter_eps() == eps, raw
    monkeypatch.delenv(grad_filter.ENV_GRAD_FILTER)
    assert grad_filter.filter_eps() is None                             # off by default
    for bad in ("2", "-1e-3", "often"):
        monkeypatch.setenv(grad_filter.ENV_GRAD_FILTER, bad)
        with pytest.raises(ValueError, match="FASTPMD_GRAD_FILTER"):
            grad_filter.filter_eps()
    assert configs.grad_gemm(torch.device("cuda", 0), torch.bfloat16, filtering=True) == "triton"


def _dense_dz64(hid, w, b, tgt, gl, ge, T):
    """float64 dlogits of sum(gl * logp) + sum(ge * entropy): [n, V]."""
    z = (hid.double() @ w.double().T + b.double()) / T
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    onehot = torch.nn.functional.one_hot(tgt, z.shape[1]).double()
    return (gl[:, None] * (onehot - p) - ge[:, None] * p * (logp + ent[:, None])) / T


EPS = 1e-3


def _peaked(seed=2):
    """A trained model's shape: the first 40 columns 15 nats above the rest, targets among them, so the other
    vocab tiles hold p ~ 1e-6 (dropped) with a few exceptions (kept): about half of the blocks are dropped."""
    hid, w, b, tgt = _inputs(torch.float32, scale=1.0, seed=seed)
    b[:40] += 15.0
    return hid, w, b, tgt % 40


@in_process
def test_dlogits_filter_flags_equal_reference():
    """The kernel's flags and filtered dz equal the torch rule applied to the kernel's own unfiltered dz
    (exactly), and the rule applied to float64 dz (away from the threshold)."""
    hid, w, b, tgt = _peaked()
    T = 0.9
    g = torch.Generator().manual_seed(3)
    gl = torch.randn(N, generator=g).to(DEV)
    ge = torch.randn(N, generator=g).to(DEV) * 0.3
    gl[5] = 0.0                                                          # a row with no upstream gradient
    _, lse, ent = logits_stats(hid, w, b, tgt, T, True, "interp")
    bn, bv = (configs.CONFIGS["logits_bwd"]["interp"][0].blocks[k] for k in ("BLOCK_N", "BLOCK_V"))
    vp = -(-V // bv) * bv
    plain = torch.zeros(N, vp, device=DEV)
    dlogits_chunk(hid, w, b, tgt, lse, ent, gl, ge, T, 0, V, plain, "interp")
    filt = torch.zeros(N, vp, device=DEV)
    flags = torch.full((-(-N // bn), vp // bv), 7, dtype=torch.int8, device=DEV)
    dlogits_chunk(hid, w, b, tgt, lse, ent, gl, ge, T, 0, V, filt, "interp", flags=flags, filter_eps=EPS)
    want_dz, want_keep = grad_filter.reference_filter(plain[:, :V], gl, ge, T, EPS, bn, bv)
    assert torch.equal(flags.bool(), want_keep) and set(flags.unique().tolist()) <= {0, 1}
    assert torch.equal(filt[:, :V], want_dz)
    assert 0.2 < want_keep.float().mean().item() < 0.9, want_keep.float().mean()   # both kinds of block
    dz64 = _dense_dz64(hid, w, b, tgt, gl.double(), ge.double(), T)
    keep64 = grad_filter.reference_filter(dz64, gl.double(), ge.double(), T, EPS, bn, bv)[1]
    ratio = dz64.abs() / ((EPS / T) * (gl.abs() + ge.abs()).double()[:, None]).clamp_min(1e-300)
    near = ((ratio > 0.999) & (ratio < 1.001)).any()
    assert near or torch.equal(keep64, want_keep)


@in_process
@pytest.mark.parametrize("fblock", [(16, 32), (32, 16), (8, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_skips_flagged_blocks(fblock, transposed):
    """flags mark blocks of `a` that are zero (as the filtered dlogits are): c = a @ b exactly, for flag blocks
    larger and smaller than the interpreter's 16x16 (M x K) tiles and for a transposed (column-major) a, as
    grad_weight passes it. Where a flag block covers whole K-steps, nonzero data under a 0 flag is never read."""
    g = torch.Generator().manual_seed(4)
    M, K, Nn = 37, 203, 40
    a = torch.randn(K, M, generator=g).to(DEV).t() if transposed else torch.randn(M, K, generator=g).to(DEV)
    bm = torch.randn(K, Nn, generator=g).to(DEV)
    fm, fk = fblock
    flags = (torch.rand(-(-M // fm), -(-K // fk), generator=g) > 0.5).to(torch.int8).to(DEV)
    mask = flags.bool().repeat_interleave(fm, 0).repeat_interleave(fk, 1)[:M, :K]
    ref = (a.double() * mask) @ bm.double()
    a_zeroed = a * mask
    for operand in ((a_zeroed, a) if fm >= 16 and fk >= 16 else (a_zeroed,)):
        c = torch.full((M, Nn), float("nan"), device=DEV)
        matmul_into(operand, bm, c, accumulate=False, arch="interp", flags=flags, flag_block=fblock)
        assert (c.double() - ref).abs().max() < 1e-4
    assert (ref - a.double() @ bm.double()).abs().max() > 1e-2           # the flags mattered


@in_process
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_filtered_backward_equals_reference(gemm, monkeypatch):
    """End to end with FASTPMD_GRAD_FILTER=1e-3, several vocab chunks: gradients = the float64 rule's
    filtered dz through dense matmuls; they differ from the unfiltered ones (the filter acted)."""
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", N * 4 * 64)   # 4 chunks of 64 columns
    monkeypatch.setenv(grad_filter.ENV_GRAD_FILTER, str(EPS))
    monkeypatch.setenv(configs.ENV_GRAD_GEMM, gemm)
    hid, w, b, tgt = _peaked()
    T = 0.9
    gl = torch.linspace(-1.0, 1.0, N, device=DEV)
    ge = torch.linspace(0.5, -0.7, N, device=DEV)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hid, w, b))
    lp, ent = linear_logprobs_triton(h1, w1, tgt, b1, T, True)
    ((lp * gl).sum() + (ent * ge).sum()).backward()
    fam = configs.family("logits_bwd", _runtime.arch_of(hid.device), hid.dtype)     # the dlogits tiles that ran (fp32)
    bn, bv = (configs.CONFIGS["logits_bwd"][fam][0].blocks[k] for k in ("BLOCK_N", "BLOCK_V"))
    dz64 = _dense_dz64(hid, w, b, tgt, gl.double(), ge.double(), T)
    dzf, _ = grad_filter.reference_filter(dz64, gl.double(), ge.double(), T, EPS, bn, bv)
    for got, ref, full, name in ((h1.grad, dzf @ w.double(), dz64 @ w.double(), "grad_hidden"),
                                 (w1.grad, dzf.T @ hid.double(), dz64.T @ hid.double(), "grad_weight"),
                                 (b1.grad, dzf.sum(0), dz64.sum(0), "grad_bias")):
        scale = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 1e-5 * scale, name
        assert (full - ref).abs().max().item() > 1e-4 * scale, f"{name}: the filter dropped nothing that matters"


def test_filtering_bench_pieces():
    """bench/filtering.py's dlogits is the autograd gradient of sum(g * logp); a block of only tiny
    probabilities is dropped, one holding a target is kept; the markdown lists every row."""
    from fastpmd.bench import filtering
    g = torch.Generator().manual_seed(5)
    z = torch.randn(20, 300, generator=g, dtype=torch.float64) * 2
    z[:, 256:] -= 40.0                                                  # the last vocab tile: p ~ e^-40
    t = torch.randint(0, 256, (20,), generator=g)
    coef = filtering.seq_coefficients(20, 8, g, torch.float64)
    zz = z.clone().requires_grad_()
    (torch.log_softmax(zz, -1).gather(1, t[:, None])[:, 0] * coef).sum().backward()
    assert torch.allclose(filtering.dlogits(z, t, coef), zz.grad, atol=1e-12)
    assert filtering.dropped_fraction(z, t, coef, 2**-12, (32, 128)) == pytest.approx(1 / 3)
    t[3] = 299                                                          # a target in the last tile keeps its block
    assert filtering.dropped_fraction(z, t, coef, 2**-12, (32, 128)) == 0.0
    err = [{"distribution": "d", "top1_p": 0.5, "entropy": 1.0, "eps": 2**-12, "dropped_128x128": 0.25,
            "rel_err_gh": 1e-5, "rel_err_gw": 2e-5, "max_err_gw": 3e-5, "bf16_dz_rel_err_gh": 1e-3,
            "bf16_dz_rel_err_gw": 1e-3}]
    drop = [{"logits": "x", "n": 4, "top1_p": 0.5, "entropy": 1.0, "block": "128x128", "eps": 2**-12,
             "dropped": 0.5}]
    md = filtering.markdown(err, drop)
    assert "| d | 0.500 | 1.00 | 2^-12 | 25.0% |" in md and "| x | 4 |" in md


@pytest.mark.skipif(IN_PROCESS, reason="kernels run in this process")
def test_interpreter_subprocess():
    run_module_in_subprocess(__file__)
