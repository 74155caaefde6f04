"""Tiny offline TRL set-up shared by the integration tests: a word-level tokenizer, a random Qwen2, a dataset."""
import copy

import torch

WORDS = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)] + ["+", "="]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def qwen2(seed=0, tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def dataset(n=8):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{a} + {b} =" for a in range(4) for b in range(4)][:n]})


def count_threes(completions, **kwargs):
    """Reward: how many times the completion says 3 (varies within groups from the first step)."""
    return [float(c.split().count("3")) for c in completions]


def grpo_args(tmp_path, cls=None, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=5,
                max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                save_strategy="no", seed=0, bf16=False)  # fp32: parity to rounding
    base.update(kw)
    return (cls or GRPOConfig)(**base)


def saved_qwen2(path, **kw):
    """The tiny Qwen2 saved to `path` (TRL builds its reference model from a path when beta != 0)."""
    qwen2(**kw).save_pretrained(str(path))
    return str(path)


def train(trainer_cls, args, model, **kw):
    """Train a model (a path, or an instance that is copied first); returns (trainer, per-step log entries)."""
    model = model if isinstance(model, str) else copy.deepcopy(model)
    tr = trainer_cls(model=model, reward_funcs=count_threes, args=args, train_dataset=dataset(),
                     processing_class=tokenizer(), **kw)
    tr.train()
    return tr, [h for h in tr.state.log_history if "grad_norm" in h]
