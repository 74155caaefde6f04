"""The memory plan of one TrainConfig on G GPUs of M GB: per-GPU peak of the update, the rollout and the
weight-sync moment, each part named (`fastpmd train ... --plan`; the trainer runs `check` on CUDA before it builds
the model; docs/memory_plan.md is `python -m fastpmd.train.memory_plan`).

The moments (train/memory_plan.py has the arithmetic of each part):
- update: FSDP2 forward/backward/AdamW over micro-batches of T tokens (vLLM asleep at level 2: it holds nothing);
- old log-probs: the no-gradient pass over micro-batches of `optim.logprob_micro_batch_tokens` (0: T) tokens;
- sync: the step's weights go to the engine one FSDP unit at a time, gathered in the compute dtype
  (`Trainer._sync_weights`), at the start of the rollout phase: with `model.offload_during_rollout` the AdamW
  state is already in host memory; the engine's weights are awake, its KV cache not yet;
- rollout: the engine generates; vLLM holds its share (`rollout.gpu_memory_utilization` x GPU: weights 1/TP, a
  workspace allowance and a fixed KV budget, `vllm_kv_cache_bytes`), the trainer what it kept on the GPU.
A moment fits at <= 90% of the GPU. `check` raises one ValueError naming a field to change and a value that fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .memory_plan import FIT, GB, KNOWN_MODELS, Spec, logprob_plan, rollout_plan, spec_from_hf_config, update_plan

VLLM_WORKSPACE_GB = 2.0  # an allowance for vLLM's activations and CUDA graphs inside its share (not measured)


@dataclass
class Plan:
    """GB per GPU of each named part, per moment ("update", "sync", "rollout"), and the facts they rest on."""

    gpus: int
    gpu_gb: float
    spec: Spec
    tokens: int
    shard: int  # GPUs one copy of the model is sharded over (gpus / parallel.dp_replicate)
    moments: dict = field(default_factory=dict)  # moment -> {part: GB}
    kv_sequences: float = 0.0  # full-length sequences the vLLM KV budget holds (vLLM engine only)

    @property
    def line(self) -> float:
        return FIT * self.gpu_gb

    def peak(self, moment: str) -> float:
        return sum(self.moments[moment].values())

    def render(self) -> str:
        lines = [f"memory plan: {self.spec.name}, {self.spec.total_params() / 1e9:.2f}B parameters, {self.gpus} GPUs "
                 f"x {self.gpu_gb:g} GB, sharded over {self.shard} (fits at <= {self.line:.1f} GB), {self.tokens} "
                 "tokens per micro-batch"]
        for moment, parts in self.moments.items():
            ok = "fits" if self.peak(moment) <= self.line else "DOES NOT FIT"
            lines.append(f"{moment}: {self.peak(moment):.1f} GB per GPU ({ok})")
            lines += [f"  {v:7.1f}  {k}" for k, v in parts.items()]
        if self.kv_sequences:
            lines.append(f"vLLM KV budget: {self.kv_sequences:.0f} full-length sequences per engine")
        return "\n".join(lines)


def spec_for(cfg, vocab_size: int | None = None) -> Spec:
    """The model shapes: a known preset model, a tiny arch (vocab from the tokenizer), or the model's config."""
    m = cfg.model
    if m.name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[m.name_or_path]
    if m.arch:
        from .model import tiny_config

        return spec_from_hf_config(tiny_config(m.arch, vocab_size or 256, 0, 1, 2, **m.arch_kwargs))
    import transformers

    try:
        return spec_from_hf_config(transformers.AutoConfig.from_pretrained(m.name_or_path))
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"config model.name_or_path: cannot read its config for the memory plan: {e}") from None


def micro_batch_tokens(cfg) -> int:
    """T: optim.micro_batch_tokens, or micro_batch_seqs full-length sequences."""
    o = cfg.optim
    return o.micro_batch_tokens or o.micro_batch_seqs * (cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)


def sync_bucket_bytes(spec: Spec) -> float:
    """The largest unit sent at once: one FSDP unit gathered in bf16 (a block, or the root) plus its copy handed to
    the engine (`Trainer._sync_weights` clones each tensor before the unit is resharded)."""
    return 2 * 2 * max(spec.block_params(), spec.root_params())


def vllm_kv_cache_bytes(spec: Spec, gpu_bytes: float, utilization: float, tp: int) -> int:
    """The fixed KV budget passed to vLLM (`kv_cache_memory_bytes`): its share less its bf16 weights (1/TP) and
    the workspace allowance; <= 0 means the share cannot hold the weights."""
    return int(utilization * gpu_bytes - 2 * spec.total_params() / tp - VLLM_WORKSPACE_GB * GB)


def plan(cfg, gpus: int, gpu_gb: float, spec: Spec | None = None) -> Plan:
    spec = spec or spec_for(cfg)
    m, r = cfg.model, cfg.rollout
    P, T = spec.total_params(), micro_batch_tokens(cfg)
    shard = gpus // cfg.parallel.dp_replicate  # FSDP shards over every GPU; HSDP within a replica group
    out = Plan(gpus, gpu_gb, spec, T, shard)
    up = update_plan(spec, shard, T, fused=cfg.loss.backend != "naive", cpu_offload=m.cpu_offload,
                     checkpointing=m.activation_checkpointing)
    state = [k for k in up if k.startswith(("params", "grads", "AdamW"))]
    moment = [k for k in up if k not in state and k not in ("backward", "optimizer step", "peak")]
    temp = [k for k in moment if k.startswith("foreach")]  # the optimizer step's moment: state + this
    work = [k for k in moment if k not in temp]  # the backward's: state + this
    out.moments["update"] = {k: up[k] for k in state + (work if up["backward"] >= up["optimizer step"] else temp)}
    lp_tokens = cfg.optim.logprob_micro_batch_tokens or T
    out.moments["old log-probs"] = logprob_plan(spec, shard, lp_tokens, cpu_offload=m.cpu_offload)
    on_gpu = not m.cpu_offload
    awake_adam = on_gpu and not m.offload_during_rollout
    max_len = cfg.data.max_prompt_len + r.max_new_tokens
    if r.engine == "vllm":
        tp = r.tensor_parallel_size
        engine_w = {"vLLM weights bf16 (1/TP)": 2 * P / tp / GB}
        kv = vllm_kv_cache_bytes(spec, gpu_gb * GB, r.gpu_memory_utilization, tp)
        gen = {**engine_w, "vLLM workspace (allowance)": VLLM_WORKSPACE_GB,
               "vLLM KV cache (fixed budget)": max(kv, 0) / GB}
        out.kv_sequences = max(kv, 0) / (spec.kv_bytes_per_token(tp) * max_len)
    else:  # the HF engine: a full bf16 copy (in host memory until it wakes), a dense KV cache for this rank
        seqs = r.prompts_per_step // gpus * r.group_size
        engine_w = {}
        gen = {"HF generation copy bf16": 2 * P / GB,
               "HF KV cache (this rank's sequences)": seqs * max_len * spec.kv_bytes_per_token() / GB}
    out.moments["sync"] = {
        "trainer: fp32 params (sharded)": on_gpu * 4 * P / shard / GB,
        "trainer: AdamW m, v (sharded)": awake_adam * 8 * P / shard / GB,
        **engine_w, "gathered bf16 unit + its copy": sync_bucket_bytes(spec) / GB}
    ro = rollout_plan(spec, shard, gpu_gb, offload_during_rollout=m.offload_during_rollout,
                      cpu_offload=m.cpu_offload)
    out.moments["rollout"] = {**gen, "trainer: fp32 params + AdamW m, v (sharded)":
                              ro["trainer: fp32 params + AdamW m, v (sharded)"]}
    for parts in out.moments.values():
        for k in [k for k, v in parts.items() if not v and k.startswith("trainer")]:
            del parts[k]
    return out


def _tp_choices(cfg, gpus: int, spec: Spec) -> list[int]:
    return [t for t in (1, 2, 4, 8) if gpus % t == 0 and spec.heads % t == 0]


def _fixes(cfg, gpus: int, gpu_gb: float, spec: Spec, moment: str):
    """(field, value, changed config) candidates for a moment that does not fit, most preferred first."""
    m, r = cfg.model, cfg.rollout

    def with_(section: str, **kw):
        c = replace(cfg)
        setattr(c, section, replace(getattr(cfg, section), **kw))
        return c

    if moment == "rollout" and r.engine == "vllm":
        for t in _tp_choices(cfg, gpus, spec):
            if t > r.tensor_parallel_size:
                yield "rollout.tensor_parallel_size", t, with_("rollout", tensor_parallel_size=t)
    if moment in ("rollout", "sync") and not m.cpu_offload and not m.offload_during_rollout:
        yield "model.offload_during_rollout", True, with_("model", offload_during_rollout=True)
    if moment == "rollout" and r.engine == "vllm":
        for u in [x / 20 for x in range(18, 3, -1)]:
            yield "rollout.gpu_memory_utilization", u, with_("rollout", gpu_memory_utilization=u)
    if moment == "old log-probs":
        t = cfg.optim.logprob_micro_batch_tokens or micro_batch_tokens(cfg)
        while t > 1024:
            t //= 2
            yield "optim.logprob_micro_batch_tokens", t, with_("optim", logprob_micro_batch_tokens=t)
    if cfg.parallel.dp_replicate > 1:
        yield "parallel.dp_replicate", 1, with_("parallel", dp_replicate=1)  # shard over every GPU
    if moment == "update":
        from .memory_plan import accepted_gpu_counts

        for n in accepted_gpu_counts(cfg):
            if n > gpus:
                yield "parallel.gpus", n, None  # a world size, not a config field of the run itself
        if not m.cpu_offload:
            yield "model.cpu_offload", True, with_("model", cpu_offload=True, offload_during_rollout=False)


def moment_fits(p: Plan, moment: str) -> bool:
    """Under the 90% line; the rollout's vLLM share also holds at least one full-length sequence of KV cache."""
    kv_ok = moment != "rollout" or "vLLM KV cache (fixed budget)" not in p.moments[moment] or p.kv_sequences >= 1
    return p.peak(moment) <= p.line and kv_ok


def fits(p: Plan) -> bool:
    return all(moment_fits(p, k) for k in p.moments)


def check(cfg, gpus: int, gpu_gb: float, spec: Spec | None = None) -> Plan:
    """The plan if every moment fits; else ValueError 'config FIELD: <moment> needs X GB ...; FIELD=V would fit'."""
    spec = spec or spec_for(cfg)
    p = plan(cfg, gpus, gpu_gb, spec)
    if fits(p):
        return p
    bad = next(k for k in p.moments if not moment_fits(p, k))
    if p.peak(bad) <= p.line:
        what = (f"vLLM's share ({cfg.rollout.gpu_memory_utilization} x {gpu_gb:g} GB) holds its bf16 weights "
                f"({p.moments['rollout']['vLLM weights bf16 (1/TP)']:.1f} GB at TP {cfg.rollout.tensor_parallel_size})"
                f" and workspace but not one full-length sequence of KV cache")
    else:
        what = f"{bad} needs {p.peak(bad):.1f} GB per GPU, over {p.line:.1f} GB (90% of {gpu_gb:g} GB)"
    for name, value, c in _fixes(cfg, gpus, gpu_gb, spec, bad):
        trial = plan(cfg, value, gpu_gb, spec) if c is None else plan(c, gpus, gpu_gb, spec)
        if moment_fits(trial, bad):  # this moment; a remaining one gets its own message on the next --plan
            raise ValueError(f"config {name}: {what} on {gpus} GPUs; {name}={value} would fit")
    field_ = "rollout.tensor_parallel_size" if bad == "rollout" else "model.cpu_offload"
    raise ValueError(f"config {field_}: {what} on {gpus} GPUs; no single change of the plan's fields fits")
