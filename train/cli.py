"""`fastpmd train ...` / `python -m fastpmd.train ...` / `torchrun ... -m fastpmd.train ...`: parse a preset plus
overrides into a TrainConfig, validate it (before any work), then run the Trainer."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

from .config import TrainConfig, validate
from .presets import PRESETS, get_preset

# flag -> (config path, type); every other field is reachable with --set section.field=value
FLAGS = {
    "--out": ("run.out", str), "--max-steps": ("run.max_steps", int), "--save-every": ("run.save_every", int),
    "--eval-every": ("run.eval_every", int), "--device": ("run.device", str), "--threads": ("run.threads", int),
    "--model": ("model.name_or_path", str), "--param-dtype": ("model.param_dtype", str), "--seed": ("model.seed", int),
    "--data": ("data.path", str), "--eval-data": ("data.eval_path", str),
    "--engine": ("rollout.engine", str), "--prompts-per-step": ("rollout.prompts_per_step", int),
    "--group-size": ("rollout.n", int), "--temperature": ("rollout.temperature", float),
    "--max-new-tokens": ("rollout.max_new_tokens", int), "--eval-n": ("rollout.eval_n", int),
    "--loss": ("loss.name", str), "--tau": ("loss.tau", float), "--estimator": ("loss.estimator", str),
    "--partition-tau": ("loss.partition_tau", float), "--tau-schedule": ("loss.tau_schedule", str),
    "--backend": ("loss.backend", str), "--chunk-size": ("loss.chunk_size", int),
    "--lr": ("optim.lr", float), "--lr-warmup-steps": ("optim.warmup_steps", int),
    "--mini-batches": ("optim.mini_batches", int), "--micro-batch-seqs": ("optim.micro_batch_seqs", int),
    "--warmup-steps": ("warmup.steps", int),
}
SWITCHES = {"--resume": ("run.resume", True), "--tensorboard": ("run.tensorboard", True),
            "--no-plots": ("run.plots", False), "--no-progress": ("run.progress", False),
            "--no-export": ("run.export_hf", False), "--no-activation-checkpointing": ("model.activation_checkpointing",
                                                                                       False)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpmd train", description="RL post-training with PMD-mean (and baselines).")
    p.add_argument("--preset", default="tiny-arith", help=f"one of {sorted(PRESETS)} (default tiny-arith)")
    for flag, (path, typ) in FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=f"sets {path}")
    for flag, (path, value) in SWITCHES.items():
        p.add_argument(flag, action="store_true", help=f"sets {path}={value}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other field, e.g. --set optim.weight_decay=0.1 (Python literal or bare string)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def set_field(cfg: TrainConfig, path: str, value) -> None:
    section, _, name = path.partition(".")
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub) or name not in {f.name for f in dataclasses.fields(sub)}:
        raise ValueError(f"--set: unknown config field {path!r}")
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string
    setattr(sub, name, value)


def build_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    cfg = get_preset(args.preset)
    for flag, (path, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            set_field(cfg, path, value)
    for flag, (path, value) in SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            set_field(cfg, path, value)
    for item in args.set:
        path, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
        set_field(cfg, path.strip(), value.strip())
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastpmd train`; returns the exit status."""
    try:
        cfg, args = build_config(argv)
        validate(cfg)  # world-size-independent checks before any process group or model exists
    except ValueError as e:
        print(f"fastpmd train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .parallelize import init_distributed, shutdown_distributed
    from .trainer import Trainer

    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    d = init_distributed(cfg.run.device)
    try:
        trainer = Trainer(cfg, d)
        if d.is_main:
            Path(cfg.run.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run.out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        trainer.fit()
    finally:
        shutdown_distributed()
    return 0
