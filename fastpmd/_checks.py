"""Argument checks shared by the public ops: every error names the argument and is raised before any work.

Always checked (no host sync): types, shapes, dtypes, devices, the mask rule (bool, or integer 0/1 read as
mask != 0; float masks are rejected) and every Python-number option (finite, in range). Checked only when the
finite-value switch is on (`FASTPMD_CHECK_FINITE=1` or `with fastpmd.finite_checks():`), because each costs a
host sync: that tensors hold no NaN/inf where they are used (hidden and log-probs where the mask is True,
weight, bias, advantages) and that tensor normalisers (num_sequences, num_items) are finite and > 0 (otherwise
a tensor normaliser is clamped to >= 1 on the device).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

BACKENDS = ("auto", "naive", "torch", "triton", "cublas")  # cublas: fused_linear_pmd_loss's single pass
TAU_MIN = 1e-8  # smallest accepted tau: the loss (A - tau*Delta)^2 / (2*tau) stays far inside float32 range
MASK_RULE = "bool or integer 0/1"
_finite_override: list[bool | None] = [None]  # set by finite_checks(); None = read FASTPMD_CHECK_FINITE


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_positive(name: str, value) -> float:
    """A finite, strictly positive Python number (temperature, tau)."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive Python number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """A finite Python number >= 0 (epsilon_low, epsilon_high, beta)."""
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a non-negative Python number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


def check_tau(value, name: str = "tau") -> float:
    """tau: a finite Python number >= TAU_MIN (smaller ones overflow float32 in the loss or the partition)."""
    tau = check_positive(name, value)
    if tau < TAU_MIN:
        raise ValueError(f"{name} must be >= {TAU_MIN:g} (smaller values overflow float32), got {value!r}")
    return tau


def check_sequence_tau(tau, batch: int, device: torch.device | None = None):
    """tau: a number (check_tau), or a [B] floating tensor (one temperature per sequence) on `device`. A tensor's
    values (finite, >= TAU_MIN) are read only under the finite-value switch (one host sync); fastpmd.tau_schedule
    builds them so."""
    if isinstance(tau, torch.Tensor):
        check_tensor("tau", tau, dims=1, floating=True)
        if tau.shape[0] != batch:
            raise ValueError(f"tau has {tau.shape[0]} entries, the batch has B = {batch} rows")
        if device is not None:
            check_device("tau", tau, "the loss's tensors", device)
        check_at_least("tau", tau, TAU_MIN)
        return tau
    return check_tau(tau)


def check_weights(weights, shape, device: torch.device | None = None, where: torch.Tensor | None = None,
                  per_token: bool = False) -> torch.Tensor:
    """Loss weights (rollout correction), used as constants: a floating tensor of the given shape ([B] per
    sequence; per_token: [B, T] or [B, 1]) on `device`. Under the finite-value switch also finite and >= 0 where
    `where` (a bool mask, all entries without one) is True."""
    if per_token:
        check_tensor("weights", weights, dims=2, floating=True)
        if weights.shape[0] != shape[0] or weights.shape[1] not in (1, shape[1]):
            raise ValueError(f"weights must have shape {tuple(shape)} or ({shape[0]}, 1), got {tuple(weights.shape)}")
        if where is not None and weights.shape[1] == 1:  # one weight per sequence: used where any token is
            where = where.any(-1, keepdim=True)
    else:
        check_tensor("weights", weights, dims=len(shape), floating=True)
        check_same_shape("weights", weights, "the loss's per-term", shape)
    if device is not None:
        check_device("weights", weights, "the loss's tensors", device)
    check_at_least("weights", weights, 0.0, where)
    return weights.detach()


def check_at_least(name: str, t: torch.Tensor, low: float, where: torch.Tensor | None = None) -> None:
    """Under the finite-value switch (one host sync): NonFiniteInputError if t holds NaN/inf, ValueError naming
    the first entry below `low` (only where `where`, broadcastable to t from the left, is True). A no-op
    otherwise."""
    if not finite_checks_enabled():
        return
    check_finite(name, t, where)
    bad = t < low
    if where is not None:
        bad = bad & where.reshape(where.shape + (1,) * (t.dim() - where.dim()))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        idx = ", ".join(str(i) for i in first)
        raise ValueError(f"{name} must be >= {low:g}; {name}[{idx}] = {float(t[first]):g}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_length_norm(value) -> bool | float:
    """length_norm: True (token count), False (none) or a finite number > 0 (a constant divisor)."""
    if isinstance(value, bool):
        return value
    return check_positive("length_norm", value)


def check_count(name: str, value, fallback: torch.Tensor) -> torch.Tensor | float:
    """A global normaliser (num_sequences, num_items): None -> fallback.clamp(min=1) (an empty batch gives
    loss 0, not 0/0); a Python number: finite and > 0; a tensor: finite and > 0 under the finite-value switch
    (one host sync), clamped to >= 1 on the device otherwise."""
    if value is None:
        return fallback.clamp(min=1)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device != fallback.device and not (value.device.type == "cpu" and value.dim() == 0):
            raise ValueError(f"{name} is on {value.device}, the losses' tensors on {fallback.device}")
        if finite_checks_enabled():
            v = float(value)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be finite and > 0, got tensor value {v}")
        return value.reshape(()).clamp(min=1)
    return check_positive(name, value)


class NonFiniteInputError(ValueError):
    """Raised by the finite-value checks: a tensor holds NaN/inf where it is used."""


def finite_checks_enabled() -> bool:
    """True inside `finite_checks()` or, outside any, when FASTPMD_CHECK_FINITE is 1/true/yes/on."""
    if _finite_override[0] is not None:
        return _finite_override[0]
    return os.environ.get("FASTPMD_CHECK_FINITE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def finite_checks(enabled: bool = True):
    """Turn the NaN/inf input checks on (or off) inside the block, whatever FASTPMD_CHECK_FINITE says. Each
    checked tensor costs one host sync; the trainer uses this for its first steps."""
    previous = _finite_override[0]
    _finite_override[0] = bool(enabled)
    try:
        yield
    finally:
        _finite_override[0] = previous


def check_finite(name: str, t: torch.Tensor | None, where: torch.Tensor | None = None) -> None:
    """Under the finite-value switch: ValueError naming `name` if t holds NaN/inf (only where `where`, a bool
    tensor broadcastable to t from the left, is True). A no-op (no sync) when the switch is off."""
    if t is None or not finite_checks_enabled():
        return
    bad = ~torch.isfinite(t)
    if where is not None:
        bad &= where.reshape(where.shape + (1,) * (t.dim() - where.dim()))
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteInputError(f"{name} holds {count} non-finite value(s) (NaN or inf), the first at index {first}")


def check_device(name: str, t: torch.Tensor | None, ref_name: str, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, {ref_name} on {device}: move it to one device")


def check_tensor(name: str, t, *, dims: int | None = None, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if floating is False and t.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref_shape) -> None:
    if tuple(t.shape) != tuple(ref_shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref_shape)}, got {tuple(t.shape)}")


def check_mask(mask, shape, device, ref_name: str = "targets", required: bool = False) -> torch.Tensor | None:
    """The one mask rule of every op: bool, or an integer tensor read as mask != 0; float (and complex) masks
    are rejected (0.5 is neither in nor out). Shape of `ref_name`, on its device. Returns a bool mask or None."""
    if mask is None and not required:
        return None
    check_tensor("mask", mask)
    check_same_shape("mask", mask, ref_name, shape)
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"mask must be {MASK_RULE}, got {mask.dtype}")
    check_device("mask", mask, ref_name, device)
    return mask if mask.dtype == torch.bool else mask != 0


def is_packed(hidden, targets, mask) -> bool:
    """hidden [n, H] with targets and mask [B, T]: hidden holds the rows of mask's True entries, row-major."""
    return hidden.dim() == 2 and targets.dim() == 2 and mask is not None


def check_lm_head(hidden, weight, targets, bias, packed: bool = False) -> None:
    """hidden [..., H] (packed: [n, H], the rows of the mask), weight [V, H], targets [...] integer, bias [V]
    or None."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, dims=2, floating=True)
    check_tensor("targets", targets, floating=False)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match weight [V, H] = {tuple(weight.shape)}")
    if not packed and tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    check_device("weight", weight, "hidden", hidden.device)
    check_device("targets", targets, "hidden", hidden.device)
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        check_tensor("bias", bias, dims=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, weight has V = {weight.shape[0]} rows")
        check_device("bias", bias, "hidden", hidden.device)


def check_targets_in_range(targets_c: torch.Tensor, vocab: int) -> None:
    """targets_c: the compacted (valid) targets [n]. One host sync."""
    if targets_c.numel() == 0:
        return
    lo, hi = torch.aminmax(targets_c)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"targets must lie in [0, V={vocab}) where mask is True; found values in [{lo}, {hi}]")


def check_grpo_options(epsilon_low, epsilon_high, beta, ref_logprobs, max_completion_length, num_items):
    """GRPO/GSPO's Python options; returns (epsilon_low, epsilon_high) as floats."""
    eps = check_nonnegative("epsilon_low", epsilon_low), check_nonnegative("epsilon_high", epsilon_high)
    if check_nonnegative("beta", beta) != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs [B, T] is needed when beta != 0")
    if max_completion_length is not None:
        check_positive_int("max_completion_length", max_completion_length)
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        check_positive("num_items", num_items)
    return eps


def check_sequence_inputs(ref_name: str, shape, device, mask, advantages, **per_token) -> torch.Tensor:
    """The losses' per-sequence tensors, one rule for every loss and the fused paths: the per-token float
    tensors [B, T] given by name (None skipped), advantages [B] float and mask [B, T] by the mask rule, all of
    `ref_name`'s shape and on `device`; NaN/inf where the mask is True under the finite-value switch.
    Returns the bool mask."""
    for name, t in per_token.items():
        if t is not None:
            check_tensor(name, t, dims=2, floating=True)
            check_same_shape(name, t, ref_name, shape)
            check_device(name, t, ref_name, device)
    check_tensor("advantages", advantages, dims=1, floating=True)
    if advantages.shape[0] != shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} entries, {ref_name} has B = {shape[0]} rows")
    check_device("advantages", advantages, ref_name, device)
    mask = check_mask(mask, shape, device, ref_name, required=True)
    if finite_checks_enabled():
        for name, t in per_token.items():
            check_finite(name, t, mask)
        check_finite("advantages", advantages, mask.any(-1))
    return mask


def check_policy_inputs(logprobs, old_logprobs, advantages, mask, *, old_required: bool = True,
                        ref_logprobs=None) -> torch.Tensor:
    """The losses' tensors: logprobs/old_logprobs/ref_logprobs [B, T] float, advantages [B] float, mask [B, T]
    (check_sequence_inputs), all on logprobs' device. Returns the bool mask."""
    check_tensor("logprobs", logprobs, dims=2, floating=True)
    if old_required:
        check_tensor("old_logprobs", old_logprobs, dims=2, floating=True)
    return check_sequence_inputs("logprobs", logprobs.shape, logprobs.device, mask, advantages, logprobs=logprobs,
                                 old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_head_finite(hidden, weight, bias, mask) -> None:
    """Under the finite-value switch: hidden where mask is True (all of it without a mask), weight, bias."""
    if finite_checks_enabled():
        check_finite("hidden", hidden, mask)
        check_finite("weight", weight)
        check_finite("bias", bias)


def check_fused_inputs(hidden, weight, targets, mask, old_logprobs, advantages, bias, tau, temperature,
                       chunk_size, length_norm):
    """fused_linear_pmd_loss's arguments (check_lm_head, then check_sequence_inputs against targets); returns
    (bool mask, tau, temperature). hidden is [B, T, H], or packed [n, H] (the rows of the mask, row-major)."""
    packed = is_packed(hidden, targets, mask)
    check_tensor("hidden", hidden, dims=2 if packed else 3, floating=True)
    check_lm_head(hidden, weight, targets, bias, packed)
    check_tensor("old_logprobs", old_logprobs, dims=2, floating=True)
    mask = check_sequence_inputs("targets", targets.shape, hidden.device, mask, advantages, old_logprobs=old_logprobs)
    tau = check_sequence_tau(tau, targets.shape[0], hidden.device)
    temperature = check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    check_length_norm(length_norm)
    check_head_finite(hidden, weight, bias, None if packed else mask)
    return mask, tau, temperature


def check_loss_config_fields(cfg) -> None:
    """LossConfig.__post_init__'s number checks: tau, length_norm, epsilons (None or >= 0), beta,
    max_completion_length (None or a positive int)."""
    check_tau(cfg.tau)
    if getattr(cfg, "partition_tau", None) is not None:
        check_tau(cfg.partition_tau, "partition_tau")
    check_length_norm(cfg.length_norm)
    for name in ("epsilon_low", "epsilon_high"):
        if getattr(cfg, name) is not None:
            check_nonnegative(name, getattr(cfg, name))
    check_nonnegative("beta", cfg.beta)
    if cfg.max_completion_length is not None:
        check_positive_int("max_completion_length", cfg.max_completion_length)
