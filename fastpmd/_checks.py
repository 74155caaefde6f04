"""Argument checks shared by the public ops: every error names the argument and is raised before any work."""
from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "naive", "torch", "triton")


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


def check_mask(mask, shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    check_tensor("mask", mask)
    check_same_shape("mask", mask, "targets", shape)
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            raise ValueError(f"mask must be bool or integer 0/1, got {mask.dtype}")
        mask = mask != 0
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, targets on {device}")
    return mask


def check_lm_head(hidden, weight, targets, bias) -> None:
    """hidden [..., H], weight [V, H], targets [...] integer, bias [V] or None."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, dims=2, floating=True)
    check_tensor("targets", targets, floating=False)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match weight [V, H] = {tuple(weight.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError("hidden, weight and targets must be on one device")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        check_tensor("bias", bias, dims=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, weight has V = {weight.shape[0]} rows")
        if bias.device != hidden.device:
            raise ValueError("bias must be on the device of hidden")


def check_targets_in_range(targets_c: torch.Tensor, vocab: int) -> None:
    """targets_c: the compacted (valid) targets [n]. One host sync."""
    if targets_c.numel() == 0:
        return
    lo, hi = torch.aminmax(targets_c)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"targets must lie in [0, V={vocab}) where mask is True; found values in [{lo}, {hi}]")
