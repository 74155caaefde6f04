"""The backward's gradient GEMMs: cuBLAS (torch.mm / torch.addmm) against the Triton matmul, forced each way
under the interpreter on CPU (on a GPU: compiled), and the auto choice (cuBLAS on CUDA for bf16)."""
from __future__ import annotations

import pytest
import torch

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported in compiled mode before this module; "
                                "test_interpreter_subprocess runs this module in a fresh process")

from fastpmd.kernels import backward, configs, linear_logprobs_triton  # noqa: E402

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
    assert configs.grad_gemm(cuda, torch.float32) == "triton"           # exact fp32 dots
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


@pytest.mark.skipif(IN_PROCESS, reason="kernels run in this process")
def test_interpreter_subprocess():
    run_module_in_subprocess(__file__)
