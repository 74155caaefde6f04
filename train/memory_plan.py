"""Per-GPU memory of the trainer's update phase for Qwen2.5-7B and Qwen3-30B-A3B under FSDP2, computed from the
model shapes: `python -m fastpmd.train.memory_plan` prints the tables of docs/memory_plan.md.

Model of the update phase (one micro-batch of T tokens per GPU, bf16 compute, fp32 masters):
- sharded state (1/N each): fp32 params 4 B, fp32 grads 4 B, AdamW moments 8 B per parameter; with CPU offload
  (FSDP2 CPUOffloadPolicy) all three live in host memory instead;
- gathered working set: the root unit (embeddings, final norm, LM head) in bf16 for the whole step, two decoder
  blocks in bf16 (the current one and the prefetched one), and one block's unsharded gradient in fp32 (the reduce
  dtype) while it is reduce-scattered, plus the root's unsharded fp32 gradients (accumulated across the step's
  micro-batches);
- activations with checkpointing: every block's input [T, H] bf16, plus one block's recomputed intermediates and
  their gradients (x2) during its backward; MoE blocks add the dispatched copies of the tokens for top-k experts;
- the loss: naive = bf16 logits + fp32 log-softmax + fp32 grad of [T, V]; fused (fastpmd) = one chunk of fp32
  logits and its gradient (64 MB each by default) + the fp32 LM-head gradient accumulator [V, H] + grad of hidden.
Not counted: the rollout engine (vLLM sleeps during the update: level 1 moves its weights to host, level 2 drops
them), CUDA context and NCCL buffers (~1-3 GB), allocator fragmentation. A GPU "fits" at <= 90% of its memory.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


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
        return 2 * self.vocab * self.hidden + self.hidden  # untied embeddings + LM head, final norm

    def total_params(self) -> int:
        return self.layers * self.block_params() + self.root_params()

    def active_params(self) -> int:
        if not self.experts:
            return self.total_params()
        active = self.attn_params() + self.top_k * 3 * self.hidden * self.expert_intermediate
        return self.layers * (active + 2 * self.hidden) + self.root_params()

    def block_activation_bytes(self, T: int) -> float:
        """bf16 intermediates of one decoder block for T tokens (recomputed in backward), without gradients."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = T * (2 * self.hidden + q + 2 * kv + q + self.hidden) * 2 + T * self.heads * 4  # norms, qkv, out, lse
        if self.experts:
            mlp = T * self.top_k * (2 * self.hidden + 3 * self.expert_intermediate) * 2 + T * self.experts * 4
        else:
            mlp = T * (3 * self.intermediate + self.hidden) * 2
        return attn + mlp


QWEN25_7B = Spec("Qwen2.5-7B", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, vocab=152064,
                 intermediate=18944, qkv_bias=True)
QWEN3_30B_A3B = Spec("Qwen3-30B-A3B", layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, vocab=151936,
                     experts=128, top_k=8, expert_intermediate=768, qk_norm=True)


def plan(spec: Spec, n_gpus: int, tokens: int, *, fused: bool = True, offload: bool = False,
         chunk_bytes: float = 64 * 2**20) -> dict[str, float]:
    """Per-GPU bytes of each part (GB) for n_gpus, T = tokens per micro-batch per GPU."""
    P, T, H, V = spec.total_params(), tokens, spec.hidden, spec.vocab
    sharded = 0.0 if offload else 1.0
    out = {
        "params fp32 (sharded)": sharded * 4 * P / n_gpus,
        "grads fp32 (sharded)": sharded * 4 * P / n_gpus,
        "AdamW m, v fp32 (sharded)": sharded * 8 * P / n_gpus,
        "gathered bf16: root + 2 blocks": 2 * (spec.root_params() + 2 * spec.block_params()),
        "unsharded fp32 grads: root + 1 block": 4 * (spec.root_params() + spec.block_params()),
        "activations (checkpointed)": spec.layers * T * H * 2 + 2 * spec.block_activation_bytes(T) + 2 * T * H * 2,
    }
    if fused:
        out["loss (fused, chunked)"] = 2 * chunk_bytes + 4 * V * H + T * H * 2
    else:
        out["loss (naive logits)"] = T * V * (2 + 4 + 4)
    out = {k: v / GB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def fewest_gpus(spec: Spec, tokens: int, gpu_gb: float, **kw) -> int | None:
    for n in range(1, 257):
        if plan(spec, n, tokens, **kw)["total"] <= 0.9 * gpu_gb:
            return n
    return None


def table(spec: Spec, tokens: int, gpu_gb: float = 80.0) -> str:
    cols = [("8 GPUs, fused", dict(n_gpus=8, fused=True)), ("8 GPUs, naive", dict(n_gpus=8, fused=False))]
    n = fewest_gpus(spec, tokens, gpu_gb, fused=True)
    if n is not None and n != 8:
        cols.append((f"{n} GPUs, fused (fewest)", dict(n_gpus=n, fused=True)))
    cols.append(("8 GPUs, fused, CPU offload", dict(n_gpus=8, fused=True, offload=True)))
    cols.append(("1 GPU, fused, CPU offload", dict(n_gpus=1, fused=True, offload=True)))
    plans = [(name, plan(spec, tokens=tokens, **kw)) for name, kw in cols]
    keys = []
    for _, p in plans:
        keys += [k for k in p if k not in keys and k != "total"]
    lines = [f"### {spec.name}: {spec.total_params() / 1e9:.2f}B parameters ({spec.active_params() / 1e9:.2f}B "
             f"active), T = {tokens} tokens per micro-batch per GPU, {gpu_gb:.0f} GB GPUs",
             "", "| GB per GPU | " + " | ".join(n for n, _ in plans) + " |", "|---|" + "---:|" * len(plans)]
    for k in keys + ["total"]:
        cells = [f"{p[k]:.1f}" if k in p else "-" for _, p in plans]
        lines.append(f"| {'**total**' if k == 'total' else k} | " + " | ".join(cells) + " |")
    host = 16 * spec.total_params() / GB
    lines += ["", f"CPU offload moves the fp32 params, grads and AdamW state ({host:.0f} GB in all) to host memory: "
                  f"{host / 8:.0f} GB per GPU process on 8 GPUs, {host:.0f} GB on 1 GPU."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch per GPU (default 16384)")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    for spec in (QWEN25_7B, QWEN3_30B_A3B):
        print(table(spec, args.tokens, args.gpu_gb))
        print()


if __name__ == "__main__":
    main()
