"""Triton kernels of fastpmd (imported as fastpmd.kernels); see docs/kernels.md for the design.

Contract (called by fastpmd after validation and mask compaction; see docs/API.md):
- linear_logprobs_triton(hidden [n,H], weight [V,H], targets [n], bias, temperature, return_entropy)
- fused_linear_pmd_loss_triton(hidden, weight, targets, bias, old_logp, advantages, cu_seqlens, divisor, tau,
  temperature, num_sequences)
- is_available(device)
"""
if __name__ != "fastpmd.kernels":  # `import kernels` from the repository root: see fastpmd/_bare_name.py (stdlib only)
    import os
    import runpy

    runpy.run_path(os.path.join(os.path.dirname(__file__), os.pardir, "fastpmd", "_bare_name.py"))["step_aside"](
        __name__, __file__)
else:
    from ._runtime import is_available
    from .linear_logprobs import linear_logprobs_triton
    from .pmd_epilogue import fused_linear_pmd_loss_triton

    __all__ = ["is_available", "linear_logprobs_triton", "fused_linear_pmd_loss_triton"]
