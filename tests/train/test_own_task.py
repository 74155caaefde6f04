"""Bring your own task (issue 21): `--model DIR` and `--data FILE` replace the preset's task-specific parts, the
user's keys, templates and chat template, and every incompatible combination is one line, exit 2, before any
model is built."""
import json

import pytest

from fastpmd.train import cli as train_cli
from fastpmd.train.cli import build_config
from fastpmd.train.task.data import load_problems

from byo_helpers import tiny_model_dir, user_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("byo") / "tiny")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as the process group (where the model is built)."""
    import fastpmd.train.distributed as par

    monkeypatch.setattr(par, "init_distributed", lambda *a, **k: pytest.fail("the command went past its checks"))


def _exit_2(argv, capsys, field):
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastpmd train: error: config "), err
    assert field in err[0], err[0]
    return err[0]


def test_model_dir_replaces_the_presets_arch_tokenizer_and_warmup(model_dir, tmp_path):
    cfg, _ = build_config(["--model", str(model_dir)])
    assert (cfg.model.arch, cfg.model.arch_kwargs, cfg.model.tokenizer, cfg.warmup.steps) == ("", {}, "", 0)
    assert cfg.data.task == "arithmetic"  # no --data: the preset's task, with the model's own tokenizer
    cfg, _ = build_config(["--model", str(model_dir), "--warmup-steps", "5", "--set", "model.tokenizer=char"])
    assert cfg.warmup.steps == 5 and cfg.model.tokenizer == "char"  # what the user sets stays
    cfg, _ = build_config(["--data", str(user_jsonl(tmp_path / "d.jsonl"))])
    assert cfg.data.task == "math" and cfg.data.arith_kwargs == {} and cfg.warmup.steps == 0
    cfg, _ = build_config(["--model", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--out",
                           str(tmp_path / "o"), "--set", "data.prompt_key=input.text", "--set",
                           "data.answer_key=target"])
    train_cli.validate(cfg)
    train_cli.preflight(cfg)


def test_data_file_with_the_presets_char_tokenizer_names_the_setting(tmp_path, no_work, capsys):
    data = user_jsonl(tmp_path / "d.jsonl")
    _exit_2(["--data", str(data), "--set", "data.prompt_key=input.text", "--set", "data.answer_key=target",
             "--out", str(tmp_path / "o")], capsys, "model.tokenizer")
    # the old workaround (task math, no warm-up) reached the tokenizer: "character 'S' is not in the vocabulary"
    _exit_2(["--data", str(data), "--set", "data.task=math", "--warmup-steps", "0", "--set",
             "data.prompt_key=input.text", "--set", "data.answer_key=target", "--out", str(tmp_path / "o")],
            capsys, "model.tokenizer")


def test_warmup_outside_arithmetic_is_a_config_error(model_dir, tmp_path, no_work, capsys):
    data = user_jsonl(tmp_path / "d.jsonl")
    _exit_2(["--model", str(model_dir), "--data", str(data), "--warmup-steps", "10", "--set",
             "data.prompt_key=input.text", "--set", "data.answer_key=target", "--out", str(tmp_path / "o")],
            capsys, "warmup.steps")


@pytest.mark.parametrize("sets,field", [
    (["data.prompt_key=question"], "prompt_key"),  # not a field of the records
    (["data.answer_key=input.nope"], "answer_key"),
    (["data.template='Q: no placeholder'"], "data.template"),
    (["reward.function=./missing_reward.py:fn"], "reward.function"),
    (["reward.function=json:no_such_function"], "reward.function"),
    (["reward.function=no_colon_here"], "reward.function"),
    (["reward.functions=['dapo', 'boxed']", "reward.weights=(1.0,)"], "reward.weights"),
    (["reward.function=dapo", "reward.functions=['boxed']"], "reward.functions"),
    (["run.wandb_tags=(1, 2)"], "run.wandb_tags"),
])
def test_bad_own_task_settings_exit_2(sets, field, model_dir, tmp_path, no_work, capsys):
    data = user_jsonl(tmp_path / "d.jsonl")
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    if not any(s.startswith("data.prompt_key") for s in sets):
        argv += ["--set", "data.prompt_key=input.text"]
    if not any(s.startswith("data.answer_key") for s in sets):
        argv += ["--set", "data.answer_key=target"]
    for s in sets:
        argv += ["--set", s]
    _exit_2(argv, capsys, field)


def test_own_keys_dotted_paths_and_extra_columns(tmp_path):
    data = user_jsonl(tmp_path / "d.jsonl", n=3)
    probs = load_problems(data, prompt_key="input.text", answer_key="target")
    assert [(p.prompt, p.answer) for p in probs] == [(f"Say the number {i}.", str(i)) for i in range(3)]
    assert [p.columns for p in probs] == [{"difficulty": i % 3} for i in range(3)]
    with pytest.raises(ValueError, match="prompt_key: 'input.txt' is not a field"):
        load_problems(data, prompt_key="input.txt", answer_key="target")


def test_unreachable_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        load_problems("hf:fastpmd-nobody/no-such-data", split="test", config="main")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot load hub data set 'fastpmd-nobody/no-such-data'")
    assert "data.config='main'" in msg and "data.split='test'" in msg


def _task(cfg):
    from fastpmd.train.task.prompts import Task
    from fastpmd.train.task.tokenizer import make_tokenizer

    return Task(cfg, make_tokenizer(cfg), 0, 1)


def test_template_and_chat_template_switches(tmp_path):
    chat = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    model = tiny_model_dir(tmp_path / "chat", chat_template=chat)
    data = user_jsonl(tmp_path / "d.jsonl", n=2)
    base = ["--model", str(model), "--data", str(data), "--set", "data.prompt_key=input.text", "--set",
            "data.answer_key=target"]
    task = _task(build_config(base)[0])  # defaults: the DAPO template, the tokenizer's chat template
    text = task.tok.tok.decode(task.encode(task.problems[0]))
    assert text.startswith("<|user|>Solve the following math problem") and text.endswith("<|assistant|>")
    task = _task(build_config(base + ["--set", "data.template='Q: {question}\\nA:'",
                                      "--set", "data.chat_template=False"])[0])
    p = task.problems[0]
    assert task.encode(p) == task.tok.tok.encode(f"Q: {p.prompt}\nA:")
    task = _task(build_config(base + ["--set", "data.template=none", "--set", "data.chat_template=False"])[0])
    assert task.encode(task.problems[0]) == task.tok.tok.encode(task.problems[0].prompt)
    with pytest.raises(ValueError, match="config data.chat_template: .* has no chat template"):
        _task(build_config(["--model", str(tiny_model_dir(tmp_path / "plain")), "--data", str(data), "--set",
                            "data.prompt_key=input.text", "--set", "data.answer_key=target",
                            "--set", "data.chat_template=True"])[0])


def test_print_config_lists_the_new_fields(model_dir, capsys):
    assert train_cli.main(["--model", str(model_dir), "--print-config", "--set", "run.wandb_project=p"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["run"]["wandb_project"] == "p" and cfg["data"]["chat_template"] is None
    assert {"prompt_key", "answer_key", "split", "config", "template"} <= set(cfg["data"])
    assert {"function", "functions", "weights"} <= set(cfg["reward"])


def test_model_folder_of_a_char_tokenizer_run_keeps_its_tokenizer(tmp_path, no_work, capsys):
    """A folder exported by a tiny-arith run (`fastpmd study` trains from one) carries its CharTokenizer."""
    from fastpmd.train.task.tokenizer import CharPromptTokenizer, CharTokenizer, make_tokenizer

    folder = tmp_path / "hf"
    CharTokenizer("0123+=").save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    cfg, _ = build_config(["--model", str(folder)])
    tok = make_tokenizer(cfg)
    assert isinstance(tok, CharPromptTokenizer) and tok.chars == "0123+="
    _exit_2(["--model", str(folder), "--data", str(user_jsonl(tmp_path / "d.jsonl")), "--out", str(tmp_path / "o"),
             *["--set", "data.prompt_key=input.text", "--set", "data.answer_key=target"]], capsys, "model.tokenizer")


def test_a_column_named_like_a_reward_argument_is_a_config_error(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say 1.", "answer": "1", "answers": ["1", "one"]}) + "\n")
    cfg, _ = build_config(["--model", str(model_dir), "--data", str(data)])
    with pytest.raises(ValueError, match=r"config data.path: the field\(s\) \['answers'\] .* clash"):
        _task(cfg)


def test_unreachable_hub_exits_2_before_the_model(model_dir, tmp_path, monkeypatch, capsys):
    from fastpmd.train.trainer import Trainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(Trainer, "_build_policy", lambda self: pytest.fail("the model was built"))
    err = _exit_2(["--model", str(model_dir), "--data", "hf:fastpmd-nobody/no-such-data", "--set",
                   "data.config=main", "--out", str(tmp_path / "o"), "--set", "run.threads=1"], capsys, "data.path")
    assert "cannot load hub data set 'fastpmd-nobody/no-such-data'" in err


def test_template_the_char_tokenizer_cannot_encode_names_the_settings(tmp_path):
    cfg, _ = build_config(["--set", "data.template='Question: {question}'", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"config model.tokenizer: cannot encode the prompt 'Question: .* "
                                         r"\(data.template 'Question: \{question\}'\): text: character 'Q'"):
        _task(cfg)
