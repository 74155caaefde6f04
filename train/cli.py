"""`fastpmd train ...` / `python -m fastpmd.train ...` / `torchrun ... -m fastpmd.train ...`: parse a preset plus
overrides into a TrainConfig, validate it (before any work), then run the Trainer.

Exit status: 0 done; 2 a user error (one line `fastpmd train: error: config FIELD: ...` on stderr, before any
model is built: bad values and types, a missing device, backend, engine, data file or model directory, an
unwritable or already used --out); 1 a failure during training (e.g. a non-finite loss or gradient norm, named
with its step; a disk that fills up during a checkpoint save, named with its path and free space); 128 + signal
number (143 SIGTERM, 130 SIGINT) when stopped by a signal after saving a checkpoint of the last completed step
(see fastpmd.train.faults).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

from fastpmd._cli import ArgumentParser, check_out_dir

from .config import TrainConfig, field_types, type_error, validate
from .presets import PRESETS, get_preset
from .rollout import ENGINES

# flag -> (config path, type); every other field is reachable with --set section.field=value
FLAGS = {
    "--out": ("run.out", str), "--max-steps": ("run.max_steps", int), "--save-every": ("run.save_every", int),
    "--eval-every": ("run.eval_every", int), "--device": ("run.device", str), "--threads": ("run.threads", int),
    "--model": ("model.name_or_path", str), "--param-dtype": ("model.param_dtype", str), "--seed": ("model.seed", int),
    "--data": ("data.path", str), "--eval-data": ("data.eval_path", str),
    "--engine": ("rollout.engine", str), "--prompts-per-step": ("rollout.prompts_per_step", int),
    "--group-size": ("rollout.group_size", int), "--temperature": ("rollout.temperature", float),
    "--max-new-tokens": ("rollout.max_new_tokens", int), "--eval-n": ("rollout.eval_n", int),
    "--loss": ("loss.name", str), "--tau": ("loss.tau", float), "--estimator": ("loss.estimator", str),
    "--partition-tau": ("loss.partition_tau", float), "--tau-schedule": ("loss.tau_schedule", str),
    "--backend": ("loss.backend", str), "--chunk-size": ("loss.chunk_size", int),
    "--lr": ("optim.lr", float), "--lr-warmup-steps": ("optim.warmup_steps", int),
    "--mini-batches": ("optim.mini_batches", int), "--micro-batch-seqs": ("optim.micro_batch_seqs", int),
    "--warmup-steps": ("warmup.steps", int),
}
SWITCHES = {"--resume": ("run.resume", True), "--resume-unverified": ("run.resume_unverified", True),
            "--tensorboard": ("run.tensorboard", True),
            "--no-plots": ("run.plots", False), "--no-progress": ("run.progress", False),
            "--no-export": ("run.export_hf", False), "--no-activation-checkpointing": ("model.activation_checkpointing",
                                                                                       False)}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastpmd train", description="RL post-training with PMD-mean (and baselines).")
    p.add_argument("--preset", default="tiny-arith", help=f"one of {sorted(PRESETS)} (default tiny-arith)")
    for flag, (path, typ) in FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=f"sets {path}")
    for flag, (path, value) in SWITCHES.items():
        p.add_argument(flag, action="store_true", help=f"sets {path}={value}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any other field, e.g. --set optim.weight_decay=0.1 (Python literal or bare string)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory plan of this config and exit: 0 "
                   "if the update, weight sync and rollout each fit under 90%% of the GPU, else 2 naming a field")
    p.add_argument("--gpus", type=int, default=None, help="with --plan: GPU count (default parallel.gpus)")
    p.add_argument("--gpu-gb", type=float, default=None, help="with --plan: GB per GPU (default parallel.gpu_gb)")
    return p


def memory_plan(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """`--plan`: the plan of exactly this config on stdout; exit 2 with one line naming a field if it does not fit."""
    from .config_plan import check, plan, spec_for

    gpus = args.gpus if args.gpus is not None else cfg.parallel.gpus
    if gpus < 1:
        raise ValueError("config parallel.gpus: --plan needs a GPU count (--gpus N; this preset plans none)")
    if args.gpu_gb is not None:
        set_field(cfg, "parallel.gpu_gb", args.gpu_gb)
    validate(cfg, world_size=gpus)
    vocab = None
    if cfg.model.arch:
        from .task.tokenizer import make_tokenizer

        vocab = make_tokenizer(cfg).vocab_size
    spec = spec_for(cfg, vocab)
    print(plan(cfg, gpus, cfg.parallel.gpu_gb, spec).render())
    check(cfg, gpus, cfg.parallel.gpu_gb, spec)
    return 0


def parse_value(path: str, value, allowed: tuple):
    """A --set text (a Python literal, or a bare string) or a flag's value, checked against the field's type:
    `optim.lr=abc` and `run.max_steps=2.5` are errors; a str field keeps the text as written; ints become
    floats in float fields; lists become tuples in tuple fields."""
    if isinstance(value, str):
        raw = value
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass  # a bare string
        if str in allowed and not isinstance(value, str) and not (value is None and type(None) in allowed):
            value = raw  # model.name_or_path=123 is the text "123"
    if tuple in allowed and isinstance(value, list):
        value = tuple(value)
    if (err := type_error(value, allowed)) is not None:
        raise ValueError(f"config {path}: {err}")
    if float in allowed and int not in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def set_field(cfg: TrainConfig, path: str, value, pending: dict | None = None) -> None:
    """Set section.field to a type-checked value. Frozen sections (the library's own configs: fastpmd.LossConfig,
    rewards.RewardConfig) collect their values in `pending` (section -> {field: value}) for `apply_pending`,
    which rebuilds each once, so that fields validated together (a loss and its estimator) are set together."""
    section, _, name = path.partition(".")
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub) or name not in {f.name for f in dataclasses.fields(sub)}:
        raise ValueError(f"--set: unknown config field {path!r}")
    value = parse_value(path, value, field_types(sub)[name])
    if sub.__dataclass_params__.frozen:
        if pending is None:
            apply_pending(cfg, {section: {name: value}})
        else:
            pending.setdefault(section, {})[name] = value
    else:
        setattr(sub, name, value)


def apply_pending(cfg: TrainConfig, pending: dict) -> None:
    """Rebuild each frozen section with its collected values; its own validation names the field
    ("config loss.tau: tau must be ...")."""
    for section, values in pending.items():
        sub = getattr(cfg, section)
        try:
            setattr(cfg, section, dataclasses.replace(sub, **values))
        except ValueError as e:
            field = str(e).split()[0]
            names = {f.name for f in dataclasses.fields(sub)}
            raise ValueError(f"config {section}.{field}: {e}" if field in names else f"config {section}: {e}") from None


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))  # "org/name" is a hub id


def check_out(out: Path, resume: bool) -> None:
    """run.out is (or can be created as) a writable directory and holds no run unless resuming."""
    check_out_dir("config run.out", out)
    ckpt = out / "checkpoints"
    if not resume and ckpt.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in ckpt.iterdir()):
        raise ValueError(f"config run.out: {out} already holds a run; pass --resume to continue it or choose another "
                         "--out")


def check_arch(m) -> None:
    """A tiny arch's overrides: known fields of its HF config, positive sizes, heads that divide."""
    from .model import tiny_config

    try:
        default = tiny_config(m.arch, 64, 0, 1, 2)
        hf = tiny_config(m.arch, 64, 0, 1, 2, **m.arch_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config model.arch_kwargs: {e}") from None
    unknown = sorted(k for k in m.arch_kwargs if not hasattr(default, k))
    if unknown:
        raise ValueError(f"config model.arch_kwargs: unknown field(s) {unknown} of {type(default).__name__}")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "num_hidden_layers"):
        v = getattr(hf, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config model.arch_kwargs: {k} must be a positive int, got {v!r}")
    if hf.num_attention_heads % hf.num_key_value_heads:
        raise ValueError("config model.arch_kwargs: num_attention_heads must be a multiple of num_key_value_heads")
    if getattr(hf, "head_dim", None) is None and hf.hidden_size % hf.num_attention_heads:
        raise ValueError("config model.arch_kwargs: hidden_size must be a multiple of num_attention_heads")


def preflight(cfg: TrainConfig) -> None:
    """Checks of the environment, after validate() and before any process group or model: the device, the
    loss backend, the rollout engine, data files, the model/tokenizer directory, the arithmetic task's options,
    the output directory and the loss configuration. Raises ValueError naming the field."""
    import importlib.util

    import torch

    from fastpmd.dispatch import resolve_backend

    from .task.arithmetic import ArithmeticTask
    from .task.data import load_problems
    from .task.tokenizer import char_tokenizer_source

    run, data, model, rollout = cfg.run, cfg.data, cfg.model, cfg.rollout
    cuda = torch.cuda.is_available()
    if run.device == "cuda" and not cuda:
        raise ValueError("config run.device: 'cuda' requested but torch.cuda.is_available() is False")
    device = torch.device("cuda" if cuda and run.device != "cpu" else "cpu")
    try:
        resolve_backend(cfg.loss.backend, device)
    except ValueError as e:
        raise ValueError(f"config loss.backend: {e}") from None
    engine = ENGINES[rollout.engine]
    if engine.package and importlib.util.find_spec(engine.package) is None:
        raise ValueError(f"config rollout.engine: {rollout.engine!r} needs the {engine.package} package "
                         f"({engine.install}), or --engine hf")
    for name, path in (("data.path", data.path), ("data.eval_path", data.eval_path)):
        if data.task == "math" and path and not path.startswith("hf:"):
            if not Path(path).is_file():
                raise ValueError(f"config {name}: no such file {path!r} (prefix hub data sets with 'hf:')")
            try:  # a local file is read twice (here and by the trainer): cheap next to a run
                problems = load_problems(path, prompt_key=data.prompt_key or None,
                                         answer_key=data.answer_key or None)
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise ValueError(f"config {name}: cannot read problems from {path!r}: {e}") from None
            if not problems:
                raise ValueError(f"config {name}: no problems in {path!r} (an empty file?)")
    local_dir = Path(model.name_or_path).expanduser()
    if model.name_or_path and _looks_local(model.name_or_path) and local_dir.is_dir() and not (
            local_dir / "config.json").is_file():
        raise ValueError(f"config model.name_or_path: {model.name_or_path!r} has no config.json (not a HF model "
                         "directory)")
    if model.attn_implementation == "flash_attention_2" and (device.type != "cuda" or
                                                         importlib.util.find_spec("flash_attn") is None):
        raise ValueError("config model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package")
    if model.arch:
        check_arch(model)
        if not model.tokenizer:
            raise ValueError("config model.tokenizer: a tiny arch needs a tokenizer ('char' or a directory)")
    if data.task != "math" and (data.path or data.eval_path):
        raise ValueError(f"config data.path/data.eval_path: task {data.task!r} reads no file (set data.task=math)")
    if char_tokenizer_source(model) is not None and (data.task != "arithmetic" or data.chat_template):
        raise ValueError(f"config model.tokenizer: the char tokenizer ({char_tokenizer_source(model)!r}) encodes only "
                         "the arithmetic task's digits and signs (no chat template); for your own data use --model "
                         "DIR (its tokenizer) or model.tokenizer=DIR")
    for name, path in (("model.name_or_path", model.name_or_path), ("model.tokenizer", model.tokenizer)):
        if path and path != "char" and _looks_local(path) and not Path(path).expanduser().exists():
            raise ValueError(f"config {name}: no such directory {path!r}")
    if data.task == "arithmetic":
        try:
            ArithmeticTask(model.seed, **data.arith_kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config data.arith_kwargs: {e}") from None
    check_out(Path(run.out), run.resume)
    from .task.reward_functions import RewardFunctions

    RewardFunctions(cfg.reward, "arith" if data.task == "arithmetic" else cfg.reward.style)  # imports them
    from .trainer import loss_config

    try:
        loss_config(cfg)
    except ValueError as e:
        raise ValueError(f"config loss: {e}") from None


def user_model_and_data(cfg: TrainConfig, given: set) -> None:
    """The user's model and data replace the preset's task-specific parts that they did not set themselves:
    with model.name_or_path given, the preset's tiny arch (and its overrides) and tokenizer; with data.path given,
    the task becomes the file's ("math") and the arithmetic options go; then a warm-up the task cannot run
    (arithmetic only) or that was meant for the preset's tiny model is switched off."""
    m, d = cfg.model, cfg.data
    if "model.name_or_path" in given and m.name_or_path:
        for name, empty in (("arch", ""), ("arch_kwargs", {}), ("tokenizer", "")):
            if f"model.{name}" not in given:
                setattr(m, name, empty)
    if "data.path" in given and d.path and "data.task" not in given:
        d.task = "math"
        if "data.arith_kwargs" not in given:
            d.arith_kwargs = {}
    if "warmup.steps" not in given and (d.task != "arithmetic" or "model.name_or_path" in given):
        cfg.warmup.steps = 0


def build_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    cfg = get_preset(args.preset)
    pending: dict = {}
    given: set = set()  # the config paths the command line sets
    for flag, (path, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            set_field(cfg, path, value, pending)
            given.add(path)
    for flag, (path, value) in SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            set_field(cfg, path, value, pending)
            given.add(path)
    for item in args.set:
        path, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
        set_field(cfg, path.strip(), value.strip(), pending)
        given.add(path.strip())
    apply_pending(cfg, pending)
    user_model_and_data(cfg, given)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastpmd train`; returns the exit status."""
    try:
        cfg, args = build_config(argv)
        validate(cfg)  # world-size-independent checks before any process group or model exists
        if args.plan:
            return memory_plan(cfg, args)
        if not args.print_config:
            preflight(cfg)
    except ValueError as e:
        return _error(e, 2)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.run.resume and (done := _finished_step(cfg)) is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"fastpmd train: nothing to do: {cfg.run.out} already finished step {done} of run.max_steps="
                  f"{cfg.run.max_steps} (raise --max-steps to train on)", file=sys.stderr)
        return 0
    from .checkpoint import CheckpointError, DiskFullError
    from .faults import NonFiniteError, Stopped
    from .task.reward_functions import RewardError
    from .distributed import init_distributed, shutdown_distributed
    from .trainer import Trainer

    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    link = None
    if cfg.rollout.mode == "async":  # train/async_rollout.py: the inference ranks generate in serve() and leave
        from .async_link import init_async
        from .async_rollout import AsyncTrainer, serve

        try:
            link, d = init_async(cfg)
        except ValueError as e:  # not launched with enough processes
            return _error(e, 2)
        if d is None:
            return serve(cfg, link)
    else:
        d = init_distributed(cfg.run.device, cfg.run.timeout_min, cfg.model.cpu_offload)
    trainer = None
    try:
        try:
            # what preflight cannot see (e.g. a data file with no usable problem)
            trainer = Trainer(cfg, d) if link is None else AsyncTrainer(cfg, d, link)
        except ValueError as e:
            return _error(e, 2)
        if d.is_main:
            Path(cfg.run.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run.out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        trainer.fit()
    except CheckpointError as e:  # --resume: checkpoints exist but none verifies
        return _error(e, 2)
    except (NonFiniteError, RewardError, DiskFullError) as e:
        return _error(e, 1)
    except Stopped as e:
        if d.is_main:
            print(f"fastpmd train: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        engine = getattr(trainer, "engine", None)
        if hasattr(engine, "close"):  # vLLM tears down its groups, then the default one: before ours
            engine.close()
        trainer = link = engine = None  # FSDP's modules and the async links go before shutdown_distributed
        gc.collect()
        shutdown_distributed()
    return 0


def _finished_step(cfg: TrainConfig) -> int | None:
    """The newest verified checkpoint's step when it already reached run.max_steps, else None."""
    from .checkpoint import CheckpointError, find_checkpoint

    try:
        step = find_checkpoint(cfg.run.out, unverified_ok=cfg.run.resume_unverified)[0]
    except CheckpointError:  # none loads: the trainer reports it (exit 2) as for any resume
        return None
    return step if step is not None and step >= cfg.run.max_steps else None


def _error(e: Exception, status: int) -> int:
    print(f"fastpmd train: error: {e}", file=sys.stderr)
    return status
