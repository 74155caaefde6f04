"""Rollout engines: sample n responses per prompt from token ids, and take new weights from the trainer.

``RolloutEngine`` is the interface the trainer uses; ``HFEngine`` (Hugging Face ``model.generate``) is the
embedded default, ``fastpmd.train.rollout_vllm.VLLMEngine`` the fast one (optional extra ``fastpmd[vllm]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch

__all__ = ["SamplingConfig", "Response", "RolloutEngine", "HFEngine", "trim_response", "logprobs_on_grid"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling options. ``temperature == 0`` means greedy. ``seed`` None: unseeded (not reproducible);
    engines given the same seed and inputs return the same samples, so a trainer varies it per step."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Response(list):
    """One sampled response: its token ids (a plain ``list`` of int, so it is used like one) plus ``logprobs``,
    a list of floats aligned with the tokens: the log-probability of each sampled token under the distribution
    the engine sampled it from, i.e. the model's logits divided by the temperature, then top-p filtered and
    renormalised (vLLM's ``logprobs_mode="processed_logprobs"``); greedy (temperature 0): the plain
    log-softmax. At top_p = 1 this is the trainer's log-prob at the sampling temperature; at top_p < 1 it is
    larger by -log(kept mass) of each step's nucleus. ``logprobs`` is None when the engine did not record them."""

    def __init__(self, token_ids=(), logprobs=None):
        super().__init__(token_ids)
        self.logprobs = None if logprobs is None else list(logprobs)
        if self.logprobs is not None and len(self.logprobs) != len(self):
            raise ValueError(f"logprobs: {len(self.logprobs)} values for {len(self)} tokens")


def logprobs_on_grid(responses: list, loss_mask: torch.Tensor) -> torch.Tensor | None:
    """The responses' engine log-probs on a packed batch's [B, L] grid (0 off loss_mask), or None when any
    response has none. loss_mask [B, L]'s True entries, row by row, are the response tokens in order
    (`packing.pack_batch`)."""
    lps = [getattr(r, "logprobs", None) for r in responses]
    if any(lp is None for lp in lps):
        return None
    out = torch.zeros(loss_mask.shape, dtype=torch.float32)  # [B, L]
    out[loss_mask] = torch.tensor([x for lp in lps for x in lp], dtype=torch.float32)
    return out


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator.

    ``generate`` returns, per prompt, ``sampling.n`` responses (``Response``: token-id lists with ``logprobs``); a
    response that produced eos ends with it (eos included), else it has ``max_new_tokens`` tokens.
    ``update_weights`` takes (name, full tensor) pairs named as in the Hugging Face model's ``state_dict``. ``sleep``/``wake`` free and restore the engine's
    accelerator memory around the training phase (no-ops where there is nothing to free).
    """

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[list[int]]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


def trim_response(ids: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """Cut ``ids`` after the first eos (kept) and at ``max_new_tokens``."""
    ids = ids[:max_new_tokens]
    try:
        return ids[: ids.index(eos_id) + 1]
    except ValueError:
        return ids


def check_prompts(prompt_ids: list[list[int]]) -> None:
    if not isinstance(prompt_ids, (list, tuple)):
        raise ValueError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")


class _SampledLogprobs:
    """A logits processor that applies temperature and top-p itself (HF's own warpers then stay off) and keeps
    the log-softmax of the processed scores for one step; the token sampled from them is read off the next
    step's input_ids (the last step's off the output), so memory is one [rows, V] block, not one per step."""

    def __init__(self, temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = []
        if temperature not in (0.0, 1.0):
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if temperature != 0.0 and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.prev: torch.Tensor | None = None  # [rows, V] log-probs of the last step
        self.steps: list[torch.Tensor] = []  # [rows] per generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        for w in self.warpers:
            scores = w(input_ids, scores)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, T] log-probs of the generated tokens (sequences [rows, L + T])."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.steps, dim=1)


class HFEngine:
    """Generation with Hugging Face ``model.generate`` (sampling, left padding, batched).

    Pass the training model itself to share its weights (``update_weights`` then finds every tensor already
    in place and copies nothing), or a separate copy (``update_weights`` copies into it). The model's own
    generation defaults (top_k, repetition penalty, ...) are overridden: sampling is plain temperature/top-p.
    ``batch_size`` caps the prompts per ``generate`` call (each expands to n rows). ``offload=True`` (a separate
    copy on an accelerator) parks the copy in host memory between ``sleep`` and ``wake``, so that it takes no
    accelerator memory while the trainer updates; weight updates made while asleep land in the host copy.
    """

    def __init__(self, model: torch.nn.Module, eos_id: int, pad_id: int, *, batch_size: int | None = None,
                 offload: bool = False):
        if not hasattr(model, "generate"):
            raise ValueError("model must be a Hugging Face generation model (with .generate)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device  # where generation runs
        self.offload = offload and self.device.type != "cpu"  # nothing to move off a CPU

    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        # Explicit values: None would be filled from the model's generation_config (e.g. top_k=20) or
        # transformers' global defaults (top_k=50). Temperature and top-p are applied by _SampledLogprobs.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None if greedy else 1.0,
            top_k=None if greedy else 0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if greedy else sampling.n,  # greedy: one row, copied n times below
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Response]]:
        device = next(self.model.parameters()).device
        L = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)  # [P, L], left padded
        attention_mask = torch.zeros((len(prompts), L), dtype=torch.long)  # [P, L]
        for i, p in enumerate(prompts):
            input_ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, L - len(p) :] = 1
        recorder = _SampledLogprobs(sampling.temperature, sampling.top_p)
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(sampling),
            logits_processor=[recorder],
        )  # [P * n, L + T], rows of prompt i at [i * n, (i + 1) * n)
        new = out[:, L:].tolist()
        logps = recorder.finish(out).tolist()  # [P * n, T]

        def response(row: int) -> Response:
            ids = trim_response(new[row], self.eos_id, sampling.max_new_tokens)
            return Response(ids, logps[row][: len(ids)])

        n = sampling.n
        if sampling.temperature == 0:  # [P, L + T]: one greedy row per prompt
            return [[response(i)] * n for i in range(len(prompts))]
        return [[response(i * n + j) for j in range(n)] for i in range(len(prompts))]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Response]]:
        check_prompts(prompt_ids)
        if not prompt_ids:
            return []
        was_training = self.model.training
        self.model.eval()
        bs = self.batch_size or len(prompt_ids)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            # Seed a forked RNG state so that the caller's global RNG is left as it was.
            with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                out: list[list[Response]] = []
                for s in range(0, len(prompt_ids), bs):
                    out.extend(self._generate_chunk([list(p) for p in prompt_ids[s : s + bs]], sampling))
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each (name, tensor) into the model's ``state_dict`` entry of that name; tensors that already
        are the model's own storage (a shared model) are skipped. Unknown names or shapes -> ValueError."""
        state = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in state:
                raise ValueError(f"named_tensors: {name!r} is not in the rollout model's state_dict")
            dst = state[name]
            if dst.shape != tensor.shape:
                raise ValueError(f"named_tensors: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            if dst.data_ptr() == tensor.data_ptr() and dst.device == tensor.device:
                continue  # same storage: the engine shares the training model
            dst.data.copy_(tensor.detach())

    def sleep(self) -> None:
        """With ``offload``: move the model to host memory and free the accelerator's cache. Else a no-op (the
        HF engine holds no KV cache between calls)."""
        if self.offload:
            self.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def wake(self) -> None:
        """Undo ``sleep``: the model back on its generation device (a no-op without ``offload``)."""
        if self.offload:
            self.model.to(self.device)
