"""`fastpmd demo`: the library's main job on a CPU, in about a minute.

1. A synthetic RL batch (groups of responses, binary rewards, stale old log-probs) goes through the fused PMD-mean
   loss and through the naive path that materialises the logits; both are checked against each other in float64
   (loss and gradients of hidden and weight).
2. The benchmark harness (`fastpmd bench`) times both paths side by side and measures each one's peak extra
   memory in a fresh process, next to the three matrix products any exact method must do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fastpmd
from fastpmd._cli import ArgumentParser, check_out_dir


def synthetic_batch(prompts: int, group: int, seq: int, hidden: int, vocab: int, dtype, seed: int = 0):
    """hidden [B, T, H], weight [V, H], targets/mask/old [B, T], advantages [B] (PMD-mean), B = prompts*group."""
    g = torch.Generator().manual_seed(seed)
    b = prompts * group
    h = torch.randn(b, seq, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype) * (2.0 / hidden**0.5)
    t = torch.randint(0, vocab, (b, seq), generator=g)
    lengths = torch.randint(seq // 4, seq + 1, (b,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    with torch.no_grad():
        old = fastpmd.linear_logprobs(h, w, t, mask=mask, backend="naive").to(dtype)
    old = torch.where(mask, old + 0.05 * torch.randn(b, seq, generator=g, dtype=dtype), 0.0)  # stale policy
    rewards = (torch.rand(b, generator=g) < 0.3).to(dtype)
    adv = fastpmd.advantages(rewards, group_size=group, estimator="mean")
    return h, w, t, mask, old, adv, rewards


def check_agreement(tau: float) -> None:
    h, w, t, m, old, adv, r = synthetic_batch(4, 4, 37, 64, 1003, torch.float64)
    out = {}
    for backend in ("naive", "auto"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, metrics = fastpmd.fused_linear_pmd_loss(hh, ww, t, m, old, adv, tau=tau, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), hh.grad, ww.grad, metrics)
    (l0, gh0, gw0, _), (l1, gh1, gw1, met) = out["naive"], out["auto"]
    print(f"[1] PMD-mean loss, 16 responses (4 prompts x 4), mean reward {r.mean():.2f}, tau={tau}, float64:")
    print(f"    fused (backend auto -> {fastpmd.dispatch.resolve_backend('auto', h.device)}) {l1.item():.10f}"
          f"   naive {l0.item():.10f}")
    print(f"    max |diff|: loss {abs(l1 - l0).item():.1e}, grad_hidden {(gh1 - gh0).abs().max().item():.1e}, "
          f"grad_weight {(gw1 - gw0).abs().max().item():.1e}")
    print("    metrics: " + ", ".join(f"{k}={v.item():.4g}" for k, v in met.items()))
    agree = (torch.allclose(l0, l1, rtol=1e-9) and torch.allclose(gh0, gh1, rtol=1e-7, atol=1e-12)
             and torch.allclose(gw0, gw1, rtol=1e-7, atol=1e-12))
    if not agree:
        raise SystemExit("fused and naive paths disagree (loss, grad_hidden or grad_weight)")


def check_args(args) -> None:
    """Every option before any work (ValueError naming the flag)."""
    from ._checks import check_positive_int, check_tau

    for flag in ("tokens", "hidden", "vocab", "reps"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    check_tau(args.tau, "--tau")
    if args.out:
        check_out_dir("--out", args.out)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="fastpmd demo", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows N of the timed batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--out", default="out/demo",
                   help="directory for the benchmark's results.json / results.md / plots (default out/demo)")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"fastpmd demo: error: {e}", file=sys.stderr)
        return 2
    print(f"fastpmd {fastpmd.__version__} demo on {torch.get_num_threads()} CPU threads (torch {torch.__version__})\n")
    check_agreement(args.tau)
    print(f"\n[2] Time and peak extra memory, hidden -> PMD-mean loss forward+backward, N={args.tokens}, "
          f"H={args.hidden}, V={args.vocab}, float32 (fastpmd bench):\n")
    from fastpmd.bench.cli import main as bench_main

    bench = ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--tokens", str(args.tokens),
             "--methods", "naive", "fastpmd-torch", "--losses", "pmd-mean", "--reps", str(args.reps),
             "--warmup", "1", "--tau", str(args.tau), "--device", "cpu", "--quiet"]
    status = bench_main(bench + ["--out", args.out])
    if status == 0:
        print(conclusion(Path(args.out), args))
    return status


def conclusion(out: Path, args) -> str:
    """One line: what was compared, the speed and memory ratios, and where the files are."""
    import json

    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text()) if r.get("status") == "ok"}
    fused, naive = rows.get("fastpmd-torch"), rows.get("naive")
    files = f"files in {out}/ (results.md, ms_per_token.png, peak_mem.png)"
    if not fused or not naive:
        return f"fastpmd demo: a method did not run (see results.md); {files}"
    return (f"fastpmd demo: fused PMD-mean loss vs naive PyTorch (N={args.tokens}, H={args.hidden}, V={args.vocab}, "
            f"fp32, CPU): {naive['ms_per_token'] / fused['ms_per_token']:.2f}x the speed "
            f"({fused['ms_per_token']:.3g} vs {naive['ms_per_token']:.3g} ms/token), "
            f"{_memory(fused['peak_mem_mb'], naive['peak_mem_mb'])}; {files}")


def _memory(fused_mb: float, naive_mb: float) -> str:
    if fused_mb <= 0:  # below the measurement's resolution at tiny shapes
        return f"peak extra memory under 1 MB vs {naive_mb:.0f} MB"
    return f"{naive_mb / fused_mb:.1f}x less peak memory ({fused_mb:.0f} vs {naive_mb:.0f} MB)"


if __name__ == "__main__":
    raise SystemExit(main())
