"""Asynchronous rollouts with bounded staleness (`rollout.mode="async"`; design: docs/training.md,
"Asynchronous rollouts").

- `serve(cfg, link)`: an inference rank's loop. It holds the engine (HF or vLLM) and one prompt stream per trainer rank it
  serves (r % I == its index; the same `Task`s those trainers draw from), waits for the trainers' start message,
  then generates the batch of RL step j = s+1, s+2, ... as soon as it holds weights of version >= j - 1 - k
  (`rollout.max_staleness`), switching to the newest push only between batches, and sends each of its trainer
  ranks its share tagged with the version that generated it. Between batches it first runs the held-out evals
  the trainers asked for, each with the weights they held when asking, sharing the eval chunks with the other
  inference ranks; the first inference rank sends the joined result to trainer rank 0.
- `RemoteEngine`: the trainer ranks' rollout engine. `generate` returns the share of the next batch the engine
  already made (checking step, prompts, sampling and the staleness bound); `update_weights` hands trainer rank
  0's full tensors to the bucketed push thread and returns; `evaluate` (trainer rank 0) asks for an eval and
  waits for its result.
- `AsyncTrainer`: the Trainer with that engine, the start message, the remote eval, and the
  staleness/overlap/idle metrics.
pi_old stays the trainer's recompute (step 3 of `Trainer.train_step`); the engine's log-probs (the behaviour
policy's) reach the loss only through `loss.rollout_correction="tis"`.
"""
from __future__ import annotations

import dataclasses
import queue
import time
import types

import torch
import torch.distributed as dist

from . import faults
from .async_link import Link, WeightPusher, WeightReceiver, Worker, recv_obj, send_obj
from .config import TrainConfig
from .distributed import Dist, pick_device
from .model import build_hf_model, reset_rotary
from .parallelize import DTYPES
from .task.prompts import Task
from .rollout import HFEngine, SamplingConfig
from .staleness import GenerationTimeline, min_version, overlap_frac, staleness
from .task.tokenizer import make_tokenizer
from .trainer import Trainer, held_out_eval


def sampling_for(cfg: TrainConfig, step: int, trainer_rank: int) -> SamplingConfig:
    """The SamplingConfig trainer rank `trainer_rank` would use at `step` in a colocated run (same seed)."""
    return Trainer.sampling(types.SimpleNamespace(cfg=cfg, d=types.SimpleNamespace(rank=trainer_rank)), step)


# ------------------------------------------------------------------------------------------ inference rank
def _engine(cfg: TrainConfig, tok, device: torch.device):
    """The generation engine, its weights left to the first push: the HF model (as Trainer._build_engine's), or
    with rollout.engine="vllm" a VLLMEngine in a world of its own (fastpmd.train.rollout.vllm.build_inference)."""
    gen = build_hf_model(dataclasses.replace(cfg.model, attn_implementation="sdpa"), device, tokenizer=tok,
                         meta=True)
    if cfg.rollout.engine == "vllm":
        from .rollout.vllm import build_inference

        return build_inference(cfg, gen, tok.eos_id, device)
    gen.to_empty(device=device)
    reset_rotary(gen, device)
    gen.to(DTYPES[cfg.model.param_dtype]).eval()
    return HFEngine(gen, eos_id=tok.eos_id, pad_id=tok.pad_id)


def serve(cfg: TrainConfig, link: Link) -> int:
    """Generate until run.max_steps or the trainers' stop; returns the exit status: 0, or 128 + signal when a
    SIGTERM/SIGINT arrived (recorded only: the trainers finish and save their step, then stop the engine)."""
    with faults.StopRequests() as stop:
        _serve(cfg, link)
    return 0 if stop.signum is None else 128 + stop.signum


def _serve(cfg: TrainConfig, link: Link) -> None:
    tok = make_tokenizer(cfg)
    engine = _engine(cfg, tok, pick_device(cfg.run.device))
    T, k = link.trainers, cfg.rollout.max_staleness
    tasks = {r: Task(cfg, tok, r, T) for r in link.served_by(link.rank)}
    p_local = cfg.rollout.prompts_per_step // T
    weights = WeightReceiver(link.weights)
    applied, idle_s, t_idle, step = 0, 0.0, time.time(), None  # step: the next batch's, once started

    def apply(pushes: int, named: list) -> None:
        nonlocal applied
        if pushes != applied:
            engine.update_weights(named)
            applied = pushes

    def ready() -> bool:  # under the receiver's lock: an eval to run, the start to take, or a batch to make
        if weights.evals:
            return True
        if step is None:
            return weights.start is not None
        return step <= cfg.run.max_steps and weights.latest[1] >= min_version(step, k)

    while weights.wait(ready) and not weights.stopped:
        if weights.evals:  # before the next batch, with the weights the trainers held when they asked
            with weights.cond:
                eval_step, pushes, named = weights.evals.pop(0)
            t0 = time.time()
            apply(pushes, named)
            result = held_out_eval(cfg, next(iter(tasks.values())), tok, engine, link.rank - T, link.inference,
                                   lambda rows: _gather_eval(link, rows))
            if link.rank == T:
                send_obj(link.samples, {"kind": "eval", "step": eval_step, "result": result}, 0)
            idle_s, t_idle = idle_s + t0 - t_idle, time.time()
            continue
        if step is None:  # the trainers' start: their prompt streams and the step they resume after
            for r in tasks:
                tasks[r].load_state_dict(weights.start["tasks"][r])
            step = weights.start["step"] + 1
            continue
        pushes, version, named = weights.latest  # the newest push, taken at this batch boundary
        apply(pushes, named)
        t0 = time.time()
        idle_s += t0 - t_idle
        for r in tasks:
            send_obj(link.samples, {"kind": "started", "t0": t0}, r)
        shares = {}
        for r, task in tasks.items():
            problems = task.next_prompts(p_local)
            prompt_ids = [task.encode(p) for p in problems]
            sampling = sampling_for(cfg, step, r)
            shares[r] = (prompt_ids, sampling, engine.generate(prompt_ids, sampling))
        t1 = time.time()
        for r, (prompt_ids, sampling, responses) in shares.items():
            send_obj(link.samples, {"kind": "batch", "step": step, "prompts": prompt_ids, "sampling": sampling,
                                    "responses": responses, "versions": [version] * sum(map(len, responses)),
                                    "t0": t0, "t1": t1, "engine_idle_s": idle_s}, r)
        idle_s, t_idle = 0.0, time.time()
        step += 1
    for r in tasks:  # stopped by the trainers (after their last push): a batch not begun is not generated
        send_obj(link.samples, {"kind": "end"}, r)
    link.close()
    if hasattr(engine, "close"):  # vLLM: its groups and its world of one
        engine.close()


def _gather_eval(link: Link, rows: list) -> list[list]:
    """Every inference rank's eval rows, on every inference rank (the first one collects them and sends them
    back), over the samples group."""
    first = link.trainers
    if link.rank != first:
        send_obj(link.samples, rows, first)
        return recv_obj(link.samples, first)
    parts = [rows] + [recv_obj(link.samples, first + i) for i in range(1, link.inference)]
    for i in range(1, link.inference):
        send_obj(link.samples, parts, first + i)
    return parts


# ------------------------------------------------------------------------------------------ trainer ranks
def check_batch(msg: dict, step: int, prompt_ids: list, sampling: SamplingConfig, k: int) -> list[int]:
    """The staleness of each sample of a received batch message, after checking that it is the batch of `step`
    with the trainer's own prompts and sampling and that no sample is more than k updates old (RuntimeError)."""
    if msg["step"] != step or msg["prompts"] != prompt_ids or msg["sampling"] != sampling:
        raise RuntimeError(f"async rollout: step {step} received the batch of step {msg['step']} or other prompts "
                           "or sampling than the trainer drew (the engine's prompt streams diverged)")
    stale = [staleness(step, v) for v in msg["versions"]]
    if max(stale) > k or min(stale) < 0:
        raise RuntimeError(f"async rollout: step {step} got samples {max(stale)} updates old, or from the future "
                           f"(rollout.max_staleness={k})")
    return stale


class RemoteEngine:
    """The rollout engine of a trainer rank in an async run (the RolloutEngine protocol): its batches come from
    the inference rank that serves it; its weight updates go to every inference rank (trainer rank 0 pushes, the
    others only take part in the all-gathers of `Trainer._sync_weights`)."""

    def __init__(self, link: Link, cfg: TrainConfig, trainer_step):
        self.link, self.k = link, cfg.rollout.max_staleness
        self.dtype = DTYPES[cfg.model.param_dtype]
        self.trainer_step = trainer_step  # () -> the trainer's step: the version of a push, the step of a batch
        self.pusher = WeightPusher(link.weights) if link.rank == 0 else None
        self.batches: queue.Queue = queue.Queue()
        self.evals: queue.Queue = queue.Queue()  # trainer rank 0: the eval results, in the order asked
        self.timeline = GenerationTimeline()
        self.receiver = Worker(self._receive, "sample-receive")
        self.started = False
        self.last: dict = {}  # the last batch: versions, wait interval, engine times

    def _receive(self) -> None:
        src = self.link.engine_of(self.link.rank)  # the inference rank serving this trainer rank
        while True:
            msg = recv_obj(self.link.samples, src)
            if msg["kind"] == "started":
                self.timeline.started(msg["t0"])
            elif msg["kind"] == "batch":
                self.timeline.finished(msg["t0"], msg["t1"])
                self.batches.put(msg)
            elif msg["kind"] == "eval":
                self.evals.put(msg)
            else:
                return

    def start(self, done_step: int, task_states: list) -> None:
        """Let the engine begin with step done_step + 1, from the trainers' prompt-stream states."""
        if self.pusher is not None:
            self.pusher.message({"kind": "start", "step": done_step, "tasks": task_states})
        self.started = True

    def _next(self, q: queue.Queue) -> dict:
        """The next message of q, failing if the receiver thread does."""
        while True:
            self.receiver.check()
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                continue

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list]:
        step = self.trainer_step()
        t0 = time.time()
        msg = self._next(self.batches)
        t1 = time.time()
        stale = check_batch(msg, step, prompt_ids, sampling, self.k)
        self.last = {"staleness": stale, "wait": (t0, t1), "engine_gen_s": msg["t1"] - msg["t0"],
                     "engine_idle_s": msg["engine_idle_s"]}
        return msg["responses"]

    def update_weights(self, named) -> None:
        if self.pusher is None:
            for _ in named:  # the full_tensor() all-gathers are collectives of every trainer rank
                pass
            return
        self.pusher.push(self.trainer_step(), named, self.dtype)

    def evaluate(self, step: int) -> dict | None:
        """Trainer rank 0: ask the inference ranks for the held-out eval with the weights pushed last (the
        trainers' own) and return its result; the other trainer ranks return None (only rank 0 logs)."""
        if self.pusher is None:
            return None
        self.pusher.message({"kind": "eval", "step": step})
        msg = self._next(self.evals)
        if msg["step"] != step:
            raise RuntimeError(f"async rollout: the eval of step {step} received that of step {msg['step']}")
        return msg["result"]

    def sleep(self) -> None:
        """Nothing to free: the engine lives on other ranks."""

    def wake(self) -> None:
        """Nothing to restore."""

    def step_metrics(self, window: tuple[float, float]) -> dict:
        """The async metrics of the step whose train_step ran over `window` (wall clock, time.time())."""
        s = self.last
        idle = s["wait"]
        return {"staleness_max": float(max(s["staleness"])),
                "staleness_mean": sum(s["staleness"]) / len(s["staleness"]),
                "overlap_frac": overlap_frac(window, idle, self.timeline.intervals(window[1])),
                "trainer_idle_s": idle[1] - idle[0], "engine_idle_s": s["engine_idle_s"],
                "engine_gen_s": s["engine_gen_s"]}

    def close(self) -> None:
        """Stop the engine (trainer rank 0, after its queued pushes) and wait for its end message."""
        if self.pusher is not None:
            self.pusher.close()
        self.receiver.thread.join()
        self.receiver.check()
        self.link.close()


class AsyncTrainer(Trainer):
    """The Trainer of an async run's trainer ranks: the RemoteEngine, the start message before the first step,
    the eval on the inference ranks, and the async metrics in every train row."""

    def __init__(self, cfg: TrainConfig, d: Dist, link: Link):
        self.link, self.step = link, 0  # step: the version of the pushes made while the Trainer is built
        super().__init__(cfg, d)

    def _build_engine(self):
        engine = RemoteEngine(self.link, self.cfg, lambda: self.step)
        self._sync_weights(engine)  # version 0: the initial weights
        return engine

    def train_step(self) -> dict:
        if not self.engine.started:  # the prompt streams as they are before this step's draw
            self._push_if_stale()  # warm-up or resumed weights: pushed before the start, they are its step's
            states = [None] * self.d.world_size
            dist.all_gather_object(states, self.task.state_dict())
            self.engine.start(self.step - 1, states)
        t0 = time.time()
        row = super().train_step()
        self._push_if_stale()  # now, as version `step` (the colocated trainer syncs lazily, before it generates)
        return {**row, **self.engine.step_metrics((t0, time.time()))}

    def _push_if_stale(self) -> None:
        if self.weights_stale:
            self._sync_weights()
            self.weights_stale = False

    def evaluate(self) -> dict | None:
        """The held-out eval (as `Trainer.evaluate`'s, which it equals for the same weights) run by the inference
        ranks with the trainers' current weights; trainer rank 0 waits for it and returns it, the others None."""
        if not self.task.eval_problems:
            return None
        self._push_if_stale()  # step 0 after the warm-up: its weights first
        return self.engine.evaluate(self.step)
