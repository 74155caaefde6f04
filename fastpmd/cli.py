"""The `fastpmd` command: one entry point over the library's jobs (each imported only when asked for)."""
from __future__ import annotations

import importlib
import sys

# name -> (module, what it does[, the extra whose packages it needs])
COMMANDS = {
    "demo": ("fastpmd.demo", "CPU demo: fused PMD loss against the naive path (values, time, memory)"),
    "bench": ("fastpmd.bench.cli", "ms/token and memory of the loss against baseline losses"),
    "train": ("fastpmd.train.cli", "RL trainer (PMD-mean and baselines), e.g. --preset tiny-arith"),
    "study": ("fastpmd.train.study", "stability grid on the CPU task (losses x staleness x group size x seeds)"),
    "kernels-report": ("fastpmd.kernels.report", "compile every Triton kernel for sm_80/90/100/120; registers, spills"),
    "theory-figures": ("fastpmd.theory.figures", "the paper's toy figures (Lambert-W update) as PNGs", "theory"),
}


def usage() -> str:
    lines = ["usage: fastpmd <command> [options]   (fastpmd <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<16} {entry[1]}" for name, entry in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastpmd: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    entry = COMMANDS[name]
    try:
        module = importlib.import_module(entry[0])
    except ModuleNotFoundError as e:
        if len(entry) < 3 or (e.name or "").split(".")[0] == "fastpmd":
            raise
        print(f"fastpmd {name}: error: needs the {(e.name or '?').split('.')[0]} package "
              f"(pip install 'fastpmd[{entry[2]}]')", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
