"""The task: data, prompts, rewards, tokenizers, evaluation (fastpmd.train.task)."""
