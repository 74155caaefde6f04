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
    # cublas single pass: three cuBLAS GEMMs at the 16-bit rate
    assert predict("cublas", s, H100)["flop_s"] == pytest.approx(6 * nhv / (H100.cublas_16 * 1e12))
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
    assert predicted_fastest(QWEN7B, H100) == "cublas"          # 6nHV on cuBLAS, 14 B per logit
    t, c = (predict(b, QWEN7B, H100)["total_s"] for b in ("triton", "torch"))
    assert c > t                                                 # torch's IEEE fp32 grad_W GEMM is slow
    two_pass = Shape(16384, 8192, 152064, tf32=True, op="logprobs")   # cublas is the PMD loss's single pass
    assert cost_model.candidates(two_pass) == ("triton", "torch") and predicted_fastest(two_pass, H100) == "triton"
    assert cost_model.candidates(Shape(16384, 3584, 152064, dtype="fp16")) == ("triton", "torch")
    with pytest.raises(ValueError, match="cublas"):
        predict("cublas", two_pass, H100)


def test_the_issue_target_holds_in_the_model():
    """Issue 23's bar, on the model: a fastpmd backend at or below the best peer and at >= 70% of the floor's
    speed (PREDICTED; Liger's chunk is 512 rows here, read from liger-kernel 0.8.5's formula)."""
    assert cost_model.liger_chunk_rows(16384, 3584, 152064) == 512
    for gpu in (GPUS["H100"], GPUS["H200"]):
        best = min(predict(b, QWEN7B, gpu)["total_s"] for b in cost_model.BACKENDS)
        peer = min(predict(p, QWEN7B, gpu)["total_s"] for p in ("liger", "cce"))
        floor = predict("floor", QWEN7B, gpu)["total_s"]
        assert best <= peer and floor / best >= 0.70


def test_pmd_longer_than_a_chunk_is_costed_as_two_passes():
    """A padded sequence longer than the torch chunk: torch's two passes (8nHV); longer than the cublas chunk:
    the triton backend, which the cublas backend runs then."""
    s = auto_backend.shape_of("pmd", 16384, 3584, 152064, torch.bfloat16, seq_len=None)
    assert s.seq_len == 0
    torch_rows, cublas_rows = cost_model.torch_chunk_rows(s.V), cost_model.cublas_chunk_rows(s.V, 2)
    assert (torch_rows, cublas_rows) == (882, 3530)
    fits, mid, long = (auto_backend.shape_of("pmd", s.n, s.H, s.V, torch.bfloat16, seq_len=L)
                       for L in (882, 1000, 4000))
    two_pass = Shape(s.n, s.H, s.V, op="logprobs")
    assert predict("torch", mid, H100) == predict("torch", two_pass, H100) != predict("torch", fits, H100)
    assert predict("cublas", mid, H100) == predict("cublas", fits, H100)
    assert predict("cublas", long, H100) == predict("triton", long, H100)


def test_autotune_measures_once_per_shape_key(monkeypatch):
    monkeypatch.setattr(auto_backend, "_MEASURED", {})
    calls = []

    def measure(backend):
        calls.append(backend)
        return {"triton": 2.0, "torch": 1.0, "cublas": 1.5}[backend]

    s = Shape(5000, 64, 1000)
    assert auto_backend.choose(s, H100, "cuda:0", measure, tune=False) == predicted_fastest(s, H100)
    assert calls == []
    assert auto_backend.choose(s, H100, "cuda:0", measure, tune=True) == "torch"       # measured, not predicted
    assert auto_backend.choose(Shape(6000, 64, 1000), H100, "cuda:0", measure, tune=True) == "torch"  # same key
    assert calls == ["triton", "torch", "cublas"]
    auto_backend.choose(Shape(5000, 64, 1000, op="logprobs"), H100, "cuda:0", measure, tune=True)
    assert calls == ["triton", "torch", "cublas", "triton", "torch"]           # a new key; no cublas for logprobs


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


def test_cuda_choice_of_the_qwen_head(monkeypatch):
    """What `auto` resolves to on an H100 for the Qwen-7B head, from the real cost model (no GPU needed): the
    single pass for the PMD loss (bf16 and TF32 fp32), triton for log-probs, fp16 and sequences longer than the
    cublas chunk."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(auto_backend, "free_bytes", lambda device: 40e9)
    monkeypatch.setattr(auto_backend, "_MEASURED", {})
    cuda = torch.device("cuda", 0)

    def pick(op, dtype, seq):
        return auto_backend.cuda_choice(op, cuda, 16384, 3584, 152064, dtype, seq, allow_measure=False)

    assert pick("pmd", torch.bfloat16, 1024) == "cublas"
    assert pick("logprobs", torch.bfloat16, None) == "triton"
    assert pick("pmd", torch.float16, 1024) == "triton"
    assert pick("pmd", torch.bfloat16, 8192) == "triton"        # longer than the 3530-row chunk: triton's cost
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert pick("pmd", torch.float32, 1024) == "cublas"


def test_auto_skips_a_backend_that_does_not_fit_in_memory(monkeypatch):
    """cublas's working memory at the Qwen-7B head (E 1 GiB + 256 MiB of fp32 logits + the fp32 grad_W
    accumulator 2.2 GB) against triton's (256 MiB dz + the fp32 grad_h accumulator): with 2 GB free, auto takes
    triton; with nothing that fits, the backend needing least memory."""
    s = Shape(16384, 3584, 152064, seq_len=1024)
    cub, tri = cost_model.extra_bytes("cublas", s), cost_model.extra_bytes("triton", s)
    assert cub == pytest.approx(3530 * 152064 * 2 + 441 * 152064 * 4 + 4 * 152064 * 3584 + 3530 * 3584 * 4)
    assert 3.4e9 < cub < 3.6e9 and tri == pytest.approx(16384 * 8192 * 2 + 4 * 16384 * 3584)
    assert predicted_fastest(s, H100, free_bytes=8e9) == "cublas"
    assert predicted_fastest(s, H100, free_bytes=2e9) == "triton"
    assert cost_model.candidates(s, free_bytes=1e6) == ("triton",)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(auto_backend, "free_bytes", lambda device: 2e9)
    assert auto_backend.cuda_choice("pmd", torch.device("cuda", 0), 16384, 3584, 152064, torch.bfloat16, 1024,
                                    allow_measure=False) == "triton"
