"""The RL loop. One `train_step` is the paper's recipe:

1. generate P prompts x n responses with the rollout engine (each rank its share of the prompts);
2. score them (rewards);
3. recompute the old log-probs pi_t with the trainer's own model (`fastpmd.linear_logprobs`, no grad);
4. take k optimizer steps over mini-batches of whole prompt groups, the loss chosen by name; the model's final
   hidden states and the LM head weight go straight into the fused loss (no logits); with token-budget
   micro-batches the sequences first move between ranks so each rank trains about as many tokens (steps 3-4);
5. push the new weights into the rollout engine (at the start of the next rollout phase, one FSDP unit at a time
   in the compute dtype, after the AdamW state has left the GPU with `model.offload_during_rollout`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fastpmd

from . import checkpoint, config_plan, faults, offload, rank_balance
from .cli import check_out
from .config import TrainConfig, validate
from .batch import RolloutBatch
from .packing import pack_batch
from .metrics import MetricsLogger, plot_curves
from .step_metrics import accumulate, step_metrics
from .microbatch import pack_micro_batches
from .micro_loss import micro_batch_loss, tis_weights
from .model import Policy, build_hf_model, reset_rotary
from .distributed import Dist
from .parallelize import DTYPES, apply_activation_checkpointing, apply_fsdp
from .task.prompts import Task
from .task.reward_signals import FlatRewardWatch, fill_dropped, reward_metrics
from .task.tokenizer import make_tokenizer
from .rollout import build_engine
from .weight_sync import sync_weights
from .rollout.base import SamplingConfig, logprobs_on_grid


def loss_config(cfg: TrainConfig) -> fastpmd.LossConfig:
    """The run's fastpmd.LossConfig (cfg.loss itself) with dr_grpo's constant divisor defaulting to the rollout's
    max_new_tokens."""
    if cfg.loss.max_completion_length is not None:
        return cfg.loss
    return dataclasses.replace(cfg.loss, max_completion_length=cfg.rollout.max_new_tokens)


def held_out_eval(cfg: TrainConfig, task: Task, tok, engine, rank: int, world_size: int, gather) -> dict:
    """Held-out Avg@k / Pass@k / Maj@k of `engine` on `task.eval_problems` (task/evaluation.py's `evaluate`):
    engine group `rank` of `world_size` samples the eval chunks rank, rank + world_size, ... (`rollout.
    eval_batch_size` problems each, seeded by chunk) and `gather` joins the groups' rows, so the result does not
    depend on how many engines share the work."""
    from .task.evaluation import evaluate

    r = cfg.rollout
    sampling = SamplingConfig(n=r.eval_n, temperature=r.eval_temperature, top_p=r.eval_top_p,
                              max_new_tokens=r.max_new_tokens, seed=cfg.model.seed + 12_345)
    threshold = (cfg.reward.correct + cfg.reward.incorrect) / 2
    return evaluate(engine, task.eval_problems, k=r.eval_n, sampling=sampling, reward_fn=task.reward,
                    encode=tok.encode_prompt, decode=tok.decode, template=task.template,
                    answer_style=task.answer_style, threshold=threshold, batch_size=r.eval_batch_size, rank=rank,
                    world_size=world_size, gather=gather)


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist):
        validate(cfg, d.world_size)
        self.loss_cfg = loss_config(cfg)  # ValueError on a bad loss/estimator pair, before any work
        self.cfg, self.d = cfg, d
        self.out = Path(cfg.run.out)
        check_out(self.out, cfg.run.resume)  # the CLI's own check, for a Trainer built without it
        self.tok = make_tokenizer(cfg)
        if d.device.type == "cuda":  # the memory plan of this config on this GPU, before any model exists
            config_plan.check(cfg, d.world_size, torch.cuda.get_device_properties(d.device).total_memory / 1e9,
                              config_plan.spec_for(cfg, self.tok.vocab_size))
        self.weights_stale = False  # the engine waits for the last update's weights (sent by rollout_phase)
        self.task = Task(cfg, self.tok, d.rank, d.world_size)
        self.policy, self.hf = self._build_policy()
        self.engine = self._build_engine()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (o.warmup_steps + 1)))
        self.step = 0
        self.last_batch: RolloutBatch | None = None  # the last generation batch, for inspection (tests, debugging)
        self.p_local = cfg.rollout.prompts_per_step // d.world_size
        self.temperature = cfg.rollout.temperature  # old and new log-probs of the distribution that was sampled
        o = cfg.optim  # sequences move between ranks only where micro-batches are planned by tokens
        self.balance_ranks = o.micro_batch_tokens > 0 and o.balance_ranks and d.world_size > 1

    # ------------------------------------------------------------------------------------------- set-up
    def _build_policy(self):
        """Meta-device model -> activation checkpointing -> fully_shard -> materialise -> weights from rank 0."""
        m, dev = self.cfg.model, self.d.device
        full = build_hf_model(m, torch.device("cpu"), tokenizer=self.tok) if self.d.is_main else None
        hf = build_hf_model(m, dev, tokenizer=self.tok, meta=True)
        if m.activation_checkpointing:
            apply_activation_checkpointing(hf)
        varlen = hf.config._attn_implementation == "flash_attention_2"
        policy = apply_fsdp(Policy(hf, row_tokens=None if varlen or not m.pack_row_tokens else m.pack_row_tokens),
                            m, dev, self.cfg.parallel.dp_replicate)
        # cpu_offload: FSDP2 wants the sharded params materialised on the host; the rotary buffers go to dev
        policy.to_empty(device="cpu" if m.cpu_offload else dev)
        reset_rotary(hf, dev)
        checkpoint.load_full_state(policy, {"hf." + k: v for k, v in full.state_dict().items()} if full else {})
        del full
        policy.train()
        return policy, hf

    def _build_engine(self):
        """The engine named by rollout.engine (fastpmd.train.rollout.ENGINES), filled with the policy's weights."""
        return build_engine(self)

    def _sync_weights(self, engine=None) -> dict:
        """Step 5: every weight into the rollout engine, one FSDP unit at a time in the compute dtype
        (train/weight_sync.py); returns {"gathers", "bytes"} sent by this rank."""
        return sync_weights(self.policy, self.hf, engine or self.engine)

    def sampling(self, step: int) -> SamplingConfig:
        r = self.cfg.rollout  # a distinct, reproducible seed per (run, step, rank)
        return SamplingConfig(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              seed=(self.cfg.model.seed * 1_000_003 + step) * 1024 + self.d.rank)

    # -------------------------------------------------------------------------------------- one RL step
    def train_step(self) -> dict:
        n, dev = self.cfg.rollout.group_size, self.d.device
        t0 = time.perf_counter()
        problems = self.task.next_prompts(self.p_local)
        prompt_ids = [self.task.encode(p) for p in problems]
        with self.rollout_phase():  # 1. [P_local * n] responses (Response: token ids + the engine's log-probs)
            responses = [r for group in self.engine.generate(prompt_ids, self.sampling(self.step)) for r in group]
        t_gen = time.perf_counter() - t0
        texts = [self.tok.decode(r) for r in responses]
        scores = self.task.score(problems, texts)  # 2. the reward functions; NaN = no reward (dropped)
        rewards = fill_dropped(scores, n)  # [B]
        batch = pack_batch([p for p in prompt_ids for _ in range(n)], responses, self.tok.pad_id)
        t1 = time.perf_counter()
        if (rollout_logp := logprobs_on_grid(responses, batch.loss_mask)) is not None:
            batch.rollout_logprobs = rollout_logp  # [B, L]
        elif self.loss_cfg.rollout_correction != "none":
            raise ValueError("loss.rollout_correction: the rollout engine reported no log-probs (Response.logprobs)")
        dropped = ~scores.valid  # [B]: no reward, trained on nothing (loss mask and advantage zero)
        batch.loss_mask[dropped] = False
        rw = self.cfg.reward
        tau = fastpmd.loss_tau(self.loss_cfg, rewards, n, reward_range=(rw.incorrect, rw.correct))  # number or [B]
        batch.advantages = fastpmd.advantages_for(self.loss_cfg, rewards, n, tau=tau)  # [B], where the groups are
        batch.advantages[dropped] = 0.0
        if isinstance(tau, torch.Tensor):
            batch.tau = tau.float()
        minibatches = list(self.minibatches())
        if self.balance_ranks:  # rows move so that every rank trains about as many tokens (train/rank_balance.py)
            batch, minibatches = rank_balance.balance(batch, minibatches, self.tok.pad_id, dev)
        batch.old_logprobs, entropy = self.old_logprobs(batch)  # 3. [B, L] fp32, at the sampling temperature
        batch.is_weights = tis_weights(self.loss_cfg, batch)  # [B] or [B, L] with loss.rollout_correction="tis"
        self.last_batch = batch  # kept for inspection only (tests, debugging); the steps below take it as an argument
        stats = [self.update(batch, mb) for mb in minibatches]  # 4. k optimizer steps
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_update = time.perf_counter() - t1
        self.weights_stale = True  # 5. at the start of the next rollout phase
        row = step_metrics(batch, rewards, entropy, stats, device=dev, step=self.step,
                           lr=self.scheduler.get_last_lr()[0], t_gen=t_gen, t_update=t_update)
        return {**row, **reward_metrics(scores, n, dev)}  # reward_mean over the rewarded completions

    @contextlib.contextmanager
    def rollout_phase(self):
        """The engine awake around generation: with `model.offload_during_rollout` the AdamW state leaves the GPU,
        the last update's weights go to the engine (step 5), then the sharded params follow the AdamW state to
        host memory; the allocator's cached blocks are released before the engine wakes."""
        off = self.cfg.model.offload_during_rollout
        moved = offload.optimizer_to_host(self.optimizer) if off else None
        if self.weights_stale:
            self._sync_weights()
            self.weights_stale = False
        if off:
            self.policy.to("cpu")
        if self.d.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine.wake()
        try:
            yield
        finally:
            self.engine.sleep()
            if moved is not None:
                offload.reload(self.policy, self.d.device, moved)

    @torch.no_grad()
    def old_logprobs(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_t log-probs [B, L] (0 off the loss mask) and entropies of the current policy, by micro-batch."""
        B, L = batch.input_ids.shape
        logp = torch.zeros(B, L)
        ent = torch.zeros(B, L)
        lo = self.cfg.loss
        all_idx = torch.arange(B)
        for idx in self.micro_batches(batch, all_idx, self.cfg.optim.logprob_micro_batch_tokens or None):
            mb = batch.rows(idx if idx.numel() else all_idx[:1]).to(self.d.device)  # empty: run, discard
            hidden, weight = self.policy(mb.input_ids, mb.position_ids, mb.attention_mask.bool(),
                                         mb.loss_mask)  # [n, H]: the loss mask's rows
            lp, e = fastpmd.linear_logprobs(hidden, weight, mb.targets, mask=mb.loss_mask, return_entropy=True,
                                            temperature=self.temperature, chunk_size=lo.chunk_size, backend=lo.backend)
            if not idx.numel():
                continue
            logp[idx, : lp.shape[1]] = lp.cpu()
            ent[idx, : e.shape[1]] = e.cpu()
        return logp, ent

    def minibatches(self):
        """k mini-batches of whole prompt groups, in an order shuffled reproducibly per step."""
        n, k = self.cfg.rollout.group_size, self.cfg.optim.mini_batches
        g = torch.Generator().manual_seed(self.cfg.model.seed * 7_919 + self.step)
        prompts = torch.randperm(self.p_local, generator=g)
        for chunk in prompts.chunk(k):
            yield (chunk[:, None] * n + torch.arange(n)).reshape(-1)  # sequence indices

    def micro_batches(self, batch: RolloutBatch, idx: torch.Tensor,
                      budget: int | None = None) -> list[torch.Tensor]:
        """Micro-batches of the sequences idx, the same number on every rank (FSDP's collectives pair up):
        `optim.micro_batch_seqs` sequences each, or with a token budget (`budget`, default
        `optim.micro_batch_tokens`) at most that many tokens each (train/microbatch.py; an over-long sequence
        alone; a micro-batch may be empty)."""
        budget = budget or self.cfg.optim.micro_batch_tokens
        if not budget:
            return list(idx.split(self.cfg.optim.micro_batch_seqs))
        lengths = batch.lengths(idx)
        count = torch.tensor([len(pack_micro_batches(lengths, budget))], device=self.d.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return [idx[b] for b in pack_micro_batches(lengths, budget, int(count.item()))]

    def update(self, batch: RolloutBatch, idx: torch.Tensor) -> dict:
        """One optimizer step on the sequences idx of the generation batch (a mini-batch): accumulate, clip to
        grad_clip, AdamW, LR step."""
        stats = self.accumulate_gradients(batch, idx)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        faults.check_before_update(self.step, stats["loss"], grad_norm)  # first steps only (a sync each)
        self.optimizer.step()
        faults.check_after_update(self.step, self.policy.named_parameters())
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**stats, "grad_norm": grad_norm.detach()}

    def accumulate_gradients(self, batch: RolloutBatch, idx: torch.Tensor) -> dict:
        """Backward over micro-batches of the sequences idx of `batch` (the generation batch) with global
        normalisers, so the sum equals one big batch's loss."""
        dev, W = self.d.device, dist.get_world_size()
        # global response tokens and sequences / world: FSDP averages the ranks' gradients, so dividing each rank's
        # sum by these gives the global means (dapo/bnpo by tokens, the rest by sequences) however rows are spread
        counts = torch.stack([batch.loss_mask[idx].sum().double(), torch.tensor(float(idx.numel()))]).to(dev)
        if W > 1:
            dist.all_reduce(counts)  # collectives: on the trainer's device
        n_items, n_seq = (counts / W).tolist()
        stats: dict[str, torch.Tensor] = {}
        micros = self.micro_batches(batch, idx)
        stats["micro_batch_tokens_max"] = float(max(sum(batch.lengths(m)) for m in micros))
        for i, micro in enumerate(micros):
            # The root (embeddings, final norm, LM head) stays gathered and accumulates its gradient unsharded
            # across the micro-batches: one all-gather and one reduce-scatter per optimizer step. Blocks
            # reduce-scatter after every micro-batch.
            last = i == len(micros) - 1
            self.policy.set_requires_gradient_sync(last, recurse=False)
            self.policy.set_reshard_after_backward(last, recurse=False)
            empty = micro.numel() == 0  # this rank has fewer micro-batches: one sequence at zero weight
            mb = batch.rows(idx[:1] if empty else micro).to(dev)
            hidden, weight = self.policy(mb.input_ids, mb.position_ids, mb.attention_mask.bool(),
                                         mb.loss_mask)  # [n, H]: the loss mask's rows, no [b, L, H] grid
            loss, metrics = micro_batch_loss(self.loss_cfg, self.temperature, mb, hidden, weight, n_seq, n_items,
                                             max(micro.numel(), 1))
            if empty:
                (loss * 0.0).backward()  # FSDP's gathers and reduce-scatters as on the other ranks, zero gradient
                continue
            loss.backward()
            accumulate(stats, {**metrics, "loss": loss}, micro.numel() / n_seq)  # the loss and its metrics, by name
        return stats

    # ------------------------------------------------------------------------------------------ the run
    def evaluate(self) -> dict | None:
        """Held-out Avg@k / Pass@k / Maj@k: each engine group (one rank, or the `rollout.tensor_parallel_size` ranks
        sharing a vLLM engine) samples its share of the eval chunks (`rollout.eval_batch_size` problems each,
        seeded by chunk), results gathered; equal for any world size. The members of a TP group all submit their
        group's chunk (the engine needs every member's call) and only the group's first member's rows are kept."""
        r = self.cfg.rollout
        if not self.task.eval_problems:
            return None
        tp = r.tensor_parallel_size if r.engine == "vllm" else 1

        def gather(rows: list) -> list[list]:
            parts = [None] * self.d.world_size
            dist.all_gather_object(parts, rows)
            return parts[::tp]  # one list per engine group (its first member's)

        with self.rollout_phase():
            return held_out_eval(self.cfg, self.task, self.tok, self.engine, self.d.rank // tp, self.d.world_size // tp,
                                 gather)

    def _save(self) -> Path:
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "task": self.task.state_dict()}
        return checkpoint.save(self.out, self.step, self.policy, self.optimizer, extra)

    def _resume(self) -> int:
        run = self.cfg.run
        step = checkpoint.resume_step(self.out, self.d.is_main, run.resume_unverified) if run.resume else None
        if step is None:
            return 0
        extra = checkpoint.load(self.out, step, self.policy, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.task.load_state_dict(extra["task"])
        self.weights_stale = True
        return step

    def fit(self) -> list[dict]:
        """Warm-up (fresh runs), then RL steps to run.max_steps with evals, checkpoints, export and plots.
        SIGTERM/SIGINT: finish the step, save it, raise faults.Stopped (see fastpmd.train.faults)."""
        with faults.StopRequests() as stop:
            return self._fit(stop)

    def _fit(self, stop: faults.StopRequests) -> list[dict]:
        run, main = self.cfg.run, self.d.is_main
        self.step = self._resume()
        log = MetricsLogger(self.out, enabled=main, total_steps=run.max_steps, start_step=self.step,
                            progress=run.progress, tensorboard=run.tensorboard, config=self.cfg)
        flat = FlatRewardWatch()
        log.truncate_after(self.step if self.step else -1)  # a fresh run starts an empty metrics.jsonl
        rows = []
        if self.step == 0:
            if self.cfg.warmup.steps:
                from .warmup import supervised_warmup

                log.log({"kind": "warmup", "step": 0, **supervised_warmup(self)})
                self.weights_stale = True
            if (res := self.evaluate()) is not None:
                log.log({"kind": "eval", "step": 0, **res})
        try:
            while self.step < run.max_steps:
                if self.step == 0 and (signum := stop.requested()) is not None:
                    raise faults.Stopped(signum, 0, None)
                self.step += 1
                with faults.checked_step(self.step):
                    row = self.train_step()
                faults.check_row(self.step, row, self.policy.named_parameters())
                log.log(row)
                rows.append(row)
                if main:
                    flat.update(self.step, row["frac_reward_zero_std"])
                last = self.step == run.max_steps
                if last or (run.eval_every and self.step % run.eval_every == 0):
                    if (res := self.evaluate()) is not None:
                        log.log({"kind": "eval", "step": self.step, **res})
                saved = None
                if last or (run.save_every and self.step % run.save_every == 0):
                    saved = self._save()
                if not last and (signum := stop.requested()) is not None:
                    raise faults.Stopped(signum, self.step, saved or self._save())
        finally:
            log.close()
        if run.export_hf:
            dtype = run.export_dtype if run.export_dtype != "auto" else self.cfg.model.param_dtype
            checkpoint.export_hf(self.out / "hf", self.policy, self.hf, self.tok, dtype=DTYPES[dtype])
        if main and run.plots:
            plot_curves(self.out)
        return rows
