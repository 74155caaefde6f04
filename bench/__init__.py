"""Benchmarks of fastpmd (imported as fastpmd.bench)."""
