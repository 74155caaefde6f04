"""The backward's gradient GEMMs and dlogits chunks at large n (issue 23): the dz chunk never narrower than 8192
columns at the default budget (grad_hidden traffic linear in n), cuBLAS 16-bit outputs reduced in fp32, and the
addmm(out_dtype=fp32) fallback catching only torch's unsupported-argument error (never out-of-memory). Pure
host-side logic on CPU (the cuBLAS calls are stood in for where CPU torch has no such kernel)."""
from __future__ import annotations

import pytest
import torch

from triton_interp import prepare

prepare()   # before fastpmd.kernels imports triton (see tests/triton_interp.py)

from fastpmd.kernels import backward, configs  # noqa: E402


@pytest.mark.parametrize("n,want", [(4096, 32768), (16384, 8192), (65536, 8192), (131072, 8192)])
def test_dz_chunk_at_least_8192_columns(n, want):
    assert configs.DLOGITS_BUDGET_BYTES == 256 << 20
    assert backward.chunk_columns(n, 152064, 2, 128) == want
    assert backward.chunk_columns(n, 152064, 2, 128) * n < 2**31


def test_small_budgets_still_give_small_chunks(monkeypatch):
    monkeypatch.setattr(configs, "DLOGITS_BUDGET_BYTES", 37 * 4 * 64)
    assert backward.chunk_columns(37, 203, 4, 32) == 64


def _fake_mm(a, b, out_dtype=None, out=None):
    prod = a.float() @ b.float()
    return prod if out is None else out.copy_(prod)


@pytest.mark.parametrize("error,caught", [
    (RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16"), True),
    (RuntimeError("self dtype must match either out_dtype or mat1 dtype"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), False),
])
def test_addmm_fallback_catches_only_the_unsupported_argument(monkeypatch, error, caught):
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(3, 5).bfloat16()
    c = torch.ones(4, 5)

    def addmm(*args, **kw):
        raise error
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "mm", _fake_mm)
    if caught:
        out = backward.addmm_fp32_(c, a, b)
        assert out is c
        torch.testing.assert_close(c, 1 + a.float() @ b.float())
    else:
        with pytest.raises(type(error)):
            backward.addmm_fp32_(c, a, b)


def test_16bit_cublas_outputs_reduce_in_fp32():
    m = torch.backends.cuda.matmul
    before = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    with pytest.raises(KeyError):
        with backward.full_precision_reduction():
            assert not m.allow_bf16_reduced_precision_reduction and not m.allow_fp16_reduced_precision_reduction
            raise KeyError
    assert (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction) == before
