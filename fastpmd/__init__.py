"""fastpmd: fused LM-head log-probs and policy losses for RL post-training with PMD-mean."""
__version__ = "0.1.0"
