"""Supervised warm-up before RL (the CPU demo's): a few steps of next-token NLL on (prompt, gold answer) pairs
drawn from the TRAINING problems only (`ArithmeticTask.sample` never returns a held-out problem), with its own
AdamW that is thrown away afterwards; the RL optimizer starts fresh.

With `noise` > 0 a fraction of the warm-up answers are near misses (gold +- 1..span): the warmed-up model knows
the method but samples a wrong neighbour often, like a pretrained model that is right only some of the time at
temperature 1. RL must then find and reinforce the right answer among its own samples.
"""
from __future__ import annotations

import random
import time

import torch

import fastpmd

from .packing import pack_batch


def noisy_answer(gold: str, noise: float, span: int, rng: random.Random) -> str:
    """gold, or with probability `noise` a near miss gold + d (1 <= |d| <= span, result >= 0)."""
    if noise == 0 or rng.random() >= noise:
        return gold
    while True:
        d = rng.choice([i for i in range(-span, span + 1) if i != 0])
        if int(gold) + d >= 0:
            return str(int(gold) + d)


def supervised_warmup(trainer) -> dict:
    """Run trainer.cfg.warmup.steps NLL steps on trainer.policy; returns a summary row (final loss, seconds)."""
    cfg, task, tok, policy = trainer.cfg.warmup, trainer.task, trainer.tok, trainer.policy
    if task.arithmetic is None:
        raise ValueError("warmup.steps: the supervised warm-up is implemented for task 'arithmetic' only")
    world = trainer.d.world_size
    rng = random.Random(f"warmup-{trainer.cfg.model.seed}-{trainer.d.rank}")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0, loss = time.perf_counter(), torch.zeros(())
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc="warm-up", dynamic_ncols=True,
               disable=not (trainer.d.is_main and trainer.cfg.run.progress))
    for _ in range(cfg.steps):
        problems = task.arithmetic.sample(max(1, cfg.batch_size // world), rng)
        answers = [noisy_answer(p.answer, cfg.noise, cfg.noise_span, rng) for p in problems]
        b = pack_batch([task.encode(p) for p in problems], [tok.encode(a) + [tok.eos_id] for a in answers],
                       tok.pad_id)
        b = b.to(trainer.d.device)

        def nll(h, w):  # mean NLL over answer tokens: [B, L] log-probs from hidden states, no logits kept
            logp = fastpmd.linear_logprobs(h, w, b.targets, mask=b.loss_mask)
            return -logp.sum() / b.loss_mask.sum()

        loss = nll(*policy(b.input_ids, b.position_ids, b.attention_mask.bool()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
    bar.close()
    del opt
    return {"warmup_steps": cfg.steps, "warmup_loss": float(loss.detach()), "warmup_s": time.perf_counter() - t0}
