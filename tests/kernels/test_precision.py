"""fp32 LM heads on tensor cores (issue 23): the Triton dots follow torch.get_float32_matmul_precision() (TF32 at
"high"/"medium", exact IEEE fp32 only at "highest"), fp32 gradient GEMMs go to cuBLAS on CUDA like bf16 ones
(cuBLAS follows the same precision setting), and the Hugging Face integration computes the head in the dtype
stock transformers would (the autocast dtype under autocast, else the head's own dtype) instead of promoting
bf16 hidden + fp32 head to fp32. Pure functions and a tiny Qwen2: CPU, no kernel launch."""
from __future__ import annotations

import pytest
import torch

from triton_interp import prepare

prepare()   # before fastpmd.kernels imports triton (see tests/triton_interp.py)

from fastpmd.integrations._hf import completion_hidden  # noqa: E402
from fastpmd.kernels import configs  # noqa: E402
from fastpmd.kernels.logits import dot_flags  # noqa: E402


@pytest.fixture
def precision():
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("prec,ieee", [("highest", True), ("high", False), ("medium", False)])
def test_fp32_dots_follow_matmul_precision(precision, prec, ieee):
    precision(prec)
    assert configs.ieee_dots(torch.float32) is ieee
    assert dot_flags(torch.float32, torch.float32)["DOT_IEEE"] is ieee
    assert dot_flags(torch.bfloat16, torch.bfloat16)["DOT_IEEE"] is False
    assert dot_flags(torch.float32, torch.float16)["DOT_IEEE"] is False     # the fp16 path's fp32 dlogits: TF32


@pytest.mark.parametrize("arch", ["80", "90", "100", "120"])
def test_fp32_tile_families(precision, arch):
    """TF32 dots take the "<arch>t" tiles (tensor cores, chosen for fp32 operands by the kernels report); exact
    IEEE dots (FMA) take the Ampere logits tiles (the others spill with FMA dots); 16-bit inputs
    and the reduction kernels keep the architecture's family."""
    precision("high")
    for k in ("logits_fwd", "logits_bwd", "matmul"):
        assert configs.family(k, arch, torch.float32) == arch + "t"
        assert configs.CONFIGS[k][arch + "t"]
        assert configs.family(k, arch, torch.bfloat16) == arch
    assert configs.family("merge", arch, torch.float32) == arch
    precision("highest")
    assert configs.family("logits_fwd", arch, torch.float32) == "ieee"
    assert configs.family("matmul", arch, torch.float32) == arch


def test_fp32_grad_gemms_on_cublas(monkeypatch):
    monkeypatch.delenv(configs.ENV_GRAD_GEMM, raising=False)
    cuda = torch.device("cuda")
    assert configs.grad_gemm(cuda, torch.float32) == "cublas"
    assert configs.grad_gemm(cuda, torch.bfloat16) == "cublas"
    assert configs.grad_gemm(cuda, torch.float16) == "triton"
    assert configs.grad_gemm(cuda, torch.float32, filtering=True) == "triton"
    assert configs.grad_gemm(torch.device("cpu"), torch.float32) == "triton"


def _tiny_lm():
    from trl_tiny import qwen2
    lm = qwen2(tie=False)
    lm.model.to(torch.bfloat16)                   # bf16 backbone, fp32 LM head (a master-weight head)
    return lm


def test_hf_head_under_autocast_computes_in_autocast_dtype():
    lm = _tiny_lm()
    ids = torch.randint(3, 10, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, weight, bias, _ = completion_hidden(lm, ids, torch.ones_like(ids), 3)
    assert hidden.dtype == weight.dtype == torch.bfloat16    # what lm_head(hidden) computes in under autocast
    weight.float().sum().backward()
    assert lm.lm_head.weight.grad is not None                # the cast keeps autograd to the fp32 parameter


def test_hf_head_without_autocast_computes_in_head_dtype():
    lm = _tiny_lm()
    ids = torch.randint(3, 10, (2, 6))
    hidden, weight, _, _ = completion_hidden(lm, ids, torch.ones_like(ids), 3)
    assert weight is lm.lm_head.weight and hidden.dtype == torch.float32
