"""Problem files fail loudly: an invalid JSON line is reported with its own line number, and a null, list or
dict answer is an error naming the file and the line (jsonl) or record (json, parquet) instead of training
against its str()."""
import json

import pytest

from fastpmd.train.task.data import load_problems


def _jsonl(tmp_path, lines):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_invalid_json_names_its_line(tmp_path):
    f = _jsonl(tmp_path, ['{"problem": "a", "answer": "1"}', "", '{"problem": "b", "answer": '])
    with pytest.raises(ValueError, match=r"p\.jsonl line 3: invalid JSON"):
        load_problems(f)


@pytest.mark.parametrize("answer", [None, [1, 2], {"x": 1}, True])
def test_answer_that_is_not_a_string_or_number_names_file_and_line(tmp_path, answer):
    f = _jsonl(tmp_path, ['{"problem": "a", "answer": "1"}', "",
                          json.dumps({"problem": "b", "answer": answer})])
    with pytest.raises(ValueError, match=r"p\.jsonl line 3: answer must be a string or a number"):
        load_problems(f)


def test_json_records_name_the_record(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"problem": "a", "answer": 3}, {"problem": "b", "answer": None}]))
    with pytest.raises(ValueError, match=r"p\.json record 2: answer must be a string or a number, got None"):
        load_problems(f)


def test_numbers_stay_answers(tmp_path):
    f = _jsonl(tmp_path, ['{"problem": "a", "answer": 204}', '{"problem": "b", "answer": 2.5}'])
    assert [p.answer for p in load_problems(f)] == ["204", "2.5"]
