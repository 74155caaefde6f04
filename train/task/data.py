"""Problems and prompts: math data sets (jsonl/json/parquet files or hub names) and the DAPO prompt template.
The synthetic arithmetic task is in `arithmetic.py`, tokenizers in `tokenizer.py`, packing in `packing.py`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "Problem",
    "DAPO_TEMPLATE",
    "PLAIN_TEMPLATE",
    "load_problems",
    "format_prompt",
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
    """One problem: ``prompt`` is the bare question (no template), ``answer`` the gold answer string,
    ``columns`` the record's other top-level fields (passed to reward functions)."""

    prompt: str
    answer: str
    id: str
    columns: dict = field(default_factory=dict, compare=False)


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


def _read_jsonl(path: Path) -> list[dict]:
    """One record per non-blank line; an invalid line is an error naming its line number."""
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return records


def _record_place(name: str, i: int) -> str:
    """Where record i came from: "FILE line L" for JSON lines (blank lines counted), else "FILE record i+1"."""
    if name.lower().endswith(".jsonl"):
        with open(name) as f:
            return f"{name} line {[n for n, line in enumerate(f, 1) if line.strip()][i]}"
    return f"{name} record {i + 1}"


def _answer_text(value: Any) -> str:
    """The gold answer of a record: a string or a number (never null, a list or a dict: their str() is no answer)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {value!r:.80}")
    return str(value).strip()


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
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


def _read_hub(name: str, split: str, config: str | None) -> list[dict]:
    """Records of a hub data set; ValueError (one line) when it cannot be loaded (unreachable hub, unknown name,
    config or split)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a hub data set needs `datasets`: pip install 'fastpmd[data]'") from e
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # network, authentication, unknown name/config/split: datasets' many error types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"cannot load hub data set {name!r} (data.config={config or ''!r}, data.split={split!r}): "
                         f"{type(e).__name__}: {first}") from None


def load_problems(
    path_or_name: str | Path,
    *,
    split: str = "train",
    config: str | None = None,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    id_key: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load math problems, deduplicated by normalised question text (first occurrence kept).

    ``path_or_name``: a local ``.parquet``/``.jsonl``/``.json`` file, or ``"hf:<hub name>"`` to download with
    ``datasets`` (explicit opt-in; ``split`` and ``config`` apply only there). Keys are found automatically
    unless given: DAPO-Math-17k (``prompt`` chat list, ``reward_model.ground_truth``) and AIME-style (``problem`` or
    ``question``, ``answer``). Dotted keys reach into nested dicts. ``limit`` caps the number returned. A
    problem's ``columns`` are its record's top-level fields other than those of the prompt and answer keys.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = str(path_or_name)
    if name.startswith("hf:"):
        records = _read_hub(name[3:], split, config)
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"path_or_name: no such file {name!r} (prefix hub data sets with 'hf:')")
        records = _read_records(path)
    if not records:
        return []

    def pick(given: str | None, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
        if given is not None:
            try:
                _get(records[0], given)
            except KeyError:
                raise ValueError(f"{what}: {given!r} is not a field of the records (the first has "
                                 f"{sorted(records[0])})") from None
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
        try:
            question = _question_text(_get(rec, pk))
            key = _normalize_prompt(question)
            if key in seen:
                continue
            answer = _answer_text(_get(rec, ak))
            pid = str(_get(rec, ik)) if ik is not None else hashlib.sha1(key.encode()).hexdigest()[:12]
        except KeyError as e:
            raise ValueError(f"{_record_place(name, i)}: no field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{_record_place(name, i)}: {e}") from None
        seen.add(key)
        used = {pk.split(".")[0] if pk not in rec else pk, ak.split(".")[0] if ak not in rec else ak}
        problems.append(Problem(prompt=question, answer=answer, id=pid,
                                columns={k: v for k, v in rec.items() if k not in used}))
        if limit is not None and len(problems) >= limit:
            break
    return problems
