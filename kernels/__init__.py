"""Triton kernels of fastpmd (imported as fastpmd.kernels)."""
