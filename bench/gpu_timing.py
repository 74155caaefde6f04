"""GPU timing of the fused LM-head PMD loss: triton kernels vs the torch chunked backend (CUDA only).

    python -m fastpmd.bench.gpu_timing [--n 16384 --hidden 3584 --vocab 152064 --dtype bf16]

Times forward+backward of fastpmd.fused_linear_pmd_loss (backend "triton" and "torch") and of
fastpmd.linear_logprobs (triton, forward only and forward+backward), with CUDA events (median of --reps runs
after --warmup). Reports ms, TFLOP/s and % of the dense peak counting 8*N*H*V flops for forward+backward
(2*N*H*V forward only), and peak memory beyond inputs and outputs. Peak TFLOP/s defaults from the device name
(H100/H200 989, A100 312, dense bf16/fp16), or --peak-tflops.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

PEAKS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _peak(name: str) -> float | None:
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def _time(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384, help="tokens (B*T, all valid)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--backends", default="triton,torch")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_timing: needs CUDA", file=sys.stderr)
        return 2
    import fastpmd

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = a.peak_tflops or _peak(name)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    N, H, V = a.n, a.hidden, a.vocab
    B, T = max(1, N // a.seq), a.seq
    N = B * T
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(B, T, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    weight = (torch.randn(V, H, device=dev, generator=g) * H ** -0.5).to(dt).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=dev, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    old = torch.full((B, T), -5.0, device=dev)
    adv = torch.randn(B, device=dev, generator=g)
    flops_fb, flops_f = 8.0 * N * H * V, 2.0 * N * H * V

    def fused(backend):
        def run():
            hidden.grad = weight.grad = None
            loss, _ = fastpmd.fused_linear_pmd_loss(hidden, weight, targets, mask, old, adv, tau=0.01,
                                                    backend=backend)
            loss.backward()
        return run

    def logprobs(backward):
        def run():
            hidden.grad = weight.grad = None
            with torch.set_grad_enabled(backward):
                lp = fastpmd.linear_logprobs(hidden, weight, targets, mask=mask, backend="triton")
            if backward:
                lp.sum().backward()
        return run

    def kernel_only():  # fastpmd.kernels directly on the [N, H] rows: no mask compaction copies
        from fastpmd.kernels import fused_linear_pmd_loss_triton
        h2 = hidden.detach().view(N, H).requires_grad_()
        cu = torch.arange(0, N + 1, T, device=dev, dtype=torch.int32)
        div = torch.full((B,), float(T), device=dev)
        nseq = torch.tensor(float(B), device=dev)

        def run():
            h2.grad = weight.grad = None
            loss, _, _ = fused_linear_pmd_loss_triton(h2, weight, targets.view(N), None, old.view(N), adv, cu, div,
                                                      0.01, 1.0, nseq)
            loss.backward()
        return run

    cases = []
    for be in a.backends.split(","):
        cases.append((f"fused_linear_pmd_loss fwd+bwd [{be}]", fused(be), flops_fb))
    if "triton" in a.backends:
        cases.append(("kernels.fused_linear_pmd_loss_triton f+b", kernel_only(), flops_fb))
    if "triton" in a.backends:
        cases.append(("linear_logprobs fwd [triton]", logprobs(False), flops_f))
        cases.append(("linear_logprobs fwd+bwd [triton]", logprobs(True), flops_fb))
    rows = []
    print(f"device: {name}  N={N} H={H} V={V} {a.dtype}  peak={peak} TFLOP/s (dense)")
    print(f"{'case':40s} {'ms':>9s} {'TFLOP/s':>8s} {'% peak':>7s} {'extra MiB':>10s}")
    for label, fn, flops in cases:
        try:
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = statistics.median(_time(fn, a.reps, a.warmup))
            # inputs are allocated before `base`; outputs = grad_hidden + grad_weight (in the inputs' dtypes)
            outputs = (hidden.numel() + weight.numel()) * hidden.element_size() if "bwd" in label else 0
            extra = (torch.cuda.max_memory_allocated() - base - outputs) / 2**20
            tf = flops / ms / 1e9
            row = {"case": label, "ms": ms, "tflops": tf, "pct_peak": 100 * tf / peak if peak else None,
                   "extra_mib": extra}
        except Exception as e:  # noqa: BLE001 - report the failure in the table
            row = {"case": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        if "error" in row:
            print(f"{label:40s} ERROR {row['error']}")
        else:
            pct = f"{row['pct_peak']:.1f}" if peak else "n/a"
            print(f"{label:40s} {ms:9.2f} {tf:8.1f} {pct:>7s} {extra:10.0f}")
    budget = weight.numel() * 4 / 2**20 + 64
    print(f"memory budget beyond inputs/outputs: fp32 grad_weight + 64 MiB = {budget:.0f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "N": N, "H": H, "V": V, "dtype": a.dtype, "peak": peak, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
