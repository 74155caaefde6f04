"""Integrations with other trainers; each submodule imports its peer lazily (optional extras).

fastpmd.integrations.trl   FusedGRPOTrainer, PMDConfig, PMDTrainer (TRL's GRPOTrainer with fastpmd's LM head)
fastpmd.integrations.verl  register(): PMD-mean / PMD-part as verl policy losses ("pmd_mean", "pmd_part")
"""
