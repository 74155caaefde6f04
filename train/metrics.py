"""Metrics: one JSON object per step in OUT/metrics.jsonl (plus eval rows), a tqdm bar, optional TensorBoard and
Weights & Biases (`run.wandb_project`), peak memory (nvidia-ml-py on CUDA, max RSS on CPU), and PNG training curves
at the end. Rank 0 writes; others no-op.

Rows: {"kind": "train", "step": 3, "reward_mean": ..., ...} and {"kind": "eval", "step": 3, "avg@k": ...}.
On resume `truncate_after(step)` drops rows written after the checkpoint, so every step appears exactly once.
"""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch


def peak_memory(device: torch.device) -> dict:
    """Peak memory in GiB: torch's allocator peak and (when nvidia-ml-py is present) the device's used memory."""
    out = {}
    if device.type == "cuda":
        out["mem_peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["mem_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            out["gpu_mem_used_gib"] = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30
        except Exception:  # nvidia-ml-py missing or no NVML: allocator numbers only
            pass
    else:
        out["mem_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


class MetricsLogger:
    def __init__(self, out: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = False, config=None):
        """config: the run's TrainConfig; with run.wandb_project set, a W&B run receives it and every row."""
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="rl", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tb"))
        if config is not None and config.run.wandb_project:
            import wandb

            r = config.run
            self.wandb = wandb.init(project=r.wandb_project, entity=r.wandb_entity or None, name=r.wandb_name or None,
                                    tags=list(r.wandb_tags) or None, config=config.to_dict(), dir=str(out))

    def truncate_after(self, step: int) -> None:
        """Keep only rows with row['step'] <= step (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" else v)
               for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
        if self.wandb is not None:  # "train/reward_mean", "eval/avg@16", ... at the row's step
            kind = row.get("kind", "train")
            self.wandb.log({f"{kind}/{k}": v for k, v in row.items() if isinstance(v, float)}, step=row["step"])
        if self.bar is not None and row.get("kind") == "train":
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3g}")
        elif self.bar is not None:
            self.bar.write(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(out: str | Path) -> Path | None:
    """OUT/curves.png: reward, eval accuracy, loss, entropy, log-ratio, grad norm and throughput against step."""
    rows = read_rows(Path(out) / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "reward (batch mean)"), ("eval", "held-out accuracy"), ("loss", "loss"),
              ("entropy", "entropy (nats/token)"), ("logratio_mean", "log-ratio Delta (mean, min)"),
              ("grad_norm", "grad norm"), ("response_len_mean", "response length"), ("tokens_per_s", "update tokens/s")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    steps = [r["step"] for r in train]
    for ax, (key, title) in zip(axes.flat, panels):
        if key == "eval":
            for metric in sorted({k for r in evals for k in r if k.startswith(("avg@", "pass@1"))}):
                pts = [(r["step"], r[metric]) for r in evals if metric in r]
                ax.plot(*zip(*pts), marker="o", label=metric)
            if evals:
                ax.legend()
        else:
            ax.plot(steps, [r.get(key, float("nan")) for r in train])
            if key == "logratio_mean":
                ax.plot(steps, [r.get("logratio_min", float("nan")) for r in train], alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
