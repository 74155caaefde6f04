"""The GPU cost model and `auto`'s backend choice (issue 23): pure functions, on CPU. Every time here is a
PREDICTION from the model's assumed rates; what is tested is the arithmetic and the choice logic."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastpmd import auto_backend, cost_model
from fastpmd.cost_model import GPUS, Shape, predict, predicted_fastest

H100 = GPUS["H100"]
QWEN7B = Shape(16384, 3584, 152064)


def test_flop_terms_are_the_documented_counts():
    s = QWEN7B
    nhv = s.n * s.H * s.V
    assert predict("floor", s, H100)["flop_s"] == pytest.approx(6 * nhv / (H100.cublas_16 * 1e12))
    # triton: forward + dlogits on the Triton tiles, the two gradient GEMMs on cuBLAS (bf16)
    want = 4 * nhv / (H100.triton_16 * 1e12) + 4 * nhv / (H100.cublas_16 * 1e12)
    assert predict("triton", s, H100)["flop_s"] == pytest.approx(want)
    # torch single pass: logits + grad_h at the 16-bit rate, grad_W as an fp32 GEMM (IEEE at "highest")
    want = 4 * nhv / (H100.cublas_16 * 1e12) + 2 * nhv / (H100.cublas_fp32 * 1e12)
    assert predict("torch", s, H100)["flop_s"] == pytest.approx(want)
    tf32 = Shape(s.n, s.H, s.V, tf32=True)
    assert predict("torch", tf32, H100)["flop_s"] < predict("torch", s, H100)["flop_s"]
    for b in cost_model.BACKENDS + cost_model.PEERS:
        p = predict(b, s, H100)
        assert p["total_s"] == pytest.approx(p["flop_s"] + p["byte_s"]) and p["byte_s"] > 0


def test_triton_bytes_follow_the_dlogits_chunks():
    """grad_h's fp32 read-modify-write happens once per vocab chunk: fewer chunks, fewer bytes."""
    s = QWEN7B
    assert cost_model.chunk_columns(s) == 8192                 # 256 MiB of bf16 dz at n = 16384
    big = cost_model.chunk_columns(s, budget=1 << 30)
    assert big == 4 * 8192
    assert predict("triton", Shape(4096, 3584, 152064), H100)["byte_s"] < predict("triton", s, H100)["byte_s"]


def test_choice_follows_the_model():
    assert predicted_fastest(QWEN7B, H100) == "triton"          # torch's IEEE fp32 grad_W GEMM is slow
    wide = Shape(16384, 8192, 152064, tf32=True)                 # TF32 allowed, wide hidden: 6nHV wins
    t, p = (predict(b, wide, H100)["total_s"] for b in ("triton", "torch"))
    assert p < t and predicted_fastest(wide, H100) == "torch"
    two_pass = Shape(16384, 8192, 152064, tf32=True, op="logprobs")   # the torch backend recomputes: 8nHV
    assert predicted_fastest(two_pass, H100) == "triton"


def test_pmd_longer_than_a_chunk_is_costed_as_two_passes():
    s = auto_backend.shape_of("pmd", 4096, 64, 1000, torch.bfloat16, seq_len=600, chunk_rows=512)
    assert s.op == "logprobs"
    assert auto_backend.shape_of("pmd", 4096, 64, 1000, torch.bfloat16, seq_len=512, chunk_rows=512).op == "pmd"


def test_autotune_measures_once_per_shape_key(monkeypatch):
    monkeypatch.setattr(auto_backend, "_MEASURED", {})
    calls = []

    def measure(backend):
        calls.append(backend)
        return {"triton": 2.0, "torch": 1.0}[backend]

    s = Shape(5000, 64, 1000)
    assert auto_backend.choose(s, H100, "cuda:0", measure, tune=False) == predicted_fastest(s, H100)
    assert calls == []
    assert auto_backend.choose(s, H100, "cuda:0", measure, tune=True) == "torch"       # measured, not predicted
    assert auto_backend.choose(Shape(6000, 64, 1000), H100, "cuda:0", measure, tune=True) == "torch"  # same key
    assert calls == ["triton", "torch"]
    auto_backend.choose(Shape(5000, 64, 1000, op="logprobs"), H100, "cuda:0", measure, tune=True)
    assert calls == ["triton", "torch"] * 2                                               # a new key


def test_gpu_names_and_off_cuda_resolution():
    assert cost_model.gpu_rates("NVIDIA H200") is GPUS["H200"]
    assert cost_model.gpu_rates("NVIDIA A100-SXM4-80GB") is GPUS["A100"]
    from fastpmd.dispatch import resolve_backend
    assert resolve_backend("auto", torch.device("cpu"), ("pmd", 8, 4, 10, torch.float32, 8)) == "torch"


def test_docs_table_is_the_model_output():
    """docs/kernels.md's PREDICTED table is exactly what the model prints (no hand-edited figures)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    table = cost_model.prediction_table(QWEN7B)
    assert table in doc
    assert all("PREDICTED" in line for line in re.findall(r"^\| method .*$", table, re.M))


def test_auto_on_cuda_uses_the_model_and_torch_while_compiling(monkeypatch):
    from fastpmd import dispatch
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(dispatch, "_triton_available", lambda device: True)
    seen = []
    monkeypatch.setattr(auto_backend, "cuda_choice", lambda *a, **kw: seen.append((a, kw)) or "torch")
    head = ("pmd", 4096, 64, 1000, torch.bfloat16, 512)
    assert dispatch.resolve_backend("auto", cuda, head) == "torch" and seen[0][0][:6] == ("pmd", cuda, 4096, 64,
                                                                                          1000, torch.bfloat16)
    assert seen[0][1] == {"allow_measure": True}
    assert dispatch.resolve_backend("auto", cuda) == "triton"                 # no call shape: the kernels
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.resolve_backend("auto", cuda, head) == "torch" and len(seen) == 1
