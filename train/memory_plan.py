"""Per-GPU memory of the two phases of an RL step for the paper presets (Qwen2.5-7B, Qwen3-30B-A3B) under FSDP2,
computed from the model shapes and the presets' own settings: `python -m fastpmd.train.memory_plan` prints the
tables of docs/memory_plan.md.

Update phase (one micro-batch of T tokens per GPU, bf16 compute, fp32 masters), peak = max of two moments:
- backward: sharded state (1/N each: fp32 params 4 B, fp32 grads 4 B, AdamW moments 8 B per parameter; all in
  host memory with `model.cpu_offload`, FSDP2's CPUOffloadPolicy); gathered working set (the root unit, i.e.
  embeddings + final norm + LM head, in bf16 for the whole step, two decoder blocks in bf16: current + prefetched;
  one block's unsharded fp32 gradient before its reduce-scatter, the root's unsharded fp32 gradient accumulated
  across the micro-batches); activations with checkpointing (every block's input [T, H] bf16, one block's
  recomputed saved tensors x2 with their gradients, the final hidden states and their gradient); the loss (fused:
  one fp32 logits chunk and its gradient + the fp32 LM-head gradient accumulator [V, H]; naive: [T, V] bf16
  logits, fp32 log-softmax and its gradient);
- optimizer step: the sharded state plus foreach-AdamW's temporary (sqrt of the second moment, fp32, the size of
  the local shard: `torch._foreach_sqrt(exp_avg_sqs)`); with `model.cpu_offload` the step runs on the host.
Rollout phase (vLLM awake, generating): vLLM takes `rollout.gpu_memory_utilization` x GPU (its bf16 weights, 1/TP
each, and the KV cache in the rest); next to it the trainer keeps its fp32 params and AdamW moments (grads are
freed), unless `model.offload_during_rollout` (or `model.cpu_offload`) has moved them to host memory.
Not counted: CUDA context and NCCL buffers (~1-3 GB), vLLM's activation workspace, allocator fragmentation.
A phase "fits" at <= 90% of the GPU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
FIT = 0.9
# The token budget per micro-batch the DAPO presets are expected to set (`optim.micro_batch_tokens`, added on
# the trainer branch); used when the preset has no such field yet.
EXPECTED_MICRO_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class Spec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0  # dense MLP
    experts: int = 0  # MoE: experts per layer, experts per token, expert MLP width
    top_k: int = 0
    expert_intermediate: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    tied: bool = False  # LM head shares the embedding matrix

    def attn_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        p = self.hidden * (q + 2 * kv) + q * self.hidden
        p += (q + 2 * kv) if self.qkv_bias else 0
        p += 2 * self.head_dim if self.qk_norm else 0
        return p

    def block_params(self) -> int:
        mlp = (3 * self.hidden * self.intermediate if not self.experts else
               self.experts * 3 * self.hidden * self.expert_intermediate + self.hidden * self.experts)
        return self.attn_params() + mlp + 2 * self.hidden

    def root_params(self) -> int:
        return (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden  # embeddings (+ LM head), norm

    def total_params(self) -> int:
        return self.layers * self.block_params() + self.root_params()

    def active_params(self) -> int:
        if not self.experts:
            return self.total_params()
        active = self.attn_params() + self.top_k * 3 * self.hidden * self.expert_intermediate
        return self.layers * (active + 2 * self.hidden) + self.root_params()

    def mlp_saved_bytes(self, T: int) -> float:
        """bf16 tensors one SwiGLU MLP saves for backward: its input [T, H], gate and up [T, I], silu(gate) and
        silu(gate) * up (the down projection's input) [T, I]. MoE: per dispatched copy (T x top_k of them),
        plus the router's fp32 logits / probabilities [T, E]."""
        if self.experts:
            return T * self.top_k * (self.hidden + 4 * self.expert_intermediate) * 2 + T * self.experts * 4 * 2
        return T * (self.hidden + 4 * self.intermediate) * 2

    def block_activation_bytes(self, T: int) -> float:
        """bf16 tensors one decoder block saves for backward (recomputed under checkpointing), without grads."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = T * (2 * self.hidden + q + 2 * kv + q + self.hidden) * 2 + T * self.heads * 4  # norms, qkv, out, lse
        return attn + self.mlp_saved_bytes(T)

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """bf16 K and V of every layer for one token, on one of tp GPUs (KV heads are split over TP)."""
        return 2 * self.layers * max(self.kv_heads // tp, 1) * self.head_dim * 2


QWEN25_7B = Spec("Qwen2.5-7B", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, vocab=152064,
                 intermediate=18944, qkv_bias=True)
QWEN3_30B_A3B = Spec("Qwen3-30B-A3B", layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, vocab=151936,
                     experts=128, top_k=8, expert_intermediate=768, qk_norm=True)
PRESET_SPECS = {"qwen2.5-7b-dapo": QWEN25_7B, "qwen3-30b-a3b-dapo": QWEN3_30B_A3B}
KNOWN_MODELS = {"Qwen/Qwen2.5-7B": QWEN25_7B, "Qwen/Qwen3-30B-A3B-Base": QWEN3_30B_A3B}


def spec_from_hf_config(c) -> Spec:
    """The shapes of a Qwen2/Qwen3/Qwen3-MoE (or Llama-like) transformers config."""
    heads = c.num_attention_heads
    return Spec(getattr(c, "name_or_path", "") or c.model_type, layers=c.num_hidden_layers, hidden=c.hidden_size,
                heads=heads, kv_heads=c.num_key_value_heads or heads,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
                intermediate=c.intermediate_size, experts=getattr(c, "num_experts", 0) or 0,
                top_k=getattr(c, "num_experts_per_tok", 0) or 0,
                expert_intermediate=getattr(c, "moe_intermediate_size", 0) or 0,
                qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                qk_norm=c.model_type in ("qwen3", "qwen3_moe"), tied=bool(c.tie_word_embeddings))


def update_plan(spec: Spec, n_gpus: int, tokens: int, *, fused: bool = True, cpu_offload: bool = False,
                chunk_bytes: float = 64 * 2**20) -> dict[str, float]:
    """GB per GPU of each part of the update phase; 'backward' and 'optimizer step' are the two moments'
    sums, 'peak' their maximum."""
    P, T, H, V, N = spec.total_params(), tokens, spec.hidden, spec.vocab, n_gpus
    on_gpu = 0.0 if cpu_offload else 1.0
    state = {
        "params fp32 (sharded)": on_gpu * 4 * P / N,
        "grads fp32 (sharded)": on_gpu * 4 * P / N,
        "AdamW m, v fp32 (sharded)": on_gpu * 8 * P / N,
    }
    work = {
        "gathered bf16: root + 2 blocks": 2 * (spec.root_params() + 2 * spec.block_params()),
        "unsharded fp32 grads: root + 1 block": 4 * (spec.root_params() + spec.block_params()),
        "activations (checkpointed; block inputs, 1 block recomputed x2, final hidden + grad)":
            spec.layers * T * H * 2 + 2 * spec.block_activation_bytes(T) + 2 * T * H * 2,
        ("loss (fused, chunked)" if fused else "loss (naive logits)"):
            (2 * chunk_bytes + 4 * V * H) if fused else T * V * (2 + 4 + 4),
    }
    temp = {"foreach-AdamW temporary (optimizer step)": on_gpu * 4 * P / N}
    out = {k: v / GB for k, v in {**state, **work, **temp}.items()}
    out["backward"] = sum(state.values()) / GB + sum(work.values()) / GB
    out["optimizer step"] = (sum(state.values()) + sum(temp.values())) / GB
    out["peak"] = max(out["backward"], out["optimizer step"])
    return out


def rollout_plan(spec: Spec, n_gpus: int, gpu_gb: float, *, tp: int = 1, utilization: float = 0.5,
                 max_len: int = 10240, offload_during_rollout: bool = False,
                 cpu_offload: bool = False) -> dict[str, float]:
    """GB per GPU while vLLM generates: what vLLM takes, what the trainer keeps awake, and the KV cache's room
    in full-length (max_len-token) sequences per engine."""
    P = spec.total_params()
    budget = utilization * gpu_gb * GB
    weights = 2 * P / tp
    kv = budget - weights
    awake = 0.0 if (offload_during_rollout or cpu_offload) else 12 * P / n_gpus  # fp32 params + AdamW m, v
    out = {
        "vLLM weights bf16 (1/TP)": weights / GB,
        "vLLM KV cache (rest of its share)": kv / GB,
        "trainer: fp32 params + AdamW m, v (sharded)": awake / GB,
    }
    out["total"] = (budget + awake) / GB
    out["full-length sequences in the KV cache"] = max(kv, 0.0) / (spec.kv_bytes_per_token(tp) * max_len)
    out["vllm_fits"] = float(kv > 0)
    return out


def accepted_gpu_counts(cfg, candidates=range(1, 65)) -> list[int]:
    """World sizes `config.validate` accepts for this config (prompt and mini-batch splits, TP)."""
    from .config import validate

    ok = []
    for n in candidates:
        try:
            validate(cfg, world_size=n)
        except ValueError:
            continue
        ok.append(n)
    return ok


def preset_tokens(cfg) -> tuple[int, bool]:
    """(T, assumed): the preset's optim.micro_batch_tokens, or EXPECTED_MICRO_BATCH_TOKENS if it has none."""
    t = getattr(cfg.optim, "micro_batch_tokens", 0)
    return (int(t), False) if t else (EXPECTED_MICRO_BATCH_TOKENS, True)


def fewest(counts: list[int], fits) -> int | None:
    return next((n for n in counts if fits(n)), None)


def _markdown(title: str, cols: list[tuple[str, dict]], rows: list[str], fmt=lambda k, v: f"{v:.1f}") -> list[str]:
    lines = [title, "", "| GB per GPU | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in rows:
        cells = [fmt(k, p[k]) if k in p else "-" for _, p in cols]
        bold = k in ("peak", "total")
        lines.append(f"| {'**' + k + '**' if bold else k} | " + " | ".join(cells) + " |")
    return lines


def tables(preset: str, gpu_gb: float = 80.0) -> str:
    """The markdown for one preset: update phase, rollout phase, and what does not fit."""
    from .presets import get_preset

    cfg, spec = get_preset(preset), PRESET_SPECS[preset]
    T, assumed = preset_tokens(cfg)
    counts = accepted_gpu_counts(cfg)
    line = FIT * gpu_gb
    n0 = fewest(counts, lambda n: update_plan(spec, n, T)["peak"] <= line)
    n1 = fewest(counts, lambda n: update_plan(spec, n, T, cpu_offload=True)["peak"] <= line)
    cols = [("8 GPUs", update_plan(spec, 8, T)), ("8 GPUs, loss.backend=naive", update_plan(spec, 8, T, fused=False))]
    if n0 is not None and n0 != 8:
        cols.append((f"{n0} GPUs (fewest accepted)", update_plan(spec, n0, T)))
    cols.append(("8 GPUs, model.cpu_offload", update_plan(spec, 8, T, cpu_offload=True)))
    if n1 is not None and n1 != 8:
        cols.append((f"{n1} GPU(s), model.cpu_offload", update_plan(spec, n1, T, cpu_offload=True)))
    totals = ["backward", "optimizer step", "peak"]
    rows = []
    for _, p in cols:
        rows += [k for k in p if k not in rows and k not in totals]
    rows += totals
    head = (f"### {spec.name} (`{preset}`): {spec.total_params() / 1e9:.2f}B parameters "
            f"({spec.active_params() / 1e9:.2f}B active), {gpu_gb:.0f} GB GPUs")
    src = "assumed `optim.micro_batch_tokens`" if assumed else "the preset's `optim.micro_batch_tokens`"
    out = [head, "", f"GPU counts the config accepts (`config.validate`, {cfg.rollout.prompts_per_step} prompts in "
           f"{cfg.optim.mini_batches} mini-batches): {', '.join(map(str, counts))}.", "",
           *_markdown(f"Update phase, T = {T} tokens per micro-batch per GPU ({src}):", cols, rows)]
    max_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    util = cfg.rollout.gpu_memory_utilization
    rcols = []
    for tp in (1, 2):
        for off in (False, True):
            name = f"TP {tp}" + (", offload_during_rollout" if off else "")
            rcols.append((name, rollout_plan(spec, 8, gpu_gb, tp=tp, utilization=util, max_len=max_len,
                                             offload_during_rollout=off)))
    rrows = [k for k in rcols[0][1] if k != "vllm_fits"]
    fmt = lambda k, v: f"{v:.0f}" if k.startswith("full-length") else f"{v:.1f}"  # noqa: E731
    out += ["", *_markdown(f"Rollout phase, 8 GPUs, rollout.gpu_memory_utilization = {util} "
                           f"({util * gpu_gb:.0f} GB for vLLM), sequences of up to {max_len} tokens:",
                           rcols, rrows, fmt)]
    out += ["", "Does not fit (at the 90% line):"]
    bad = [f"- update phase on 8 GPUs without offload: {cols[0][1]['peak']:.1f} GB"] if cols[0][1]["peak"] > line else []
    bad += [f"- rollout, {name}: " + ("vLLM's weights alone exceed its share" if not p["vllm_fits"] else
                                       f"{p['total']:.1f} GB in all") for name, p in rcols
            if not p["vllm_fits"] or p["total"] > line]
    out += bad or ["- nothing in these tables"]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    for preset in PRESET_SPECS:
        print(tables(preset, args.gpu_gb))
        print()


if __name__ == "__main__":
    main()
