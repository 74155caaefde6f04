"""Math answer checking: extract the final answer of a response and compare it with the gold answer.

Conventions (DAPO, as in the PMD-mean recipe): the last 300 characters of a response are searched for
``Answer: ...``; the last match is the answer. Correct -> ``correct`` (+1), anything else (wrong, no answer,
unparsable, time-out) -> ``incorrect`` (-1). Comparison: a normalised exact match first (cheap), then
``math_verify`` with the gold answer FIRST (``verify(parse(gold), parse(answer))``; verify is not symmetric).

Time-outs: ``math_verify`` guards each parse and comparison with ``signal.alarm`` (POSIX, main thread only),
so in the main thread we pass it ``timeout_s`` (rounded up to whole seconds; a check makes a few such calls,
so it is bounded by a small multiple of ``timeout_s``). Off the main thread signals are unavailable: there the
math_verify step runs in a helper process (started on first use; this file loaded by path, without torch)
where the same alarms work, and the caller also gives up (and kills the helper) after a deadline. Answers
longer than ``MAX_ANSWER_CHARS`` are compared by exact match only. Nothing here raises on bad model output:
every failure or time-out counts as incorrect.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = [
    "DAPO_WINDOW",
    "MAX_ANSWER_CHARS",
    "RewardConfig",
    "extract_answer",
    "last_boxed",
    "normalize_answer",
    "is_equivalent",
    "math_reward",
    "score_batch",
]

DAPO_WINDOW = 300  # characters at the end of a response searched for "Answer:"
MAX_ANSWER_CHARS = 512  # longer extracted answers skip math_verify (exact match only)
STYLES = ("dapo", "boxed", "auto", "arith")

_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_BOXED_CMDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None.

    ``\\boxed 5`` (no braces, valid LaTeX) gives the next whitespace-separated token.
    """
    cmd, start = max(((c, text.rfind(c)) for c in _BOXED_CMDS), key=lambda t: t[1])
    if start < 0:
        return None
    rest = text[start + len(cmd) :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        token = rest.split(None, 1)
        return token[0].rstrip(".$") if token else None
    i = text.find("{", start)
    if i < 0 or text[start + len(cmd) : i].strip():
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced


def _clean(ans: str) -> str:
    ans = ans.strip()
    # "$\frac12$." -> "\frac12"; the answer line often ends with a period or math delimiters.
    while ans and ans[-1] in ".$":
        ans = ans[:-1].rstrip()
    while ans and ans[0] == "$":
        ans = ans[1:].lstrip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left) and ans.endswith(right):
            ans = ans[len(left) : -len(right)].strip()
    inner = last_boxed(ans) if ans.startswith(_BOXED_CMDS) else None
    return inner if inner is not None else ans


def extract_answer(text: str, style: str = "dapo") -> str | None:
    """The final answer of a response, or None when there is none.

    ``style``: "dapo" (last ``Answer: ...`` in the last 300 characters), "boxed" (last ``\\boxed{...}``),
    "auto" (dapo, then boxed), "arith" (the text up to the first newline, stripped; the synthetic task).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if style == "arith":
        ans = text.split("\n", 1)[0].strip()
        return ans or None
    if style in ("dapo", "auto"):
        matches = _ANSWER_RE.findall(text[-DAPO_WINDOW:])
        if matches:
            ans = _clean(matches[-1])
            if ans:
                return ans
        if style == "dapo":
            return None
    boxed = last_boxed(text)
    if boxed is None:
        return None
    ans = _clean(boxed)
    return ans or None


_NUMBER_WITH_COMMAS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(ans: str) -> str:
    """Light normalisation for the exact-match fast path and for majority voting.

    Removes whitespace, ``$``, ``\\left``/``\\right``, thin spaces (``\\!``, ``\\,``, ``\\;``), a trailing
    period, a single-letter ``x=`` prefix and a leading ``+``; maps ``\\dfrac``/``\\tfrac`` to ``\\frac`` and
    ``{,}`` to ``,``; drops thousands commas in plain numbers ("1,000" -> "1000") and zero decimals ("3.00" -> "3").
    """
    s = ans.strip()
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("{,}", ","),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _NUMBER_WITH_COMMAS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"^[a-zA-Z]=", "", s)
    if re.fullmatch(r"[+-]?\d+\.0+", s):  # "3.00" -> "3"
        s = s.split(".")[0]
    return s.lstrip("+") if re.fullmatch(r"\+\d+(\.\d+)?", s) else s


def _math_verify_equal(answer: str, gold: str, timeout_s: float) -> bool:
    """math_verify, gold first, with its signal time-outs (call in a main thread). False on any failure."""
    from math_verify import parse, verify  # heavy (sympy): imported on first use
    from math_verify.errors import TimeoutException

    t = max(1, math.ceil(timeout_s))
    try:
        # Wrapping in \boxed{} makes math_verify read the string as one LaTeX expression
        # ("2\sqrt{3}" would otherwise parse as 2).
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=t) or parse(gold, parsing_timeout=t)
        a = parse(f"\\boxed{{{answer}}}", parsing_timeout=t) or parse(answer, parsing_timeout=t)
        return bool(g and a and verify(g, a, timeout_seconds=t))
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        logging.getLogger(__name__).debug("math_verify failed on %r vs %r", answer, gold, exc_info=True)
        return False


def _serve() -> None:
    """Helper-process loop: one JSON request [answer, gold, timeout_s] per line in, one JSON bool out."""
    for line in sys.stdin:
        answer, gold, timeout_s = json.loads(line)
        print(json.dumps(_math_verify_equal(answer, gold, timeout_s)), flush=True)


class _Helper:
    """The helper process for checks off the main thread (one at a time; restarted after a kill)."""

    STARTUP_S = 120.0  # first request: allowance for starting Python and importing sympy/math_verify

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def check(self, answer: str, gold: str, timeout_s: float) -> bool:
        with self.lock:
            budget = 10 * max(1, math.ceil(timeout_s)) + 5  # a few parses and comparisons, each alarm-bounded
            try:
                if self.proc is None or self.proc.poll() is not None:
                    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('_fastpmd_rewards', "
                            f"{__file__!r}); m = u.module_from_spec(s); sys.modules[s.name] = m; "
                            "s.loader.exec_module(m); m._serve()")
                    self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    budget += self.STARTUP_S
                self.proc.stdin.write(json.dumps([answer, gold, timeout_s]) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], budget)
                line = self.proc.stdout.readline() if ready else ""
                if line:
                    return bool(json.loads(line))
            except (OSError, ValueError):
                pass
            self.stop()  # timed out or broken: kill it, the next check starts a fresh one
            return False


_HELPER = _Helper()


def is_equivalent(answer: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """True when ``answer`` matches ``gold``: normalised exact match, else math_verify (gold first).

    Never raises on bad input strings and never hangs (see the module docstring): errors and time-outs give
    False.
    """
    if normalize_answer(answer) == normalize_answer(gold):
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if threading.current_thread() is threading.main_thread():
        return _math_verify_equal(answer, gold, timeout_s)
    return _HELPER.check(answer, gold, timeout_s)


def math_reward(
    response: str,
    gold: str,
    *,
    style: str = "dapo",
    correct: float = 1.0,
    incorrect: float = -1.0,
    timeout_s: float = 5.0,
) -> float:
    """``correct`` when the answer extracted from ``response`` (see ``extract_answer``) equals ``gold``.

    No answer, a wrong answer, a parse failure or a time-out all give ``incorrect``.
    """
    if not isinstance(gold, str):
        raise ValueError(f"gold must be a str, got {type(gold).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    ans = extract_answer(response, style)
    if ans is None:
        return float(incorrect)
    if style == "arith":
        return float(correct if ans == gold.strip() else incorrect)
    return float(correct if is_equivalent(ans, gold, timeout_s=timeout_s) else incorrect)


@dataclass(frozen=True)
class RewardConfig:
    """Reward options. ``style``: dapo | boxed | auto (math, math_verify) or arith (exact match of the first
    line, the synthetic arithmetic task): the built-in answer check, used when no function is named and by
    evaluation. ``function``: one reward function, a built-in style by name ("dapo") or the user's own
    ("module:function" or "path/to/file.py:function", TRL's convention, see ``reward_functions.py``);
    ``functions`` + ``weights``: several, summed with these weights (default 1 each), like TRL's
    ``reward_funcs`` + ``reward_weights``."""

    style: str = "dapo"
    correct: float = 1.0
    incorrect: float = -1.0
    timeout_s: float = 5.0
    function: str = ""
    functions: tuple = ()
    weights: tuple = ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.function and self.functions:
            raise ValueError("functions and function: set one of them, not both")
        specs, name = self.specs(), "function" if self.function else "functions"
        for spec in specs:
            if not isinstance(spec, str) or not (spec in STYLES or ":" in spec):
                raise ValueError(f"{name} {spec!r} is neither a built-in ({', '.join(STYLES)}) nor "
                                 "'module:function' / 'path/file.py:function'")
        if self.weights and len(self.weights) != len(specs):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(specs)} reward function(s)")
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weights must be finite numbers, got {w!r}")

    def specs(self) -> tuple:
        """The reward functions named by ``function`` or ``functions``; () = the task's built-in check."""
        return (self.function,) if self.function else tuple(self.functions)


def score_batch(responses: Sequence[str], golds: Sequence[str], cfg: RewardConfig = RewardConfig()) -> torch.Tensor:
    """Rewards of a batch of decoded responses against their gold answers -> ``[B]`` float32 (CPU)."""
    if len(responses) != len(golds):
        raise ValueError(f"responses and golds must have the same length, got {len(responses)} and {len(golds)}")
    out = [
        math_reward(r, g, style=cfg.style, correct=cfg.correct, incorrect=cfg.incorrect, timeout_s=cfg.timeout_s)
        for r, g in zip(responses, golds)
    ]
    import torch

    return torch.tensor(out, dtype=torch.float32)  # [B]
