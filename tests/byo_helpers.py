"""Bring-your-own-task tests: a tiny Hugging Face model folder built offline (random Qwen2 weights, a byte-level
BPE tokenizer trained in memory), a JSONL with the user's own keys, and reward files."""
import json


def bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A small byte-level BPE Hugging Face tokenizer trained in memory on `corpus` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_model_dir(path, chat_template: str | None = None):
    """A local HF model folder: config.json, model.safetensors and a tokenizer (optionally with a chat template)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_tok = bpe_tokenizer(["What is the capital of France? Paris", "Translate: hello -> bonjour"], 300)
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def user_jsonl(path, n: int = 6):
    """Records with the user's own keys: a nested prompt, a differently named answer, an extra column."""
    path.write_text("".join(json.dumps({"input": {"text": f"Say the number {i}."}, "target": str(i),
                                        "difficulty": i % 3}) + "\n" for i in range(n)))
    return path
