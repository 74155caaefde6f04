"""`backend="auto"` on CUDA: the fastpmd backend predicted faster by fastpmd.cost_model for this call's shape, or,
with FASTPMD_AUTOTUNE=1, the one measured faster (forward+backward of each candidate, timed once per shape key,
cached for the process). Plain-PyTorch equivalent:
min(cost_model.candidates(shape), key=time_of_forward_backward): triton, torch, and cublas for the PMD loss.

Shape key: (op, device, bit length of the row count, H, V, dtype, TF32 allowed, padded sequence length).
A backend whose working memory (cost_model.extra_bytes) exceeds 90% of what the device can still give is not a
candidate: the fastest prediction never buys an out-of-memory.
Under torch.compile / CUDA-graph capture nothing is measured (the prediction decides).
"""
from __future__ import annotations

import os

import torch

from .cost_model import GpuRates, Shape, candidates, gpu_rates, predicted_fastest

ENV_AUTOTUNE = "FASTPMD_AUTOTUNE"
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_MEASURED: dict[tuple, str] = {}


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "0") not in ("", "0", "false", "False")


def shape_of(op: str, n: int, H: int, V: int, dtype: torch.dtype, seq_len: int | None) -> Shape:
    """The cost model's Shape of one call (a padded sequence longer than a backend's chunk is costed as that
    backend's two-pass form by cost_model.predict)."""
    return Shape(n, H, V, _DTYPES.get(dtype, "bf16"), torch.get_float32_matmul_precision() != "highest", op,
                 seq_len or 0)


def choose(shape: Shape, gpu: GpuRates, device_key: str, measure=None, tune: bool | None = None,
           free_bytes: float | None = None) -> str:
    """The backend for `shape`: predicted_fastest, or (tune, default FASTPMD_AUTOTUNE) the measured fastest,
    among the candidates whose working memory fits free_bytes (None: no limit). measure(backend) -> seconds
    runs once per backend and shape key; the choice is cached."""
    tune = autotune_enabled() if tune is None else tune
    if not tune or measure is None:
        return predicted_fastest(shape, gpu, free_bytes)
    key = (shape.op, device_key, max(shape.n, 1).bit_length(), shape.H, shape.V, shape.dtype, shape.tf32,
           shape.seq_len)
    if key not in _MEASURED:
        names = candidates(shape, free_bytes)
        times = {b: measure(b) for b in names}
        _MEASURED[key] = min(names, key=lambda b: (times[b], names.index(b)))
    return _MEASURED[key]


def cuda_choice(op: str, device: torch.device, n: int, H: int, V: int, dtype: torch.dtype, seq_len: int | None,
                allow_measure: bool) -> str:
    """choose() for a CUDA device: its GPU's assumed rates, a CUDA-event timer on synthetic inputs, and the
    memory the device can still give (a backend whose cost_model.extra_bytes exceeds it is not a candidate)."""
    shape = shape_of(op, n, H, V, dtype, seq_len)
    gpu = gpu_rates(torch.cuda.get_device_name(device))
    measure = (lambda b: _cuda_seconds(shape, b, device, dtype, seq_len)) if allow_measure else None
    return choose(shape, gpu, str(device), measure, free_bytes=free_bytes(device))


def free_bytes(device: torch.device) -> float:
    """90% of what the device can still give: free device memory plus the caching allocator's unused reserve
    (cudaMemGetInfo: a driver query, no stream synchronisation)."""
    free, _ = torch.cuda.mem_get_info(device)
    return 0.9 * (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _cuda_seconds(shape: Shape, backend: str, device, dtype, seq_len: int | None, reps: int = 3) -> float:
    """Mean seconds of `reps` forward+backward runs (after one warm-up) on random inputs of this shape."""
    from .fused import fused_linear_pmd_loss
    from .logprobs import linear_logprobs

    T = min(seq_len or shape.n, shape.n) if shape.op == "pmd" else shape.n
    B = max(1, shape.n // max(T, 1))
    with torch.enable_grad():
        h = torch.randn(B, T, shape.H, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(shape.V, shape.H, device=device, dtype=dtype) * 0.02).requires_grad_()
        t = torch.randint(0, shape.V, (B, T), device=device)
        mask = torch.ones(B, T, dtype=torch.bool, device=device)

        def run():
            if shape.op == "pmd":
                old = torch.zeros(B, T, device=device)
                loss, _ = fused_linear_pmd_loss(h, w, t, mask, old, torch.zeros(B, device=device), tau=0.1,
                                                backend=backend)
            else:
                loss = linear_logprobs(h, w, t, mask=mask, backend=backend).sum()
            loss.backward()

        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / reps
