"""The links of an asynchronous run (`rollout.mode="async"`, docs/training.md "Asynchronous rollouts"): process
groups of their own between the trainer ranks and the inference ranks, the bucketed weight push (trainer rank 0
-> inference ranks) and the sample stream (inference rank -> each trainer rank), each driven by one thread per
process so that generation, training and the transfers overlap.

Launch ranks 0..T-1 train (their own default process group, world size T, as in a colocated run); ranks
T..W-1 generate (I = W - T inference ranks; inference rank i, launch rank T + i, serves the trainer ranks r with
r % I == i). Groups built from the launcher's store (torchrun's env://) under prefixes of their own:
- weights: {trainer rank 0, inference ranks}, root 0: `WeightPusher` -> `WeightReceiver` (broadcasts: every
  inference rank receives every push and eval request);
- samples: all W ranks: each inference rank sends pickled messages to the trainer ranks it serves, and the
  inference ranks join their eval rows (`send_obj` / `recv_obj`).
Gloo on CPU and GPU alike (on GPUs the push goes through host memory).
"""
from __future__ import annotations

import os
import pickle
import queue
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from .config import validate
from .distributed import Dist, backend_for, pick_device

BUCKET_BYTES = 64 << 20  # a push is broadcast in flat buckets of at most this many bytes (a larger tensor: alone)


@dataclass
class Link:
    """Where this process sits in an async run and its link groups."""

    rank: int  # launch rank
    world: int  # launch world size W
    trainers: int  # T: ranks 0..T-1 train, T..W-1 generate
    weights: dist.ProcessGroupGloo | None  # {trainer 0, inference ranks} (None on trainer ranks > 0)
    samples: dist.ProcessGroupGloo  # all ranks, by launch rank

    @property
    def is_trainer(self) -> bool:
        return self.rank < self.trainers

    @property
    def inference(self) -> int:
        """I: the number of inference ranks."""
        return self.world - self.trainers

    def engine_of(self, trainer_rank: int) -> int:
        """The launch rank of the inference rank that serves trainer rank r: T + r % I."""
        return self.trainers + trainer_rank % self.inference

    def served_by(self, launch_rank: int) -> list[int]:
        """The trainer ranks that the inference rank at launch rank `launch_rank` serves."""
        return [r for r in range(self.trainers) if self.engine_of(r) == launch_rank]

    def close(self) -> None:
        """Every rank of the run calls this last: a barrier (all are done with the links), then the groups shut
        down (left to interpreter exit, a gloo group can abort the process)."""
        self.samples.barrier().wait()
        for pg in (self.weights, self.samples):
            if pg is not None:
                pg.shutdown()


def init_async(cfg) -> tuple[Link, Dist | None]:
    """Rendezvous through the launcher's store; trainer ranks also join their own default process group (as
    `init_distributed` chooses its backend) and get a Dist; inference ranks get None. ValueError (the same on
    every rank) before any group when the launch is no torchrun, has fewer trainer ranks T than inference ranks
    I (an inference rank would serve none), or the config does not hold at trainer world size T."""
    inf = cfg.rollout.inference_ranks
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ:
        raise ValueError(f"config rollout.mode: 'async' needs torchrun with more than rollout.inference_ranks={inf} "
                         "processes (got a plain process)")
    if world < 2 * inf:
        raise ValueError(f"config rollout.inference_ranks: {inf} inference ranks need at least as many trainer ranks "
                         f"(each serves the trainer ranks r with r % {inf} == its index), got {world} processes")
    validate(cfg, world - inf)
    timeout = timedelta(minutes=cfg.run.timeout_min)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    trainers = world - inf

    def gloo(prefix: str, r: int, size: int):
        return dist.ProcessGroupGloo(dist.PrefixStore(f"fastpmd_async/{prefix}/", store), r, size, timeout)

    weights = gloo("weights", 0 if rank == 0 else rank - trainers + 1, inf + 1) if rank == 0 or rank >= trainers \
        else None
    link = Link(rank, world, trainers, weights, gloo("samples", rank, world))
    if not link.is_trainer:
        return link, None
    device = pick_device(cfg.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device, cfg.model.cpu_offload), timeout=timeout, rank=rank,
                            world_size=trainers, store=dist.PrefixStore("fastpmd_async/trainers/", store))
    return link, Dist(rank, trainers, device)


def send_obj(pg, obj, dst: int) -> None:
    """Point-to-point: a pickled object to rank dst of pg (its size, then its bytes)."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    pg.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, 0).wait()
    pg.send([data], dst, 0).wait()


def recv_obj(pg, src: int):
    n = torch.zeros(1, dtype=torch.int64)
    pg.recv([n], src, 0).wait()
    data = torch.empty(int(n), dtype=torch.uint8)
    pg.recv([data], src, 0).wait()
    return pickle.loads(data.numpy().tobytes())


def broadcast_obj(pg, obj=None):
    """Root 0 sends obj to every member of pg; the others return it."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if pg.rank() == 0 else None
    n = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
    pg.broadcast([n], dist.BroadcastOptions()).wait()
    if data is None:
        data = torch.empty(int(n), dtype=torch.uint8)
    pg.broadcast([data], dist.BroadcastOptions()).wait()
    return pickle.loads(data.numpy().tobytes())


class Worker:
    """One daemon thread; an exception in it is re-raised by `check` in the caller's thread."""

    def __init__(self, target, name: str):
        self.error: BaseException | None = None

        def run():
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"async rollout: {self.thread.name} thread failed: {self.error!r}") from self.error


class WeightPusher:
    """Trainer rank 0: `push(version, named)` copies the full tensors in `dtype` into flat buckets (host memory,
    new buffers every push) and returns; a thread broadcasts a header (kind, version, names, shapes, dtype) and
    then each bucket to the inference ranks. `message(obj)` queues a control header (start, eval, stop) in order."""

    def __init__(self, pg):
        self.pg = pg
        self.queue: queue.Queue = queue.Queue(maxsize=2)  # at most two pushes wait while one is on the wire
        self.worker = Worker(self._run, "weight-push")

    def push(self, version: int, named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        layout, buckets, cur, cur_bytes = [], [], [], 0
        for name, t in named:
            flat = t.detach().reshape(-1).to(dtype)
            if cur and cur_bytes + flat.numel() * flat.element_size() > BUCKET_BYTES:
                buckets.append(torch.cat([f for _, _, f in cur]).cpu())
                layout.append([(n, s) for n, s, _ in cur])
                cur, cur_bytes = [], 0
            cur.append((name, tuple(t.shape), flat))
            cur_bytes += flat.numel() * flat.element_size()
        if cur:
            buckets.append(torch.cat([f for _, _, f in cur]).cpu())  # cat copies: the live parameters stay free
            layout.append([(n, s) for n, s, _ in cur])
        self.message({"kind": "weights", "version": version, "layout": layout, "dtype": dtype}, buckets)

    def message(self, header: dict, buckets: list | None = None) -> None:
        self.worker.check()
        self.queue.put((header, buckets or []))

    def _run(self) -> None:
        while True:
            header, buckets = self.queue.get()
            broadcast_obj(self.pg, header)
            for b in buckets:
                self.pg.broadcast([b], dist.BroadcastOptions()).wait()
            if header["kind"] == "stop":
                return

    def close(self) -> None:
        """Stop the inference ranks (after every queued push) and wait for the thread."""
        if self.worker.thread.is_alive():
            self.message({"kind": "stop"})
            self.worker.thread.join()
        self.worker.check()


class WeightReceiver:
    """Inference rank: a thread takes every push into fresh buffers and keeps the newest complete one
    (`latest` = (push count, version, [(name, tensor)])), plus the start header, the pending eval requests
    (`evals`: (step, push count, weights) of the newest push before each request) and the stop flag. The pushes
    before the start (set-up, warm-up, resume) are the weights of the start's step, whatever their tag."""

    def __init__(self, pg):
        self.pg = pg
        self.cond = threading.Condition()
        self.latest: tuple[int, int, list] | None = None
        self.start: dict | None = None
        self.evals: list[tuple[int, int, list]] = []
        self.stopped = False
        self.worker = Worker(self._run, "weight-receive")

    def _run(self) -> None:
        pushes = 0
        try:
            while True:
                header = broadcast_obj(self.pg)
                if header["kind"] == "weights":
                    named = []
                    for names in header["layout"]:
                        flat = torch.empty(sum(torch.Size(s).numel() for _, s in names), dtype=header["dtype"])
                        self.pg.broadcast([flat], dist.BroadcastOptions()).wait()
                        named += [(n, v.view(s)) for (n, s), v in
                                  zip(names, flat.split([torch.Size(s).numel() for _, s in names]))]
                    pushes += 1
                    with self.cond:
                        self.latest = (pushes, header["version"], named)
                        self.cond.notify_all()
                elif header["kind"] == "start":
                    with self.cond:  # the trainers hold the newest push's weights: those of the start's step
                        self.start = header
                        self.latest = self.latest and (self.latest[0], header["step"], self.latest[2])
                        self.cond.notify_all()
                elif header["kind"] == "eval":
                    with self.cond:  # with the weights the trainers hold when they ask: the newest push
                        self.evals.append((header["step"], *self.latest[::2]))
                        self.cond.notify_all()
                else:
                    return
        finally:
            with self.cond:
                self.stopped = True
                self.cond.notify_all()

    def wait(self, ready) -> bool:
        """Block until ready() (called under the lock) or stop; True if ready."""
        with self.cond:
            while not ready() and not self.stopped:
                self.cond.wait(timeout=1.0)
            self.worker.check()
            return bool(ready())
