"""Faults during a run: stop requests (SIGTERM, SIGINT) and non-finite values.

SIGTERM / SIGINT (how schedulers preempt, and Ctrl-C): the handler only records the signal. The trainer
finishes the current RL step (generation, optimizer steps, its eval and metrics row), saves a checkpoint of
that step (unless the step just saved one) and raises `Stopped`; `fastpmd train` then exits 128 + signal
(143 for SIGTERM, 130 for SIGINT). `--resume` continues from that step exactly. A signal before the first RL
step completes (during warm-up) stops without a checkpoint (there is no RL state to keep). A second signal
while stopping ends the process at once with the signal's default action (the last complete checkpoint stays
valid: saves are atomic). With several ranks the request is all-reduced after every step, so all ranks save
the same step.

Non-finite values: the first `FINITE_CHECK_STEPS` RL steps run inside `fastpmd.finite_checks()` (every loss
input is checked for NaN/inf: hidden states, LM head weight, log-probs, advantages), and after each of their
optimizer steps the loss, the gradient norm and the updated parameters are checked. After every RL step the
logged loss and gradient norm (already on the host) and the parameters are checked. A failure raises
`NonFiniteError` naming the step and the tensor; `fastpmd train` exits 1 with that message.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

import fastpmd
from fastpmd._checks import NonFiniteInputError, finite_checks_enabled

FINITE_CHECK_STEPS = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
    """A NaN/inf loss, gradient norm, parameter or loss input, with the step it appeared in."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint of `step` (None: nothing to save)."""

    def __init__(self, signum: int, step: int, checkpoint):
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no RL step had completed)"
        super().__init__(f"stopped by {name} after step {step}; saved {where}; continue with --resume")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum


class StopRequests:
    """Context manager: SIGTERM/SIGINT handlers that record the signal (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if _is_main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"fastpmd train: {signal.Signals(signum).name} received: finishing the current step, then saving a "
              "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The signal any rank received (collective when the world is larger than one), or None."""
        signum = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([signum], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        return signum or None


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def checked_step(step: int):
    """Run one RL step with the finite-value checks on for the first FINITE_CHECK_STEPS steps; a non-finite
    loss input found by fastpmd becomes a NonFiniteError naming the step."""
    ctx = fastpmd.finite_checks() if step <= FINITE_CHECK_STEPS else contextlib.nullcontext()
    try:
        with ctx:
            yield
    except NonFiniteInputError as e:
        raise NonFiniteError(f"step {step}: loss input {e}") from e


def _bad(value) -> bool:
    return not math.isfinite(float(value))


def nonfinite_parameter(params) -> str | None:
    """Name of the first parameter (this rank's shard) holding NaN/inf, agreed across ranks; one host sync."""
    names, ok = [], []
    for name, p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        names.append(name)
        ok.append(torch.isfinite(local.detach()).all())
    flags = torch.stack(ok).logical_not() if ok else torch.zeros(1, dtype=torch.bool)  # [P] True = bad
    bad = flags.any().reshape(1).to(torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if int(bad.item()) == 0:
        return None
    local_bad = [n for n, f in zip(names, flags.tolist()) if f]
    return local_bad[0] if local_bad else "(a parameter on another rank)"


def check_before_update(step: int, loss, grad_norm) -> None:
    """Under the finite-value switch (the first steps): the mini-batch loss and gradient norm, before the
    optimizer step. A no-op without the switch (no sync)."""
    if finite_checks_enabled():
        for name, v in (("loss", loss), ("grad_norm", grad_norm)):
            if _bad(v):
                raise NonFiniteError(f"step {step}: {name} is {float(v)} before the optimizer step")


def check_after_update(step: int, named_params) -> None:
    """Under the finite-value switch: the parameters after an optimizer step."""
    if finite_checks_enabled() and (name := nonfinite_parameter(named_params)) is not None:
        raise NonFiniteError(f"step {step}: parameter {name} is NaN/inf after an optimizer step "
                             "(is optim.lr too large?)")


def check_row(step: int, row: dict, named_params) -> None:
    """After every RL step: the logged loss and grad norm (host floats) and the parameters are finite."""
    for key in ("loss", "grad_norm"):
        if key in row and _bad(row[key]):
            raise NonFiniteError(f"step {step}: {key} is {row[key]} (logged mean over the step's optimizer steps)")
    if (name := nonfinite_parameter(named_params)) is not None:
        raise NonFiniteError(f"step {step}: parameter {name} is NaN/inf after the step's updates "
                             "(is optim.lr too large?)")
