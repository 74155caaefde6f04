"""One adapter per benchmarked method, shared by `fastpmd bench`, the memory worker and pytest-benchmark.

Every adapter turns the same `Inputs` and a `fastpmd.LossConfig` into a `step()` that runs hidden states ->
loss forward and backward (gradients of hidden and weight), and says how many flops that step really does.
A method that cannot run (package missing, no CUDA, loss not offered) gives a reason instead; nothing is faked.

Flop accounting (R = B*T rows given, n = trained tokens, 2*H*V flops per row per matrix product):
- naive, compile: logits for all R rows, autograd backward: 6*R*H*V.
- fastpmd-torch: PMD, sequences fitting a chunk: logits once, gradients formed in the forward: 6*n*H*V;
  otherwise (and GRPO/GSPO through linear_logprobs) recompute in backward: 8*n*H*V.
- fastpmd-triton: forward kernel + recompute backward: 8*n*H*V.
- fastpmd-cublas: PMD only (fused_linear_pmd_loss), sequences fitting its chunk: 6*n*H*V on cuBLAS; otherwise it
  runs triton's two passes: 8*n*H*V.
- liger: per-chunk forward, then logits recomputed for the gradients, all R rows (no compaction): 8*R*H*V.
- liger-flce: reduction="none" defers the gradients to backward, which recomputes the logits: 8*R*H*V.
- cce: CPU impl "torch_compile" compacts the trained rows and keeps logits: 6*n*H*V; CUDA impl "cce" recomputes
  in backward: 8*n*H*V (an upper bound: it skips gradient blocks below filter_eps).
- matmul-floor: the three products any exact method does, h@W.T, G@W, G.T@h on n rows: 6*n*H*V.
"""
from __future__ import annotations

import abc
import importlib.util
from typing import Callable

import torch

import fastpmd
from fastpmd.chunked import default_chunk_rows
from fastpmd.objectives import loss_options
from fastpmd.single_pass import cublas_rows

from .inputs import Inputs
from .presets import LOSSES

Step = Callable[[], torch.Tensor]


def loss_config(name: str, tau: float = 0.01) -> fastpmd.LossConfig:
    """The benchmark's loss settings: PMD tau (default 0.01, the paper's scripts), GRPO loss_type "grpo"."""
    return fastpmd.LossConfig(name=name, tau=tau)


def _missing(*modules: str) -> str | None:
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            return f"package {mod!r} is not installed (pip install 'fastpmd[peers]')"
    return None


def _advantages(inp: Inputs, cfg) -> torch.Tensor:
    return fastpmd.advantages_for(cfg, inp.rewards, inp.shape.group_size)


def _hv(inp: Inputs) -> float:
    return 2.0 * inp.shape.hidden * inp.shape.vocab


class Method(abc.ABC):
    """Base adapter. Subclasses set `name`, `losses`, and implement `build` and `flops`."""

    name = ""
    losses: tuple[str, ...] = LOSSES  # the registry's losses (bench/presets.py)
    unsupported = ""  # why the other losses are not offered

    def skip_reason(self, loss: str, device: torch.device) -> str | None:
        """None when the method runs `loss` on `device`, else why not."""
        if loss not in self.losses:
            return f"{self.name} does not offer {loss}" + (f": {self.unsupported}" if self.unsupported else "")
        return self.unavailable(device)

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def note(self, device: torch.device) -> str:
        """Implementation detail worth a footnote (the impl or flags used)."""
        return ""

    @abc.abstractmethod
    def build(self, inp: Inputs, cfg) -> Step:
        """The step function: one forward+backward of this method on `inp` with loss config `cfg`."""

    @abc.abstractmethod
    def flops(self, inp: Inputs, cfg) -> float:
        """The flops this method really does per step."""


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """What PyTorch code does today: float32 logits for every position, log_softmax, gather; 0 where masked."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return logp * mask


class Naive(Method):
    name = "naive"

    def build(self, inp, cfg):
        adv = _advantages(inp, cfg)

        def step():
            inp.zero_grad()
            logp = naive_logprobs(inp.hidden, inp.weight, inp.targets, inp.mask)
            return _backward(fastpmd.compute_loss(cfg, logp, inp.old_logprobs, adv, inp.mask)[0])
        return step

    def flops(self, inp, cfg):
        return 3 * _hv(inp) * inp.shape.rows


_COMPILED: list = []


class Compiled(Naive):
    """torch.compile of the naive log-prob path (one graph shared by every loss; the O(n) loss stays eager)."""

    name = "compile"

    def note(self, device):
        return "torch.compile(naive logits -> log_softmax -> gather); compile time excluded by warm-up"

    def build(self, inp, cfg):
        if not _COMPILED:
            _COMPILED.append(torch.compile(naive_logprobs))
        fn, adv = _COMPILED[0], _advantages(inp, cfg)

        def step():
            inp.zero_grad()
            logp = fn(inp.hidden, inp.weight, inp.targets, inp.mask)
            return _backward(fastpmd.compute_loss(cfg, logp, inp.old_logprobs, adv, inp.mask)[0])
        return step


class FastPMD(Method):
    """fastpmd: the loss's fused path where its registry entry has one (PMD: fused_linear_pmd_loss), else
    linear_logprobs + the loss."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastpmd-{backend}"
        if backend == "cublas":
            from fastpmd.registry import LOSSES as SPECS
            self.losses = tuple(name for name in self.losses if SPECS[name].fused is not None)
            self.unsupported = "the cublas backend is fused_linear_pmd_loss's single pass"

    def unavailable(self, device):
        if self.backend in ("triton", "cublas"):
            if device.type != "cuda":
                return f"{self.backend} backend needs CUDA"
            from fastpmd.kernels import is_available
            if not is_available(device):
                return "fastpmd.kernels is not available on this device"
        return None

    def build(self, inp, cfg):
        adv = _advantages(inp, cfg)
        if (fused := cfg.spec.fused) is not None:
            def step():
                inp.zero_grad()
                loss, _ = fused(inp.hidden, inp.weight, inp.targets, inp.mask, inp.old_logprobs, adv,
                                **loss_options(cfg), backend=self.backend)
                return _backward(loss)
            return step

        def step():
            inp.zero_grad()
            logp = fastpmd.linear_logprobs(inp.hidden, inp.weight, inp.targets, mask=inp.mask, backend=self.backend)
            return _backward(fastpmd.compute_loss(cfg, logp, inp.old_logprobs, adv, inp.mask)[0])
        return step

    def flops(self, inp, cfg):
        longest = int(inp.mask.sum(-1).max())
        one_pass = cfg.spec.fused is not None and (
            (self.backend == "torch" and longest <= default_chunk_rows(inp.shape.vocab))
            or (self.backend == "cublas" and longest <= cublas_rows(inp.shape.vocab, inp.weight.dtype)))
        return (3 if one_pass else 4) * _hv(inp) * inp.tokens


class Liger(Method):
    """Liger-Kernel's LigerFusedLinearGRPOLoss (chunked over sequences, no KL term, no reference model)."""

    name = "liger"
    losses = ("grpo", "gspo")
    unsupported = "Liger-Kernel has no PMD loss"

    def unavailable(self, device):
        return _missing("liger_kernel")

    @staticmethod
    def chunk_size(inp: Inputs) -> int:
        """Sequences per chunk: enough for ~2048 rows (Liger's own row-chunk size). Liger's default of 1 sequence
        per chunk measured 4-5x slower on CPU at T=128 (many small matmuls and grad_weight updates)."""
        return max(1, min(inp.shape.batch, 2048 // inp.shape.seq_len))

    def note(self, device):
        return (f"LigerFusedLinearGRPOLoss(beta=0, chunk_size=max(1, 2048 // T) sequences, "
                f"compiled={device.type == 'cuda'})")

    def build(self, inp, cfg):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        gspo = cfg.name == "gspo"
        eps = (3e-4, 4e-4) if gspo else (0.2, 0.2)
        eps = (eps[0] if cfg.epsilon_low is None else cfg.epsilon_low,
               eps[1] if cfg.epsilon_high is None else cfg.epsilon_high)
        # compiled=False on CPU: Liger compiles only the O(n) loss math, which is not worth inductor time there.
        module = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=inp.hidden.device.type == "cuda", use_ref_model=False,
            chunk_size=self.chunk_size(inp),
            epsilon_low=eps[0], epsilon_high=eps[1], loss_type=cfg.loss_type,
            importance_sampling_level="sequence" if gspo else "token")
        adv, mask = _advantages(inp, cfg), inp.mask.float()

        def step():
            inp.zero_grad()
            loss, _ = module(inp.hidden, inp.weight, inp.targets, mask, adv, old_per_token_logps=inp.old_logprobs)
            return _backward(loss)
        return step

    def flops(self, inp, cfg):
        return 4 * _hv(inp) * inp.shape.rows


class LigerFLCE(Method):
    """Liger-Kernel's fused linear cross-entropy (Triton) with reduction="none": log-probs = -per-token CE into
    fastpmd's losses. Backward recomputes the chunked logits and folds in the per-token upstream gradient."""

    name = "liger-flce"

    def unavailable(self, device):
        if device.type != "cuda":
            return "Liger's fused linear cross-entropy is a Triton kernel (CUDA only)"
        return _missing("liger_kernel")

    def note(self, device):
        return "LigerFusedLinearCrossEntropyLoss(reduction='none'), log-probs = -CE, masked targets -100"

    def build(self, inp, cfg):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss(reduction="none")
        adv = _advantages(inp, cfg)
        targets = torch.where(inp.mask, inp.targets, torch.full_like(inp.targets, -100))
        b, t, h = inp.hidden.shape

        def step():
            inp.zero_grad()
            logp = -module(inp.weight, inp.hidden.view(b * t, h), targets.view(-1)).float().view(b, t)
            return _backward(fastpmd.compute_loss(cfg, logp, inp.old_logprobs, adv, inp.mask)[0])
        return step

    def flops(self, inp, cfg):
        return 4 * _hv(inp) * inp.shape.rows


class CutCrossEntropy(Method):
    """Apple's Cut Cross-Entropy: per-token NLL with reduction="none"; log-probs = -NLL into fastpmd's losses."""

    name = "cce"

    def unavailable(self, device):
        return _missing("cut_cross_entropy")

    def impl(self, device) -> str:
        return "cce" if device.type == "cuda" else "torch_compile"

    def note(self, device):
        return f"linear_cross_entropy(impl={self.impl(device)!r}, reduction='none')"

    def build(self, inp, cfg):
        from cut_cross_entropy import linear_cross_entropy

        impl = self.impl(inp.hidden.device)
        adv = _advantages(inp, cfg)
        targets = torch.where(inp.mask, inp.targets, torch.full_like(inp.targets, -100))  # ignored rows dropped
        b, t, h = inp.hidden.shape

        def step():
            inp.zero_grad()
            nll = linear_cross_entropy(inp.hidden.view(b * t, h), inp.weight, targets.view(-1), reduction="none",
                                       impl=impl)
            logp = -nll.float().view(b, t)
            return _backward(fastpmd.compute_loss(cfg, logp, inp.old_logprobs, adv, inp.mask)[0])
        return step

    def flops(self, inp, cfg):
        return (4 if self.impl(inp.hidden.device) == "cce" else 3) * _hv(inp) * inp.tokens


class MatmulFloor(Method):
    """The three matrix products of any exact method, on the trained rows, as plain torch matmuls:
    logits h@W.T [n,V], grad_hidden G@W [n,H], grad_weight G.T@h [V,H] (G a fixed [n,V] tensor)."""

    name = "matmul-floor"

    def build(self, inp, cfg):
        with torch.no_grad():
            h = inp.hidden.detach()[inp.mask].contiguous()  # [n, H]
            w = inp.weight.detach()
            g = torch.randn(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device) * 1e-3

        def step():
            with torch.no_grad():
                logits = h @ w.T
                gh = g @ w
                gw = g.T @ h
            return logits[0, 0] + gh[0, 0] + gw[0, 0]
        return step

    def flops(self, inp, cfg):
        return 3 * _hv(inp) * inp.tokens


METHODS: dict[str, Method] = {m.name: m for m in (
    Naive(), Compiled(), FastPMD("torch"), FastPMD("triton"), FastPMD("cublas"), Liger(), LigerFLCE(),
    CutCrossEntropy())}
FLOOR = MatmulFloor()


def get_method(name: str) -> Method:
    if name == FLOOR.name:
        return FLOOR
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def default_backend_method(device: torch.device) -> Method:
    """The adapter of fastpmd's default backend ("auto") on `device`."""
    from fastpmd.dispatch import resolve_backend

    return METHODS[f"fastpmd-{resolve_backend('auto', device)}"]
