"""Results out: results.json (a list of rows), meta.json (machine and versions), results.md (tables), PNG plots.

A row is one (method, loss, shape). Skipped rows keep their reason and carry None figures.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

REQUIRED_KEYS = ("method", "loss", "tokens", "hidden", "vocab", "dtype", "device", "ms_per_token", "peak_mem_mb")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, argv: list[str] | None = None) -> dict:
    """Machine, versions and command line of this run."""
    info = {
        "command": "fastpmd bench " + " ".join(argv or []),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {d: _version(d) for d in ("fastpmd", "torch", "triton", "liger-kernel", "cut-cross-entropy",
                                              "nvidia-ml-py", "numpy")},
    }
    return info


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def markdown(rows: list[dict], meta: dict) -> str:
    """One table per shape: methods x losses with ms/token, spread, memory, TFLOP/s, ratio to the floor."""
    out = ["# fastpmd bench", "", f"Command: `{meta.get('command', '')}`", "",
           f"Machine: {meta.get('cpu')} ({meta.get('cpu_count')} CPUs, {meta.get('torch_threads')} torch threads)"
           + (f", GPU {meta['gpu']}" if meta.get("gpu") else "") + f"; device {meta.get('device')}; "
           + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if v), ""]
    shapes = []
    for r in rows:
        key = (r["tokens"], r.get("rows"), r["hidden"], r["vocab"], r["dtype"], r.get("mask"))
        if key not in shapes:
            shapes.append(key)
    skipped = []
    for key in shapes:
        tokens, nrows, h, v, dtype, mask = key
        out += [f"## N={nrows} rows ({tokens} trained tokens), H={h}, V={v}, {dtype}, mask={mask}", "",
                "| method | loss | ms/token | median ms | IQR ms | min-max ms | peak extra MB | TFLOP/s | x floor |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["tokens"], r.get("rows"), r["hidden"], r["vocab"], r["dtype"], r.get("mask")) != key:
                continue
            if r.get("status") == "skipped":
                skipped.append(f"- {r['method']} / {r['loss']}: {r['reason']}")
                continue
            iqr = f"{_fmt(r['ms_q1'])}-{_fmt(r['ms_q3'])}" if r.get("ms_q1") is not None else "-"
            mm = f"{_fmt(r['ms_min'])}-{_fmt(r.get('ms_max'))}" if r.get("ms_min") is not None else "-"
            out.append(f"| {r['method']} | {r['loss']} | {_fmt(r.get('ms_per_token'))} | {_fmt(r.get('ms_median'))} | {iqr} "
                       f"| {mm} | {_fmt(r.get('peak_mem_mb'))} | {_fmt(r.get('tflops'))} | {_fmt(r.get('ratio_to_floor'))} |")
        out.append("")
    notes = sorted({f"- {r['method']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        out += ["Methods:", *notes, ""]
    if skipped:
        out += ["Skipped:", *dict.fromkeys(skipped), ""]
    out += ["ms/token: median time of one forward+backward divided by trained tokens. Peak extra MB: high-water "
            "mark of one step minus the baseline with inputs allocated (gradients included). x floor: median "
            "time over the three plain matmuls (h@W.T, G@W, G.T@h) of the same trained rows, timed in the same "
            "round-robin. TFLOP/s counts the flops each method really does (see bench/README.md).", ""]
    return "\n".join(out)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """ms/token and peak memory against N (trained tokens), one panel per loss, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fastpmd[plots]')", file=sys.stderr)
        return []
    ok = [r for r in rows if r.get("status") == "ok"]
    losses = [loss for loss in dict.fromkeys(r["loss"] for r in ok)]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in every panel
    paths = []
    for field, label, name in (("ms_per_token", "ms / token", "ms_per_token.png"),
                               ("peak_mem_mb", "peak extra memory (MB)", "peak_mem.png")):
        if not losses or not any(r.get(field) for r in ok):
            continue
        fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.6), squeeze=False)
        for ax, loss in zip(axes[0], losses):
            for method in methods:
                pts = sorted((r["tokens"], r[field]) for r in ok
                             if r["loss"] == loss and r["method"] == method and r.get(field))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method, color=colors[method],
                            linestyle="--" if method == "matmul-floor" else "-")
                    if len(pts) <= 2:  # a few points (the demo): print each value beside its marker
                        for x, y in pts:
                            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(6, 0),
                                        va="center", fontsize=7, color=colors[method])
            ax.set_xscale("log", base=2)
            _log_axis_with_labelled_ends(ax, [r[field] for r in ok if r["loss"] == loss and r.get(field)])
            ax.set_title(loss)
            ax.set_xlabel("N (trained tokens)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _log_axis_with_labelled_ends(ax, values: list[float]) -> None:
    """Log y axis whose limits are labelled 1-2-5 ticks at or beyond the smallest and largest value, so every
    point sits between two labelled ticks (matplotlib's default leaves a low point under the lowest label)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    def tick(v: float, up: bool) -> float:
        k = math.floor(math.log10(v))
        cands = [m * 10.0 ** e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
        return min(c for c in cands if c >= v) if up else max(c for c in cands if c <= v)

    lo, hi = tick(min(values), up=False), tick(max(values), up=True)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.08, hi * 1.08)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)


def write(rows: list[dict], meta: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, meta.json, results.md and the plots into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json", "meta": out / "meta.json", "markdown": out / "results.md"}
    files["results"].write_text(json.dumps(rows, indent=1))
    files["meta"].write_text(json.dumps(meta, indent=1))
    files["markdown"].write_text(markdown(rows, meta) + _checks_md(meta))
    for p in plot(rows, out):
        files[p.stem] = p
    return files


def _checks_md(meta: dict) -> str:
    """core-check's PASS/FAIL lines, when the run made them."""
    checks = meta.get("checks") or []
    return "".join(["\n## Checks\n\n", *(f"    {c['line']}\n" for c in checks)]) if checks else ""
