"""HFEngine: generation with Hugging Face ``model.generate``, the default engine (any device), and its builder.

Plain-PyTorch equivalent: ``model.generate(input_ids, do_sample=True, temperature=T, top_p=p,
num_return_sequences=n)``, plus the sampled tokens' log-probs after temperature and top-p.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from .base import Response, SamplingConfig, check_prompts, trim_response

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


def build(trainer) -> HFEngine:
    """A separate generation copy of the policy's model (sdpa attention), filled with the trainer's weights; on
    CUDA it lives on the accelerator only while it generates (host memory during the update)."""
    from ..model import build_hf_model, reset_rotary
    from ..parallelize import DTYPES

    cfg, dev = trainer.cfg, trainer.d.device
    gen = build_hf_model(dataclasses.replace(cfg.model, attn_implementation="sdpa"), dev, tokenizer=trainer.tok,
                         meta=True)
    gen.to_empty(device=dev)
    reset_rotary(gen, dev)
    gen.to(DTYPES[cfg.model.param_dtype]).eval()
    engine = HFEngine(gen, eos_id=trainer.tok.eos_id, pad_id=trainer.tok.pad_id, offload=dev.type == "cuda")
    trainer._sync_weights(engine)
    engine.sleep()
    return engine
