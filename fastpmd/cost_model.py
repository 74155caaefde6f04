"""Cost model of the LM-head forward+backward on a GPU: which fastpmd backend `auto` picks on CUDA, and the
PREDICTED table of docs/kernels.md. Pure arithmetic (no GPU needed, unit-tested on CPU); every figure it gives
is a prediction from the assumed rates below, never a measurement.

time = sum over phases of  flops / rate(phase's engine)  +  bytes beyond the GEMM tiles / HBM bandwidth,
a serial sum (no overlap of the elementwise passes with the matrix work: pessimistic for everyone alike).

Backends (n tokens, H hidden, V vocab; bf16 or fp16 inputs unless fp32):
  triton  8nHV: forward logits kernel (2nHV, Triton), dlogits kernel recomputing the logits (2nHV, Triton), then
          per vocab chunk of chunk_v columns grad_h += dz @ W and grad_W = dz^T @ h (4nHV, cuBLAS for bf16/fp32,
          the Triton matmul for fp16). Bytes: dz written once, read twice (2 B each for bf16, 4 B otherwise);
          the fp32 grad_h accumulator read+written once per chunk (8nH per chunk); W read by 3 passes.
  cublas  op "pmd", 6nHV (fastpmd.single_pass, whole sequences per chunk of C rows): cuBLAS logits GEMM with
          fp32 output, one Triton sweep per row (fp32 read, E written), the two gradient GEMMs on E: 14 bytes
          per logit with bf16 E (4+4+2+2+2; 20 with fp32 E); the fp32 grad_W accumulator read+written once per
          chunk (8VH) and cast once at the end; W read by 3 passes. A padded sequence longer than C: triton.
  torch   op "pmd": 6nHV (fastpmd.fused.SequenceChunkedPMD, whole sequences per chunk): per chunk the logits
          GEMM, the softmax statistics and gradient in place on the fp32 block, grad_h = gz @ W (gz cast to the
          weight dtype), grad_W += gz^T @ h in fp32 (an fp32 GEMM: TF32 at matmul precision "high"/"medium",
          IEEE SGEMM at "highest"); ~44 bytes per logit of elementwise traffic (_TORCH_BYTES_PER_LOGIT), and
          the fp32 grad_W accumulator read+written once per chunk (8VH).
          op "logprobs", or "pmd" with a padded sequence longer than a chunk: 8nHV
          (fastpmd.chunked.ChunkedLinearLogprobs recomputes the logits in the backward), ~60 bytes per logit.
  floor   6nHV: three cuBLAS GEMMs and nothing else (bench gpu_timing's floor).
  liger   6nHV (Liger FLCE, liger-kernel 0.8.5 read): cuBLAS GEMMs on chunks of next_pow2(n / ceil(V/H)) rows
          with bf16 logits; its Triton cross-entropy kernel reads a row twice and writes the gradient in place:
          12 B per logit (logits write 2, two reads 4, gradient write 2, the two gradient GEMMs' reads 4); the
          bf16 grad_W accumulator (its default, accum_dtype=None) read+written once per chunk (4VH).
  cce     Cut Cross-Entropy: forward logits kernel 2nHV and a backward recomputing the logits 2nHV then both
          gradients inside the same kernel 4nHV, all Triton (at fastpmd's Triton rate); its gradient filter
          skips blocks whose softmax is below 2^-12: assumed to skip CCE_SKIP of the gradient work.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .chunked import default_chunk_rows

BACKENDS = ("triton", "torch", "cublas")  # what `auto` chooses between on CUDA (candidates())
PEERS = ("floor", "liger", "cce")


@dataclass(frozen=True)
class GpuRates:
    """Assumed achieved rates (TFLOP/s, TB/s) of one GPU: not measured by fastpmd (no GPU here). cuBLAS at
    ~70% of the dense peak, Triton's cp.async tiles at ~45% (docs/kernels.md's roofline: 1 CTA per SM, the
    softmax epilogue not overlapped), HBM at ~85% of the data sheet."""
    name: str
    cublas_16: float      # bf16/fp16 GEMM, fp32 accumulation
    cublas_tf32: float
    cublas_fp32: float    # IEEE SGEMM, no tensor cores
    triton_16: float      # fastpmd's fused logits kernels, 16-bit operands
    hbm: float            # TB/s


GPUS = {
    "H100": GpuRates("H100 SXM", cublas_16=700.0, cublas_tf32=350.0, cublas_fp32=50.0, triton_16=450.0, hbm=2.85),
    "H200": GpuRates("H200", cublas_16=700.0, cublas_tf32=350.0, cublas_fp32=50.0, triton_16=450.0, hbm=4.1),
    "A100": GpuRates("A100 SXM", cublas_16=220.0, cublas_tf32=110.0, cublas_fp32=17.0, triton_16=160.0, hbm=1.7),
}
DLOGITS_BUDGET = 256 << 20              # kernels/configs.DLOGITS_BUDGET_BYTES default
GPU_CHUNK_BYTES = 512 << 20             # torch backend on CUDA: a [c, V] fp32 logits block per chunk
CUBLAS_CHUNK_BYTES = 1 << 30            # cublas backend: E [C, V] (weight dtype) per chunk of whole sequences
CUBLAS_SUB_BYTES = 256 << 20            # cublas backend: fp32 logits [s, V] per GEMM sub-block of a chunk
_TORCH_BYTES_PER_LOGIT = {"pmd": 44.0,   # 16-bit logits write + fp32 upcast (2+2+4), amax 4, exp in place 8,
                          "logprobs": 60.0}  # sum 4, gradient 8, cast 6, GEMM reads 2+4; logprobs: + forward 16
CCE_SKIP = 0.75                         # assumed, not measured


@dataclass(frozen=True)
class Shape:
    n: int                # tokens (after compaction)
    H: int
    V: int
    dtype: str = "bf16"   # "bf16", "fp16" or "fp32"
    tf32: bool = False    # torch.get_float32_matmul_precision() != "highest": fp32 GEMMs and fp32 tiles on TF32
    op: str = "pmd"       # "pmd" (fused_linear_pmd_loss) or "logprobs" (linear_logprobs)
    seq_len: int = 0      # op "pmd": the padded sequence length (a single pass needs it within a chunk)


def _tf(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12)


def _gb(nbytes: float, tbs: float) -> float:
    return nbytes / (tbs * 1e12)


def _fp32_gemm(gpu: GpuRates, s: Shape) -> float:
    return gpu.cublas_tf32 if s.tf32 else gpu.cublas_fp32


def _gemm_rate(gpu: GpuRates, s: Shape) -> float:
    return _fp32_gemm(gpu, s) if s.dtype == "fp32" else gpu.cublas_16


def _triton_rate(gpu: GpuRates, s: Shape) -> float:
    """TF32 tiles run at half the 16-bit rate (tensor cores); exact fp32 dots on FMA units at the SGEMM rate."""
    if s.dtype != "fp32":
        return gpu.triton_16
    return gpu.triton_16 / 2 if s.tf32 else gpu.cublas_fp32


def elt(s: Shape) -> int:
    return 4 if s.dtype == "fp32" else 2


def chunk_columns(s: Shape, budget: int = DLOGITS_BUDGET) -> int:
    """kernels/backward.chunk_columns without the 32-bit cap: the dlogits buffer [n, chunk_v] within budget,
    at least budget / (16384 tokens x 2 bytes) columns."""
    dz = 2 if s.dtype == "bf16" else 4
    cols = max(budget // max(1, s.n * dz), budget // (16384 * 2)) // 128 * 128
    return max(128, min(cols, -(-s.V // 128) * 128))


def torch_chunk_rows(V: int) -> int:
    """Rows per chunk of the torch backend on CUDA (fastpmd.dispatch.torch_chunk_rows)."""
    return default_chunk_rows(V, GPU_CHUNK_BYTES)


def cublas_chunk_rows(V: int, e_bytes: int) -> int:
    """Rows per chunk of the cublas backend: E [C, V] of e_bytes per entry within CUBLAS_CHUNK_BYTES."""
    return int(max(16, CUBLAS_CHUNK_BYTES // (e_bytes * V)))


def liger_chunk_rows(n: int, H: int, V: int) -> int:
    """Liger FLCE's chunk: next_pow2(ceil(n / ceil(V / H))), at most n."""
    rows = -(-max(n, 1) // -(-V // H))
    return min(1 << (rows - 1).bit_length(), max(n, 1))


def extra_bytes(backend: str, s: Shape) -> float:
    """Working memory of a fastpmd backend on s beyond its inputs and outputs (bytes; docs/kernels.md):
    cublas: E [C, V] + the fp32 logits sub-block + the fp32 grad_W accumulator [V, H] + fp32 grad_h rows [C, H];
    triton: the dlogits buffer [n, chunk_v] + the fp32 grad_h accumulator [n, H];
    torch: the fp32 [c, V] logits block (twice in the two-pass form) + the fp32 grad_W accumulator."""
    acc_w = 4.0 * s.V * s.H
    if backend == "cublas" and s.seq_len <= cublas_chunk_rows(s.V, elt(s)):
        rows = min(cublas_chunk_rows(s.V, elt(s)), s.n)
        sub = min(rows, CUBLAS_SUB_BYTES // (4 * s.V))
        return float(rows * s.V * elt(s) + sub * s.V * 4 + acc_w + rows * s.H * 4)
    if backend in ("cublas", "triton"):
        dz = 2 if s.dtype == "bf16" else 4
        return float(s.n * chunk_columns(s) * dz + 4.0 * s.n * s.H)
    rows = min(torch_chunk_rows(s.V), s.n)
    blocks = 1 if (s.op == "pmd" and s.seq_len <= torch_chunk_rows(s.V)) else 2
    return float(blocks * rows * s.V * 4 + acc_w)


def candidates(s: Shape, free_bytes: float | None = None) -> tuple[str, ...]:
    """The fastpmd backends that can run s: cublas only for op "pmd" with bf16 or fp32 inputs; with free_bytes,
    only those whose extra_bytes fit it (the one needing least memory when none does)."""
    names = BACKENDS if (s.op == "pmd" and s.dtype != "fp16") else tuple(b for b in BACKENDS if b != "cublas")
    if free_bytes is None:
        return names
    fit = tuple(b for b in names if extra_bytes(b, s) <= free_bytes)
    return fit or (min(names, key=lambda b: extra_bytes(b, s)),)


def predict(backend: str, s: Shape, gpu: GpuRates) -> dict[str, float]:
    """PREDICTED seconds of forward+backward for `backend` (a fastpmd backend or a peer) on shape s:
    {"flop_s": ..., "byte_s": ..., "total_s": ...}."""
    nhv = float(s.n) * s.H * s.V
    logits = float(s.n) * s.V
    w_bytes = float(s.V) * s.H * elt(s)
    if backend == "triton":
        grad_rate = gpu.triton_16 if s.dtype == "fp16" else _gemm_rate(gpu, s)
        flop_s = _tf(4 * nhv, _triton_rate(gpu, s)) + _tf(4 * nhv, grad_rate)
        dz = 2 if s.dtype == "bf16" else 4
        chunks = -(-s.V // chunk_columns(s))
        nbytes = 3 * logits * dz + chunks * 8.0 * s.n * s.H + 3 * w_bytes
    elif backend == "cublas":
        if backend not in candidates(s):
            raise ValueError(f"predict: backend 'cublas' runs op 'pmd' on bf16/fp32 only, got {s}")
        e = elt(s)
        rows = cublas_chunk_rows(s.V, e)
        if s.seq_len > rows:                               # fastpmd.fused: the triton two-pass form then
            return predict("triton", s, gpu)
        flop_s = _tf(6 * nhv, _gemm_rate(gpu, s))
        chunks = -(-s.n // rows)
        nbytes = logits * (8 + 3 * e) + chunks * 8.0 * s.V * s.H + (4 + e) * s.V * s.H + 3 * w_bytes
    elif backend == "torch":
        op = "logprobs" if s.seq_len > torch_chunk_rows(s.V) else s.op
        gemms_16 = 4 if op == "pmd" else 6                # logits (+ recompute), grad_h; grad_W is an fp32 GEMM
        flop_s = _tf(gemms_16 * nhv, _gemm_rate(gpu, s)) + _tf(2 * nhv, _fp32_gemm(gpu, s))
        chunks = -(-s.n // torch_chunk_rows(s.V))
        nbytes = logits * _TORCH_BYTES_PER_LOGIT[op] + 2 * w_bytes + chunks * 8.0 * s.V * s.H
    elif backend == "floor":
        flop_s = _tf(6 * nhv, _gemm_rate(gpu, s))
        nbytes = 3 * w_bytes
    elif backend == "liger":
        flop_s = _tf(6 * nhv, _gemm_rate(gpu, s))
        chunks = -(-s.n // liger_chunk_rows(s.n, s.H, s.V))
        nbytes = logits * 12.0 + chunks * 2.0 * w_bytes + 3 * w_bytes
    elif backend == "cce":
        flop_s = _tf((4 + 4 * (1 - CCE_SKIP)) * nhv, _triton_rate(gpu, s))
        nbytes = 4 * w_bytes
    else:
        raise ValueError(f"predict: unknown backend {backend!r}; one of {BACKENDS + PEERS}")
    byte_s = _gb(nbytes, gpu.hbm)
    return {"flop_s": flop_s, "byte_s": byte_s, "total_s": flop_s + byte_s}


def predicted_fastest(s: Shape, gpu: GpuRates, free_bytes: float | None = None) -> str:
    """The fastpmd backend (of candidates(s, free_bytes)) with the smallest predicted time; ties go to the first
    listed."""
    return min(candidates(s, free_bytes), key=lambda b: predict(b, s, gpu)["total_s"])


def gpu_rates(name: str) -> GpuRates:
    """Rates for a CUDA device name (torch.cuda.get_device_name): the closest listed GPU, H100 otherwise."""
    for key, rates in GPUS.items():
        if key in name.upper():
            return rates
    return GPUS["H100"]


def prediction_table(s: Shape, gpus=("H100", "H200")) -> str:
    """Markdown table: PREDICTED ms per backend/peer on each GPU and % of the floor's speed."""
    rows = ["| method | " + " | ".join(f"{GPUS[g].name} ms (PREDICTED) | % of floor speed" for g in gpus) + " |",
            "|---|" + "---|---|" * len(gpus)]
    tf32 = replace(s, tf32=True)
    for name, b, shape in (("fastpmd-cublas (single pass)", "cublas", s), ("fastpmd-triton", "triton", s),
                           ("fastpmd-torch (fp32 GEMMs IEEE)", "torch", s),
                           ("fastpmd-torch (fp32 GEMMs TF32)", "torch", tf32), ("floor (3 cuBLAS GEMMs)", "floor", s),
                           ("Liger FLCE", "liger", s), ("CCE", "cce", s)):
        cells = []
        for g in gpus:
            t = predict(b, shape, GPUS[g])["total_s"]
            floor = predict("floor", s, GPUS[g])["total_s"]
            cells.append(f"{t * 1e3:.0f} | {100 * floor / t:.0f}%")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(prediction_table(Shape(16384, 3584, 152064)))
