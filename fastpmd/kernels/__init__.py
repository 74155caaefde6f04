"""Triton kernels of fastpmd (their modules: the repository's kernels/ folder); see docs/kernels.md for the design.

Contract (called by fastpmd after validation and mask compaction; see docs/API.md):
- linear_logprobs_triton(hidden [n,H], weight [V,H], targets [n], bias, temperature, return_entropy)
- fused_linear_pmd_loss_triton(hidden, weight, targets, bias, old_logp, advantages, cu_seqlens, divisor, tau,
  temperature, num_sequences)
- shifted_exp(raw [n,V] fp32, bias, targets, inv_temperature, e_out [n,V]) -> (logp, inv_s): the row sweep of
  fastpmd.single_pass (backend="cublas")
- is_available(device)
"""
from .._layout import source_folder

__path__ += source_folder(__file__)  # noqa: F821 - a package's own __path__ (its modules: the kernels/ folder)

from ._runtime import is_available  # noqa: E402
from .linear_logprobs import linear_logprobs_triton  # noqa: E402
from .pmd_epilogue import fused_linear_pmd_loss_triton  # noqa: E402
from .shifted_exp import shifted_exp  # noqa: E402

__all__ = ["is_available", "linear_logprobs_triton", "fused_linear_pmd_loss_triton", "shifted_exp"]
