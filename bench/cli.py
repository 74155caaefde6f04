"""`fastpmd bench`: hidden states -> policy loss, forward+backward, across methods, losses and shapes.

Examples:
    fastpmd bench --preset cpu-small --out out/bench-cpu
    fastpmd bench --preset core-check --out out/core-check
    fastpmd bench --preset qwen2.5-7b --tokens 4096 16384 --device cuda --out out/bench-qwen7b
    fastpmd bench --hidden 1024 --vocab 65536 --tokens 2048 4096 --methods naive fastpmd-torch --losses pmd-mean
(`python -m fastpmd.bench ...` is the same command.)
"""
from __future__ import annotations

import argparse
import sys

import torch

from fastpmd._checks import check_tau
from fastpmd._cli import ArgumentParser, check_out_dir

from .methods import METHODS
from .presets import DTYPES, LOSSES, MASKS, PRESET_NAMES, preset, shape_for_tokens


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastpmd bench", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="named shapes (default cpu-small, or a custom shape when --hidden/--vocab are given)")
    p.add_argument("--tokens", type=int, nargs="+", default=(), help="N values (rows = B*T) for model/custom presets")
    p.add_argument("--hidden", type=int, default=None, help="custom shape: hidden size H")
    p.add_argument("--vocab", type=int, default=None, help="custom shape: vocabulary V")
    p.add_argument("--seq-len", type=int, default=None, help="custom shape: positions per sequence T")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 (CPU presets), bfloat16 (models)")
    p.add_argument("--mask", choices=MASKS, default=None, help="ragged (response lengths in [T/4, T]) or full")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None, help="default: all")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per method (compile happens here)")
    p.add_argument("--reps", type=int, default=None, help="interleaved timed repetitions per method")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tau", type=float, default=0.01, help="PMD temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory measurements")
    p.add_argument("--no-floor", action="store_true", help="skip the matmul-floor timing")
    p.add_argument("--out", default=None, help="directory for results.json, meta.json, results.md and PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# core-check runs a fixed protocol (shapes, methods, repetitions): these options would be silently ignored
CORE_FIXED = ("tokens", "dtype", "mask", "methods", "losses", "warmup", "reps", "seq_len")


def pick_device(text: str | None) -> torch.device:
    """--device: cpu or cuda[:i], and available here (default: cuda when available)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _shapes_and_preset(args):
    bad = [n for n in args.tokens if n < 1]
    if bad:
        raise ValueError(f"--tokens must be >= 1, got {bad[0]}")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.preset == "core-check":
        given = [f"--{k.replace('_', '-')}" for k in CORE_FIXED if getattr(args, k) not in (None, ())]
        if given:
            raise ValueError(f"{given[0]}: core-check has a fixed protocol (N=2048 timing, N=4096 memory); "
                             "drop it, or use a model preset or --hidden/--vocab")
    if args.hidden is not None or args.vocab is not None:
        if args.preset is not None:
            raise ValueError("--preset and --hidden/--vocab are exclusive")
        if args.hidden is None or args.vocab is None or not args.tokens:
            raise ValueError("a custom shape needs --hidden, --vocab and --tokens")
        from .presets import Preset

        shapes = tuple(shape_for_tokens(n, args.hidden, args.vocab, dtype=args.dtype or "float32",
                                        mask=args.mask or "ragged", seq_len=args.seq_len) for n in args.tokens)
        return Preset("custom", shapes)
    return preset(args.preset or "cpu-small", tuple(args.tokens), args.dtype, args.mask)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastpmd bench`; returns the exit status (core-check: 1 when a check fails)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from .runner import BenchConfig, run

    try:
        if args.out:
            check_out_dir("--out", args.out)
        check_tau(args.tau, "--tau")
        pre = _shapes_and_preset(args)
        device = pick_device(args.device)
        cfg = BenchConfig(shapes=pre.shapes, methods=tuple(args.methods or METHODS),
                          losses=tuple(args.losses or pre.losses),
                          warmup=pre.warmup if args.warmup is None else args.warmup,
                          reps=pre.reps if args.reps is None else args.reps, device=str(device),
                          memory=not args.no_memory, floor=not args.no_floor, seed=args.seed, tau=args.tau,
                          quiet=args.quiet)
    except ValueError as exc:
        print(f"fastpmd bench: error: {exc}", file=sys.stderr)
        return 2
    from . import report

    meta = report.machine_info(device, argv)
    meta["preset"] = pre.name
    if pre.name == "core-check":  # fixed methods, shapes and repetitions: the targets' own protocol
        from .core_check import run_core_check

        rows, checks = run_core_check(pre, device, memory=not args.no_memory, quiet=args.quiet)
        meta["checks"] = checks
        status = 1 if any(c["verdict"] == "FAIL" for c in checks) else 0
    else:
        rows = run(cfg)
        status = 0
    if args.out:  # results first: nothing measured is lost if the report below fails
        files = report.write(rows, meta, args.out)
        print(f"fastpmd bench: wrote {', '.join(str(p) for p in files.values())}", file=sys.stderr)
    if pre.name != "core-check" or not args.quiet:
        print(report.markdown(rows, meta))
    return status


if __name__ == "__main__":
    sys.exit(main())
