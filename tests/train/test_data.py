"""Problems, prompts, the arithmetic task, the char tokenizer and batch packing."""
import json
import random

import pytest
import torch

from fastpmd.train.task.arithmetic import ArithmeticTask
from fastpmd.train.task.data import DAPO_TEMPLATE, Problem, format_prompt, load_problems
from fastpmd.train.packing import pack_batch
from fastpmd.train.task.tokenizer import CharTokenizer
from fastpmd.train.task.rewards import math_reward


def _dapo_record(q, a, idx):
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_TEMPLATE.replace("{question}", q)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": idx},
    }


def test_load_dapo_jsonl_dedups_and_strips_template(tmp_path):
    recs = [_dapo_record("What is $1+1$?", "2", "a"), _dapo_record("Find  x if x^2 = {4}.", "2", "b"),
            _dapo_record("what is $1+1$?  ", "2", "c")]  # duplicate up to case/whitespace
    f = tmp_path / "dapo.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    probs = load_problems(f)
    assert [p.id for p in probs] == ["a", "b"]
    assert probs[0] == Problem(prompt="What is $1+1$?", answer="2", id="a")
    assert probs[1].prompt == "Find  x if x^2 = {4}."
    # the template goes back exactly once
    assert format_prompt(probs[0]) == recs[0]["prompt"][0]["content"]
    assert load_problems(f, limit=1) == probs[:1]


def test_load_aime_json_columns_and_records(tmp_path):
    rows = [{"ID": "2024-I-1", "problem": "P1", "answer": 204}, {"ID": "2024-I-2", "problem": "P2", "answer": 25}]
    f = tmp_path / "aime.json"
    f.write_text(json.dumps(rows))
    probs = load_problems(f)
    assert probs == [Problem("P1", "204", "2024-I-1"), Problem("P2", "25", "2024-I-2")]
    g = tmp_path / "aime_cols.json"
    g.write_text(json.dumps({"question": ["Q1", "Q2"], "answer": ["1", "2"]}))
    probs = load_problems(g)
    assert [(p.prompt, p.answer) for p in probs] == [("Q1", "1"), ("Q2", "2")]
    assert len({p.id for p in probs}) == 2  # hashed ids when the data has none


def test_load_custom_keys_and_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"q": "Q", "meta": {"gt": "7"}}) + "\n")
    assert load_problems(f, prompt_key="q", answer_key="meta.gt")[0].answer == "7"
    with pytest.raises(ValueError, match="prompt_key"):
        load_problems(f)
    with pytest.raises(FileNotFoundError, match="hf:"):
        load_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        load_problems(bad)
    with pytest.raises(ValueError, match="limit"):
        load_problems(f, limit=-1)


def test_format_prompt():
    p = Problem("Compute $\\frac{1}{2}$ of {x}.", "1", "0")
    text = format_prompt(p)
    assert text.startswith("Solve the following math problem step by step.")
    assert "Compute $\\frac{1}{2}$ of {x}." in text and text.endswith('after "Answer:".')
    assert format_prompt("12+7=", "{question}") == "12+7="
    with pytest.raises(ValueError, match="template"):
        format_prompt(p, "no placeholder")


def test_arithmetic_task_split_and_answers():
    task = ArithmeticTask(seed=3, max_operand=15, ops=("+", "-", "*"))
    held = task.heldout()
    held_ids = {p.id for p in held}
    train = task.sample(2000)
    assert held and not held_ids & {p.id for p in train}
    for p in train[:50] + held:
        expr = p.prompt[:-1]
        assert p.prompt.endswith("=") and p.answer == str(eval(expr))  # noqa: S307 (digits and one operator)
    # the held-out set is fixed: the same for another seed, in the same order
    assert ArithmeticTask(seed=99, max_operand=15, ops=("+", "-", "*")).heldout(5) == held[:5]
    # sampling is reproducible per seed / rng
    assert ArithmeticTask(seed=3).sample(10) == ArithmeticTask(seed=3).sample(10)
    assert task.sample(10, random.Random(0)) == task.sample(10, random.Random(0))
    with pytest.raises(ValueError, match="n must be"):
        task.heldout(len(held) + 1)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTask(max_operand=0)


def arith_reward(response, gold, correct=1.0, incorrect=0.0):
    return math_reward(response, gold, style="arith", correct=correct, incorrect=incorrect)


def test_arith_reward():
    assert arith_reward("19", "19") == 1.0
    assert arith_reward("19\n7+1=8", "19") == 1.0
    assert arith_reward("191", "19") == 0.0
    assert arith_reward("", "19") == 0.0
    assert arith_reward("-3", "-3", correct=1.0, incorrect=-1.0) == 1.0
    assert arith_reward("3", "-3", correct=1.0, incorrect=-1.0) == -1.0


def test_char_tokenizer_roundtrip(tmp_path):
    tok = CharTokenizer()
    assert tok.vocab_size == 3 + len(CharTokenizer.DEFAULT_CHARS)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    ids = tok.encode("12+7=", add_bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids) == "12+7="
    resp = tok.encode("19\n", add_eos=True) + tok.encode("55")
    assert tok.decode(resp) == "19\n"  # stops at eos
    assert tok.decode(resp, until_eos=False) == "19\n55"
    assert tok.decode([tok.pad_id] + tok.encode("3")) == "3"
    with pytest.raises(ValueError, match="text"):
        tok.encode("a")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    tok.save_pretrained(tmp_path / "ck")
    again = CharTokenizer.from_pretrained(tmp_path / "ck")
    assert again.chars == tok.chars and again.encode("9*9=") == tok.encode("9*9=")
    with pytest.raises(FileNotFoundError):
        CharTokenizer.from_pretrained(tmp_path)


def test_pack_batch_shift_convention():
    prompts = [[11, 12, 13], [21]]
    responses = [[14, 2], [22, 23, 24, 25, 2]]
    out = pack_batch(prompts, responses, pad_id=0)
    assert out.input_ids.tolist() == [[11, 12, 13, 14, 2, 0], [21, 22, 23, 24, 25, 2]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]]
    assert out.targets.tolist() == [[12, 13, 14, 2, 0, 0], [22, 23, 24, 25, 2, 0]]
    assert out.loss_mask.tolist() == [[False, False, True, True, False, False], [True] * 5 + [False]]
    assert out.loss_mask.dtype == torch.bool
    # position t predicts t+1: the masked targets are exactly the responses, in order
    for b in range(2):
        assert out.targets[b][out.loss_mask[b]].tolist() == responses[b]
    assert out.prompt_lengths.tolist() == [3, 1] and out.response_lengths.tolist() == [2, 5]
    # an empty response contributes nothing
    empty = pack_batch([[5, 6]], [[]], pad_id=0)
    assert not empty.loss_mask.any()


def test_pack_batch_validation():
    with pytest.raises(ValueError, match="same length"):
        pack_batch([[1]], [], 0)
    with pytest.raises(ValueError, match="prompt_ids"):
        pack_batch([[]], [[1]], 0)


def test_optional_readers_name_the_extra(tmp_path, monkeypatch):
    import sys

    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"fastpmd\[data\]"):
        load_problems(f)
    monkeypatch.setitem(sys.modules, "datasets", None)  # the hub path is opt-in ("hf:") and never runs here
    with pytest.raises(ImportError, match=r"fastpmd\[data\]"):
        load_problems("hf:BytedTsinghua-SIA/DAPO-Math-17k")


def test_parquet_dapo_and_aime_schemas(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    dapo = tmp_path / "dapo.parquet"
    pq.write_table(pa.table({
        "prompt": [[{"role": "user", "content": "What is 2+3?"}], [{"role": "user", "content": "What is 2+3?"}],
                   [{"role": "user", "content": "Compute 7*6."}]],
        "reward_model": [{"ground_truth": "5", "style": "rule"}, {"ground_truth": "5", "style": "rule"},
                         {"ground_truth": "42", "style": "rule"}],
    }), dapo)
    probs = load_problems(dapo)
    assert [p.answer for p in probs] == ["5", "42"]  # the duplicate prompt is dropped
    assert "2+3" in probs[0].prompt
    aime = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"problem": ["Find x if x+1=3."], "answer": ["2"]}), aime)
    (p,) = load_problems(aime)
    assert p.answer == "2" and "x+1=3" in p.prompt
