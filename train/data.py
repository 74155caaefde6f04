"""Problems and prompts: math data sets, the DAPO prompt, the offline synthetic arithmetic task with its
character tokenizer, and packing of (prompt, response) token ids into training tensors.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch


__all__ = [
    "Problem",
    "DAPO_TEMPLATE",
    "PLAIN_TEMPLATE",
    "load_problems",
    "format_prompt",
    "ArithmeticTask",
    "CharTokenizer",
    "pack_batch",
]

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_TEMPLATE = DAPO_PREFIX + "{question}" + DAPO_SUFFIX
PLAIN_TEMPLATE = "{question}"


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` is the bare question (no template), ``answer`` the gold answer string."""

    prompt: str
    answer: str
    id: str


def format_prompt(problem: Problem | str, template: str = DAPO_TEMPLATE) -> str:
    """The prompt text for ``problem``: ``template`` with ``{question}`` replaced (other braces are left alone,
    so LaTeX in the template or the question is safe)."""
    if "{question}" not in template:
        raise ValueError("template must contain '{question}'")
    question = problem.prompt if isinstance(problem, Problem) else problem
    if not isinstance(question, str):
        raise ValueError(f"problem must be a Problem or str, got {type(problem).__name__}")
    return template.replace("{question}", question)


# ----------------------------------------------------------------------------------------------- loading
_PROMPT_KEYS = ("prompt", "problem", "question")
_ANSWER_KEYS = ("reward_model.ground_truth", "answer", "ground_truth", "final_answer")
_ID_KEYS = ("extra_info.index", "id", "ID", "idx", "unique_id", "index")


def _get(record: dict, key: str) -> Any:
    """``record[key]`` with dotted paths into nested dicts ("reward_model.ground_truth"); KeyError if absent."""
    if key in record:
        return record[key]
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def _question_text(value: Any) -> str:
    """The question of a prompt field: a string, or a chat list (the last user message's content).
    A DAPO template around the question is removed, so that ``format_prompt`` can put it back once."""
    if isinstance(value, (list, tuple)):
        users = [m for m in value if isinstance(m, dict) and m.get("role", "user") == "user"]
        if not users:
            raise ValueError("chat prompt has no user message")
        value = users[-1].get("content", "")
    if not isinstance(value, str):
        raise ValueError(f"prompt field must be a str or a chat list, got {type(value).__name__}")
    text = value.strip()
    if text.startswith(DAPO_PREFIX.strip()[:40]):
        text = text[len(DAPO_PREFIX) :] if text.startswith(DAPO_PREFIX) else text.split("\n\n", 1)[-1]
        if text.endswith(DAPO_SUFFIX.strip()):
            text = text[: -len(DAPO_SUFFIX.strip())]
    return text.strip()


def _normalize_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # column-oriented {"problem": [...], "answer": [...]} or {"data": [...]}
            if "data" in data and isinstance(data["data"], list):
                return data["data"]
            cols = {k: v for k, v in data.items() if isinstance(v, list)}
            n = {len(v) for v in cols.values()}
            if len(n) != 1:
                raise ValueError(f"{path}: JSON object is neither records nor equal-length columns")
            return [dict(zip(cols, row)) for row in zip(*cols.values())]
        return list(data)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet needs pyarrow: pip install 'fastpmd[data]'") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"path_or_name: unsupported file type {suffix!r} (use .parquet, .jsonl or .json)")


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a hub data set needs `datasets`: pip install 'fastpmd[data]'") from e
    return list(datasets.load_dataset(name, split=split))


def load_problems(
    path_or_name: str | Path,
    *,
    split: str = "train",
    prompt_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load math problems, deduplicated by normalised question text (first occurrence kept).

    ``path_or_name``: a local ``.parquet``/``.jsonl``/``.json`` file, or ``"hf:<hub name>"`` to download with
    ``datasets`` (explicit opt-in; ``split`` applies only there). Keys are found automatically unless given:
    DAPO-Math-17k (``prompt`` chat list, ``reward_model.ground_truth``) and AIME-style (``problem`` or
    ``question``, ``answer``). Dotted keys reach into nested dicts. ``limit`` caps the number returned.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = str(path_or_name)
    if name.startswith("hf:"):
        records = _read_hub(name[3:], split)
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"path_or_name: no such file {name!r} (prefix hub data sets with 'hf:')")
        records = _read_records(path)
    if not records:
        return []

    def pick(given: str | None, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
        if given is not None:
            return given
        for key in candidates:
            try:
                _get(records[0], key)
                return key
            except KeyError:
                pass
        if required:
            raise ValueError(f"{what}: none of {list(candidates)} in the records; pass {what}=...")
        return None

    pk = pick(prompt_key, _PROMPT_KEYS, "prompt_key")
    ak = pick(answer_key, _ANSWER_KEYS, "answer_key")
    ik = pick(id_key, _ID_KEYS, "id_key", required=False)
    seen: set[str] = set()
    problems: list[Problem] = []
    for i, rec in enumerate(records):
        question = _question_text(_get(rec, pk))
        key = _normalize_prompt(question)
        if key in seen:
            continue
        seen.add(key)
        answer = str(_get(rec, ak)).strip()
        pid = str(_get(rec, ik)) if ik is not None else hashlib.sha1(key.encode()).hexdigest()[:12]
        problems.append(Problem(prompt=question, answer=answer, id=pid))
        if limit is not None and len(problems) >= limit:
            break
    return problems


# ------------------------------------------------------------------------------------ synthetic arithmetic
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticTask:
    """Offline synthetic task: prompts "a<op>b=" with 0 <= a, b <= max_operand, answers str(a <op> b).

    The train/held-out split is a fixed hash split of (a, op, b) (independent of ``seed``), so ``heldout(n)``
    is the same set in every run and never overlaps ``sample``. ``seed`` seeds ``sample`` when no ``rng`` is
    passed.
    """

    def __init__(self, seed: int = 0, *, max_operand: int = 20, ops: Sequence[str] = ("+",),
                 heldout_fraction: float = 0.1):
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {tuple(_OPS)}, got {ops!r}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.max_operand = max_operand
        self.ops = tuple(ops)
        self.heldout_fraction = heldout_fraction
        self._rng = random.Random(seed)
        self._heldout = sorted(
            (t for t in self._all() if self.is_heldout(*t)), key=lambda t: self._hash(*t)
        )
        n_all = (max_operand + 1) ** 2 * len(self.ops)
        if len(self._heldout) in (0, n_all):
            raise ValueError("max_operand/heldout_fraction leave the train or held-out split empty")

    def _all(self):
        r = range(self.max_operand + 1)
        return ((a, op, b) for op in self.ops for a in r for b in r)

    @staticmethod
    def _hash(a: int, op: str, b: int) -> float:
        h = hashlib.sha256(f"fastpmd-arith:{a}{op}{b}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0**64  # uniform in [0, 1)

    def is_heldout(self, a: int, op: str, b: int) -> bool:
        return self._hash(a, op, b) < self.heldout_fraction

    @staticmethod
    def make(a: int, op: str, b: int) -> Problem:
        return Problem(prompt=f"{a}{op}{b}=", answer=str(_OPS[op](a, b)), id=f"{a}{op}{b}")

    def sample(self, n: int, rng: random.Random | None = None) -> list[Problem]:
        """``n`` training problems drawn with replacement (never from the held-out split)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = self._rng if rng is None else rng
        out: list[Problem] = []
        while len(out) < n:
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            op = rng.choice(self.ops)
            if not self.is_heldout(a, op, b):
                out.append(self.make(a, op, b))
        return out

    def heldout(self, n: int | None = None) -> list[Problem]:
        """The first ``n`` (all when None) held-out problems, in a fixed order."""
        if n is not None and not 0 <= n <= len(self._heldout):
            raise ValueError(f"n must be in [0, {len(self._heldout)}] for this task, got {n}")
        return [self.make(*t) for t in self._heldout[:n]]


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


# ------------------------------------------------------------------------------------------------ batching
def pack_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
               pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training tensors for sequences ``prompt_i + response_i`` (B of them, L = longest).

    Shift convention: the hidden state at position t predicts token t+1, so ``targets[b, t] = input_ids[b, t+1]``
    (``pad_id`` in the last column) and ``loss_mask[b, t]`` is True exactly when token t+1 is a response token,
    i.e. for t in ``[len(prompt_b) - 1, len(prompt_b) + len(response_b) - 2]``. Per-token log-probs computed on
    ``(hidden[:, t], targets[:, t])`` and masked with ``loss_mask`` are the response log-probs, in order.

    Returns int64 ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` (0..len-1 per sequence,
    0 on padding), ``targets`` — all ``[B, L]`` — bool ``loss_mask`` ``[B, L]``, and int64 ``prompt_lengths``,
    ``response_lengths`` ``[B]``.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids and response_ids must have the same length, got "
                         f"{len(prompt_ids)} and {len(response_ids)}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must not be empty")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token (it predicts the first response token)")
    B = len(prompt_ids)
    plen = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)  # [B]
    rlen = torch.tensor([len(r) for r in response_ids], dtype=torch.long)  # [B]
    L = int((plen + rlen).max())
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = list(p) + list(r)
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    pos = torch.arange(L).expand(B, L)  # [B, L]
    attention_mask = (pos < (plen + rlen)[:, None]).long()  # [B, L]
    position_ids = pos * attention_mask  # [B, L]
    targets = torch.full_like(input_ids, pad_id)  # [B, L]
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = (pos >= (plen - 1)[:, None]) & (pos < (plen + rlen - 1)[:, None])  # [B, L]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids.contiguous(),
        "targets": targets,
        "loss_mask": loss_mask,
        "prompt_lengths": plen,
        "response_lengths": rlen,
    }
