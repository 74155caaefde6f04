"""Per-GPU memory of the parts of an RL step under FSDP2, computed from the model shapes: the arithmetic behind
`fastpmd train --plan` (train/config_plan.py, which adds the weight-sync moment and vLLM's fixed KV budget);
`python -m fastpmd.train.memory_plan` prints the tables of docs/memory_plan.md, the presets' plans at every GPU
count their configs accept.

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
                chunk_bytes: float = 64 * 2**20, checkpointing: bool = True) -> dict[str, float]:
    """GB per GPU of each part of the update phase; 'backward' and 'optimizer step' are the two moments'
    sums, 'peak' their maximum. checkpointing False: every block keeps its saved tensors through the backward."""
    P, T, H, V, N = spec.total_params(), tokens, spec.hidden, spec.vocab, n_gpus
    on_gpu = 0.0 if cpu_offload else 1.0
    state = {
        "params fp32 (sharded)": on_gpu * 4 * P / N,
        "grads fp32 (sharded)": on_gpu * 4 * P / N,
        "AdamW m, v fp32 (sharded)": on_gpu * 8 * P / N,
    }
    act = ({"activations (checkpointed; block inputs, 1 block recomputed x2, final hidden + grad)":
            spec.layers * T * H * 2 + 2 * spec.block_activation_bytes(T) + 2 * T * H * 2} if checkpointing else
           {"activations (no checkpointing; every block's saved tensors, 1 block's grads, final hidden + grad)":
            (spec.layers + 1) * spec.block_activation_bytes(T) + 2 * T * H * 2})
    work = {
        "gathered bf16: root + 2 blocks": 2 * (spec.root_params() + 2 * spec.block_params()),
        "unsharded fp32 grads: root + 1 block": 4 * (spec.root_params() + spec.block_params()),
        **act,
        ("loss (fused, chunked)" if fused else "loss (naive logits)"):
            (2 * chunk_bytes + 4 * V * H) if fused else T * V * (2 + 4 + 4),
    }
    temp = {"foreach-AdamW temporary (optimizer step)": on_gpu * 4 * P / N}
    out = {k: v / GB for k, v in {**state, **work, **temp}.items()}
    out["backward"] = sum(state.values()) / GB + sum(work.values()) / GB
    out["optimizer step"] = (sum(state.values()) + sum(temp.values())) / GB
    out["peak"] = max(out["backward"], out["optimizer step"])
    return out


def logprob_plan(spec: Spec, n_gpus: int, tokens: int, *, cpu_offload: bool = False,
                 chunk_bytes: float = 64 * 2**20) -> dict[str, float]:
    """GB per GPU of the old-log-prob pass (no gradient) over micro-batches of `tokens` tokens: the sharded
    params and AdamW state (grads are freed), the gathered root + 2 blocks, one block's forward tensors, the
    hidden states in and out of a block, and one fp32 logits chunk."""
    P, T, H, N = spec.total_params(), tokens, spec.hidden, n_gpus
    on_gpu = 0.0 if cpu_offload else 1.0
    parts = {
        "params fp32 (sharded)": on_gpu * 4 * P / N,
        "AdamW m, v fp32 (sharded)": on_gpu * 8 * P / N,
        "gathered bf16: root + 2 blocks": 2 * (spec.root_params() + 2 * spec.block_params()),
        "one block's forward tensors": spec.block_activation_bytes(T),
        "hidden states in and out [T, H] bf16": 2 * T * H * 2,
        "logits chunk fp32": chunk_bytes,
    }
    return {k: v / GB for k, v in parts.items()}


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


def tables(preset: str) -> str:
    """The markdown for one preset: the `--plan` of its config (train/config_plan.py) at every GPU count the
    config accepts, the preset's own marked, with each moment's parts and the verdict (or the field to change)."""
    from .config_plan import check, plan, spec_for
    from .presets import get_preset

    cfg = get_preset(preset)
    spec, gb, own = spec_for(cfg), cfg.parallel.gpu_gb, cfg.parallel.gpus
    counts = accepted_gpu_counts(cfg)
    plans = {n: plan(cfg, n, gb, spec) for n in counts}
    head = [f"{n} GPUs" + (" (preset)" if n == own else "") for n in counts]
    out = [f"### {spec.name} (`{preset}`): {spec.total_params() / 1e9:.2f}B parameters "
           f"({spec.active_params() / 1e9:.2f}B active), {gb:g} GB GPUs, T = {plans[counts[0]].tokens} tokens",
           "", f"GB per GPU; a moment fits at <= {FIT * gb:.1f} GB. Rollout: TP {cfg.rollout.tensor_parallel_size}, "
           f"utilization {cfg.rollout.gpu_memory_utilization}, offload_during_rollout "
           f"{cfg.model.offload_during_rollout}.", "",
           "| moment: part | " + " | ".join(head) + " |", "|---|" + "---:|" * len(counts)]
    for moment in plans[counts[0]].moments:
        parts = []
        for p in plans.values():
            parts += [k for k in p.moments[moment] if k not in parts]
        for k in parts:
            cells = [f"{p.moments[moment][k]:.1f}" if k in p.moments[moment] else "-" for p in plans.values()]
            out.append(f"| {moment}: {k} | " + " | ".join(cells) + " |")
        out.append(f"| **{moment}** | " + " | ".join(f"**{p.peak(moment):.1f}**" for p in plans.values()) + " |")
    out.append("| vLLM KV budget, full-length sequences | " +
               " | ".join(f"{p.kv_sequences:.0f}" for p in plans.values()) + " |")
    out += ["", "Verdict (`fastpmd train --preset " + preset + " --plan --gpus N`):", ""]
    for n in counts:
        try:
            check(cfg, n, gb, spec)
            p = plans[n]
            room = FIT * gb - max(p.peak(k) for k in p.moments)
            out.append(f"- {n} GPUs: fits; headroom {room:.1f} GB per GPU under the 90% line")
        except ValueError as e:
            out.append(f"- {n} GPUs: exit 2: `{e}`")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    for preset in PRESET_SPECS:
        print(tables(preset))
        print()


if __name__ == "__main__":
    main()
