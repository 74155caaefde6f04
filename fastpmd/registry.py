"""The loss registry: one entry per policy loss, read by `LossConfig`, `compute_loss`, the trainer's micro-loss and
step metrics and the benchmark, so that nothing branches on a loss's name.

Adding a loss is one function with the signature of `fastpmd.pmd_loss`,
    fn(logprobs [B, T], old_logprobs [B, T], advantages [B], mask [B, T], **options) -> (loss 0-d, metrics),
metrics a dict of detached 0-d tensors, plus one `LossSpec` in `LOSSES` below. A user's loss trains without
editing fastpmd: `LossConfig(name="my_loss.py:fn")` (a file) or `"package.module:fn"` loads `fn` and gives it
`user_spec`'s entry; `LossConfig.options` passes it keyword options.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .fused import fused_linear_pmd_loss
from .losses import grpo_loss, gspo_loss, pg_loss, pmd_loss
from .losses_trl import cispo_loss, luspo_loss, sapo_loss

# How a loss divides its sum over a micro-batch, so that micro-batches and ranks add up to one big batch:
# "sequences": it takes num_sequences (the global sequence count); "tokens": it takes num_items (the global
# response-token count); "batch": it averages over the rows it is given (the trainer then weighs each
# micro-batch's loss by its share of the mini-batch's sequences).
NORMALISERS = ("sequences", "tokens", "batch")


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function, the advantage estimators it takes (the first is its default), its keyword options
    from a LossConfig (`options(cfg, tau)`, tau a number or a [B] tensor), the rollout-correction (TIS) weights it
    takes ("sequence": [B], "token": [B, T], None: none), its normaliser (one of NORMALISERS, or a function of
    the LossConfig) and its fused hidden-state path (taking the same options plus temperature, chunk_size and
    backend; None: log-probs first, then `fn`)."""

    fn: Callable
    estimators: tuple[str, ...]
    options: Callable = lambda cfg, tau: {}
    weights: str | None = None
    normaliser: str | Callable = "batch"
    fused: Callable | None = None

    def normaliser_of(self, cfg) -> str:
        return self.normaliser(cfg) if callable(self.normaliser) else self.normaliser


def _pmd_options(cfg, tau):
    return {"tau": tau, "length_norm": cfg.length_norm}


def _epsilons(cfg, keys=("epsilon_low", "epsilon_high")):
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}  # None: the loss's default


def _clip_options(cfg, tau):
    # bnpo (tokens in the batch) is dapo with num_items defaulting to the batch's own token count: one loss, so a
    # global num_items (micro-batches, ranks) makes bnpo the mini-batch's token mean
    loss_type = "dapo" if cfg.loss_type == "bnpo" else cfg.loss_type
    return {"loss_type": loss_type, "beta": cfg.beta, "max_completion_length": cfg.max_completion_length,
            **_epsilons(cfg)}


def _clip_normaliser(cfg) -> str:  # TRL's loss_type: grpo/dr_grpo average over the batch, bnpo/dapo count tokens
    return "tokens" if cfg.loss_type in ("bnpo", "dapo") else "batch"


CLIP_ESTIMATORS = ("grpo", "mean", "loo")
PMD = {"options": _pmd_options, "weights": "sequence", "normaliser": "sequences", "fused": fused_linear_pmd_loss}
CLIP = {"options": _clip_options, "weights": "token", "normaliser": _clip_normaliser}
LOSSES: dict[str, LossSpec] = {
    "pmd-mean": LossSpec(pmd_loss, ("mean", "loo"), **PMD),
    "pmd-part": LossSpec(pmd_loss, ("partition", "partition_loo", "partition_loo_clamped"), **PMD),
    "grpo": LossSpec(grpo_loss, CLIP_ESTIMATORS, **CLIP),
    "gspo": LossSpec(gspo_loss, CLIP_ESTIMATORS, **CLIP),
    "pg": LossSpec(pg_loss, ("loo", "mean"), lambda cfg, tau: {"length_norm": cfg.length_norm},
                   normaliser="sequences"),
    "cispo": LossSpec(cispo_loss, CLIP_ESTIMATORS, lambda cfg, tau: _epsilons(cfg, keys=("epsilon_high",)),
                      weights="token", normaliser="tokens"),
    "sapo": LossSpec(sapo_loss, CLIP_ESTIMATORS, weights="token", normaliser="batch"),
    "luspo": LossSpec(luspo_loss, CLIP_ESTIMATORS, lambda cfg, tau: {"beta": cfg.beta, **_epsilons(cfg)},
                      weights="token", normaliser="batch"),
}
_USER: dict[str, LossSpec] = {}


def user_spec(fn: Callable) -> LossSpec:
    """The entry of a user's loss: GRPO's estimators (default "grpo"), no options but LossConfig.options, no
    rollout-correction weights, and normaliser "batch" (it averages over the sequences it is given)."""
    return LossSpec(fn, CLIP_ESTIMATORS)


def load_function(path: str, field: str = "name") -> Callable:
    """The function named by "file.py:fn" (a Python file) or "package.module:fn"; ValueError naming `field`."""
    where, sep, attr = path.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ValueError(f"{field} must be 'file.py:function' or 'module:function', got {path!r}")
    try:
        if where.endswith(".py"):
            file = Path(where).expanduser().resolve()
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            spec = importlib.util.spec_from_file_location(f"_fastpmd_user_{file.stem}_{abs(hash(str(file)))}", file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # the user's file may raise anything on import: name it, with the field
        raise ValueError(f"{field} {path!r}: cannot import {where!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{field} {path!r}: {where!r} has no function {attr!r}")
    return fn


def get_spec(name: str) -> LossSpec:
    """The registry entry of loss `name`: a registered name, or a user's loss by import path (loaded once)."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" not in name:
        raise ValueError(f"name must be one of {tuple(LOSSES)} or an import path 'file.py:function' / "
                         f"'module:function', got {name!r}")
    if name not in _USER:
        _USER[name] = user_spec(load_function(name))
    return _USER[name]


def check_options(spec: LossSpec, own: dict, options: dict) -> None:
    """LossConfig.options: keywords of the loss's function that its config fields do not already set."""
    params = inspect.signature(spec.fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in options:
        if key in own or key in ("num_sequences", "num_items", "weights", "ref_logprobs"):
            raise ValueError(f"options {key!r} is set by the loss config or the trainer, not by options")
        named = key in params and params[key].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if not (takes_any or named):
            raise ValueError(f"options {key!r} is not a keyword option of {spec.fn.__name__}")
