"""Tokenizers in one place: `CharTokenizer` (offline, one id per character; the arithmetic task), its prompt
variant, and an adapter giving a Hugging Face tokenizer the same surface (encode_prompt, decode, ids)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..config import TrainConfig

class CharTokenizer:
    """A tiny offline tokenizer for the arithmetic task: one id per character, plus pad/bos/eos.

    ids: 0 pad, 1 bos, 2 eos, then the characters of ``chars`` (digits, ``+-*=``, space, newline by default).
    """

    DEFAULT_CHARS = "0123456789+-*= \n"
    FILE = "fastpmd_char_tokenizer.json"

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("chars must be non-empty and without repeats")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._to_id = {c: i + 3 for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        try:
            ids = [self._to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], *, until_eos: bool = True) -> str:
        """Characters of ``ids``; pad and bos are dropped; decoding stops at the first eos when ``until_eos``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and until_eos:
                break
            if i >= 3:
                if i >= self.vocab_size:
                    raise ValueError(f"ids: id {i} is out of range for vocab_size {self.vocab_size}")
                out.append(self.chars[i - 3])
        return "".join(out)

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / self.FILE).write_text(json.dumps({"type": "CharTokenizer", "chars": self.chars}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CharTokenizer":
        f = Path(directory) / cls.FILE
        if not f.is_file():
            raise FileNotFoundError(f"directory: no {cls.FILE} in {directory}")
        return cls(json.loads(f.read_text())["chars"])


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the CharTokenizer surface the trainer uses."""

    def __init__(self, name_or_path: str, chat_template: bool | None = None):
        """chat_template: wrap prompts in the tokenizer's chat template (one user turn); None = when it has one."""
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
        if chat_template and not self.tok.chat_template:
            raise ValueError(f"config data.chat_template: the tokenizer of {name_or_path!r} has no chat template "
                             "(set data.chat_template=False or None)")
        self.chat = bool(self.tok.chat_template) if chat_template is None else chat_template
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat:  # instruct/base models with a template: one user turn
            return list(self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                     add_generation_prompt=True, return_dict=False))
        return self.tok.encode(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens): the warm-up's answers."""
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, path) -> None:
        self.tok.save_pretrained(path)


class CharPromptTokenizer(CharTokenizer):
    """CharTokenizer whose prompts start with bos."""

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, add_bos=True)


def char_tokenizer_source(m) -> str | None:
    """For a ModelConfig whose tokenizer is a CharTokenizer: "char" (a fresh one) or the directory it was saved in
    (model.tokenizer, else a model folder exported by a char-tokenizer run); None for a HF tokenizer."""
    src = m.tokenizer or m.name_or_path
    if src == "char" or (Path(src).expanduser() / CharTokenizer.FILE).is_file():
        return src
    return None


def make_tokenizer(cfg: TrainConfig):
    """model.tokenizer ("char", or a directory), else the model folder's own tokenizer."""
    char = char_tokenizer_source(cfg.model)
    if char is not None:
        return CharPromptTokenizer() if char == "char" else CharPromptTokenizer.from_pretrained(char)
    return HFTokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.data.chat_template)
