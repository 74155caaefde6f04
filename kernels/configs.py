"""Launch configurations, pinned per architecture; autotuning behind FASTPMD_AUTOTUNE=1.

Families (arch_of in kernels/_runtime.py maps the compute capability):
  "80"  = Ampere/Ada (sm_80..89, mma.sync/HMMA),          "90" = Hopper (H100/H200, sm_90, wgmma/HGMMA),
  "100" = datacenter Blackwell (B200/GB200/B300, sm_100/103 and 11.x, tcgen05.mma/UTCHMMA, 227 KiB shared memory),
  "120" = consumer/workstation Blackwell (RTX 50xx/PRO, sm_120/121: mma.sync/HMMA, 99 KiB shared memory),
  "interp" = the CPU interpreter (tiny blocks: the interpreter's cost grows with the block area),
  "<family>t" = fp32 inputs with TF32 dots on that family, "ieee" = fp32 inputs with exact dots (`family()`).
Every pinned config is compiled by `fastpmd kernels-report` (kernels/report.py), which checks registers, spills,
shared memory and tensor-core use. Only block sizes, warps and stages live here; shapes are runtime arguments.

Shared memory of a pipelined tile loop = num_stages * (A tile + B tile) * 2 bytes (16-bit operands):
  logits 128x128x64, 3 stages: 3 * (128*64 + 64*128) * 2 = 96 KiB   (sm_90 limit 227 KiB, sm_80 163 KiB)
  matmul 128x128x64, 4 stages: 4 * (128*64 + 64*128) * 2 = 128 KiB
Registers (kernels report, bf16, triton 3.9, pinned configs): sm_90 logits_fwd 128x128 with entropy+bias 176,
dlogits 216, matmul 113-182; sm_100 223 / 166 / 94-215; no spills. The 128x64 logits candidates are the
fallback if a triton upgrade makes a 128x128 tile spill (it did at 255 registers before the entropy sum was
taken relative to the running max). The vocab-chunk bounds and matmul shapes are specialised (divisible by 16)
on purpose: unspecialised they made the dlogits stores and the matmul loads scalar (255 registers, spills, no
cp.async pipelining).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

ENV_AUTOTUNE = "FASTPMD_AUTOTUNE"
# Bytes of the per-chunk dlogits buffer of the backward pass ([n, chunk_v] in the operand dtype); env
# FASTPMD_DLOGITS_MB overrides. Larger chunks mean fewer fp32 read-modify-write passes over grad_hidden: at
# n = 16384, H = 3584, V = 152064 (bf16) 256 MiB gives 19 chunks of 8192 columns (8.9 GB of grad_hidden traffic),
# 64 MiB gives 75 chunks of 2048 (35 GB). Peak extra memory = this buffer + the fp32 grad_hidden accumulator.
DLOGITS_BUDGET_BYTES = int(os.environ.get("FASTPMD_DLOGITS_MB", "256")) << 20
# The budget above is per BUDGET_TOKENS tokens: chunks never narrower than it gives 16-bit dz at that n
# (8192 columns by default), so beyond 16384 tokens the buffer grows with n (1 GiB at n = 65536) instead of the
# chunk count (75 chunks and ~201 GB of grad_hidden traffic at n = 65536, H = 5120 with a fixed 256 MiB).
BUDGET_TOKENS = 16384


def min_chunk_columns() -> int:
    """Narrowest dlogits chunk (columns): DLOGITS_BUDGET_BYTES of 2-byte dz at BUDGET_TOKENS tokens."""
    return DLOGITS_BUDGET_BYTES // (BUDGET_TOKENS * 2)


# Forward vocab split: aim for this many programs per SM so that short batches still fill the GPU.
PROGRAMS_PER_SM = 8


@dataclass(frozen=True)
class Config:
    """Meta-parameters of one kernel launch (constexpr block sizes plus warps/stages)."""
    blocks: dict = field(default_factory=dict)  # constexpr block sizes, e.g. {"BLOCK_N": 128}
    num_warps: int = 4
    num_stages: int = 2

    def meta(self, fp32_operands: bool = False) -> dict:
        """Launch keywords. fp32 operands (fp32 inputs, the fp16 path's fp32 dlogits) take twice the shared
        memory per stage, so they run with at most 2 stages (sm_90 matmul: 4 x 64 KiB would exceed 227 KiB)."""
        stages = min(self.num_stages, 2) if fp32_operands else self.num_stages
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": stages}


def _config(warps, stages, **blocks):
    return Config(blocks=blocks, num_warps=warps, num_stages=stages)


# kernel name -> arch family -> list of configs; the first is the pinned one, the rest are autotune candidates.
CONFIGS: dict[str, dict[str, list[Config]]] = {
    # forward statistics (kernels/logits.py) and backward dlogits (kernels/dlogits.py)
    "logits_fwd": {
        # FLATTEN: one software-pipelined loop over (vocab tile, K step) (tl.range flatten=True) instead of a
        # pipeline refilled at every vocab tile; sm_100 spills with it (255 registers, 24 B), so not there
        "90": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, FLATTEN=True),
               _config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, FLATTEN=True),
               _config(8, 4, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=16, FLATTEN=True)],
        "80": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, FLATTEN=True),
               _config(4, 4, BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=16, FLATTEN=True)],
        "100": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, FLATTEN=False),
                _config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, FLATTEN=False)],
        # sm_120: the Ampere 128x64x32 tile spills 8 bytes here (kernels report); 64x64 is the pinned one
        "120": [_config(4, 4, BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=16, FLATTEN=True),
                _config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, FLATTEN=True)],
        # fp32 inputs, TF32 dots (family()): 128x128x64 spills on sm_90 with fp32 operands (255 registers, 24 B)
        "80t": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, FLATTEN=True)],
        "90t": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, FLATTEN=True)],
        "100t": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8, FLATTEN=False)],
        "120t": [_config(4, 4, BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=16, FLATTEN=True)],
        # fp32 inputs, exact IEEE dots (FMA), every architecture: flattening spills here (sm_80: 488 B)
        "ieee": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8, FLATTEN=False)],
        "interp": [_config(1, 1, BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2, FLATTEN=True)],
    },
    "logits_bwd": {
        "90": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8),
               _config(8, 4, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=16),
               _config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8),
               _config(8, 3, BLOCK_N=256, BLOCK_V=128, BLOCK_H=64, GROUP_N=8),     # Hopper-sized dlogits tiles
               _config(8, 3, BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=8)],
        "80": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8),
               _config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=32, GROUP_N=8)],
        "100": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8),
                _config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=64, GROUP_N=8)],
        "120": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8),
                _config(4, 4, BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, GROUP_N=16)],
        "80t": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8)],
        "90t": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8)],
        "100t": [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8)],
        "120t": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8)],
        "ieee": [_config(8, 3, BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, GROUP_N=8)],
        "interp": [_config(1, 1, BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP_N=2)],
    },
    "merge": {
        "90": [_config(4, 1, BLOCK=256)],
        "80": [_config(4, 1, BLOCK=256)],
        "100": [_config(4, 1, BLOCK=256)],
        "120": [_config(4, 1, BLOCK=256)],
        "interp": [_config(1, 1, BLOCK=16)],
    },
    "matmul": {
        "90": [_config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
               _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16)],
        "80": [_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
               _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=16)],
        "100": [_config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16)],
        "120": [_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=16)],
        # fp32 inputs, TF32 dots: a K-step of 16 on sm_80/120 (128x128x32 spills 16 B in the filtered variant)
        "80t": [_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8)],
        "90t": [_config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)],
        "100t": [_config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)],
        "120t": [_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8)],
        "interp": [_config(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)],
    },
    # one row per program, a memory-bound sweep: 16 fp32 elements per thread per tile (kernels/shifted_exp.py)
    "shifted_exp": {
        "90": [_config(8, 2, BLOCK_V=4096)],
        "80": [_config(8, 2, BLOCK_V=4096)],
        "100": [_config(8, 2, BLOCK_V=4096)],
        "120": [_config(8, 2, BLOCK_V=4096)],
        "interp": [_config(1, 1, BLOCK_V=32)],
    },
    "pmd_epilogue": {
        "90": [_config(4, 1, BLOCK=1024)],
        "80": [_config(4, 1, BLOCK=1024)],
        "100": [_config(4, 1, BLOCK=1024)],
        "120": [_config(4, 1, BLOCK=1024)],
        "interp": [_config(1, 1, BLOCK=16)],
    },
}


def ieee_dots(*dtypes: torch.dtype) -> bool:
    """Exact IEEE fp32 dots (FMA, no tensor cores): fp32 inputs with torch.get_float32_matmul_precision() ==
    "highest" (torch's default). At "high"/"medium" fp32 inputs take TF32 tensor-core dots, as torch's own fp32
    matmuls do then. Read at every launch."""
    return all(d == torch.float32 for d in dtypes) and torch.get_float32_matmul_precision() == "highest"


def family(kernel: str, arch: str, dtype: torch.dtype, ieee: bool | None = None) -> str:
    """Config family of `kernel` ("logits_fwd", "logits_bwd", "matmul") on `arch` for inputs of `dtype`.
    fp32 inputs with exact IEEE dots (ieee_dots) run on FMA units, for which the Hopper/Blackwell 128x128x64
    logits tiles spill heavily (kernels report, sm_90: 3.7 KB of stack) and sm_120's 64x64x32 forward 8 B: the
    logits kernels take the "ieee" family (the Ampere tiles, unflattened) everywhere. fp32 inputs with TF32 dots take the "<arch>t" family: fp32 operands are twice the bytes of 16-bit
    ones, and the 16-bit tiles spill with them (sm_90 logits_fwd 128x128x64: 24 B; sm_80 filtered matmul
    128x128x32: 16 B). ieee: override ieee_dots (the kernels report builds both). Other kernels: `arch`."""
    if arch == "interp" or dtype != torch.float32 or kernel not in ("logits_fwd", "logits_bwd", "matmul"):
        return arch
    if ieee_dots(dtype) if ieee is None else ieee:
        return "ieee" if kernel.startswith("logits") else arch
    return arch + "t"


ENV_GRAD_GEMM = "FASTPMD_GRAD_GEMM"
GRAD_GEMMS = ("auto", "cublas", "triton")


def grad_gemm(device, dtype, filtering: bool = False) -> str:
    """Backend of the backward's two gradient GEMMs (kernels/backward.py): "cublas" (torch.mm / torch.addmm,
    fp32 accumulation) or "triton" (kernels/matmul.py). FASTPMD_GRAD_GEMM = auto | cublas | triton, read at each
    backward. auto: cublas on CUDA for bf16 and fp32 inputs (cuBLAS fp32 follows torch's float32 matmul
    precision: TF32 at "high"/"medium", IEEE SGEMM at "highest"); triton under the interpreter, for fp16 (its
    fp32 dlogits x fp16 operands have no cuBLAS kernel without fp32 copies) and with gradient filtering (the
    Triton matmul skips the dropped blocks)."""
    choice = os.environ.get(ENV_GRAD_GEMM, "auto") or "auto"
    if choice not in GRAD_GEMMS:
        raise ValueError(f"{ENV_GRAD_GEMM} must be one of {GRAD_GEMMS}, got {choice!r}")
    if choice != "auto":
        return choice
    on_cuda = getattr(device, "type", device) == "cuda"
    return "cublas" if (on_cuda and dtype in (torch.bfloat16, torch.float32) and not filtering) else "triton"


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "0") not in ("", "0", "false", "False")


_TUNED: dict[tuple, Config] = {}


def pick(name: str, arch: str, key: tuple = (), bench=None, timer=None) -> Config:
    """Config for kernel `name` on `arch`: the pinned one, or (FASTPMD_AUTOTUNE=1, not the interpreter, `bench`
    given) the fastest candidate for this shape `key`, timed once and cached.

    `bench(config)` must launch the kernel without side effects on results (scratch outputs). `timer(fn) -> ms`
    defaults to triton.testing.do_bench."""
    candidates = CONFIGS[name][arch]
    if bench is None or arch == "interp" or len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    cache_key = (name, arch) + tuple(key)
    if cache_key not in _TUNED:
        if timer is None:
            from triton.testing import do_bench
            timer = lambda fn: do_bench(fn, warmup=5, rep=20)  # noqa: E731
        timings = []
        for i, cfg in enumerate(candidates):
            try:
                timings.append((timer(lambda: bench(cfg)), i))
            except Exception:  # a candidate that does not compile/fit on this GPU is skipped  # noqa: BLE001
                continue
        _TUNED[cache_key] = candidates[min(timings)[1]] if timings else candidates[0]
    return _TUNED[cache_key]
