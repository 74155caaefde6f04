"""Every user error of `fastpmd train` / `fastpmd demo` exits 2 with one line naming the field, before any
process group or model exists; `--set` values are type-checked against the config field."""
import pytest
import torch

from fastpmd.train import cli as train_cli
from fastpmd.train.cli import build_config


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as the process group (where the model is built)."""
    import fastpmd.train.distributed as par

    def boom(*a, **k):
        raise AssertionError("the command went past its checks")

    monkeypatch.setattr(par, "init_distributed", boom)


def _used_out(tmp_path):
    out = tmp_path / "used"
    (out / "checkpoints" / "step_000003").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_000003\n")
    return out


def _a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


BAD = [  # (argv, field named in the message); {tmp} is replaced by the test's tmp_path
    (["--tau", "inf"], "loss.tau"),
    (["--tau", "nan"], "loss.tau"),
    (["--tau", "1e-40"], "loss.tau"),
    (["--temperature", "inf"], "rollout.temperature"),
    (["--lr", "inf"], "optim.lr"),
    (["--lr", "nan"], "optim.lr"),
    (["--backend", "triton"], "loss.backend"),  # CPU, no interpreter
    (["--device", "cuda"], "run.device"),
    (["--engine", "vllm"], "rollout.engine"),
    (["--set", "data.task='math'", "--data", "{tmp}/missing.jsonl"], "data.path"),
    (["--set", "data.task=math", "--data", "{tmp}/a_file.jsonl", "--eval-data", "{tmp}/nope.jsonl"], "data.eval_path"),
    (["--out", "{tmp}/a_file/run"], "run.out"),  # under a file: cannot be created
    (["--out", "{tmp}/a_file"], "run.out"),
    (["--out", "{tmp}/used"], "run.out"),  # holds a run, no --resume
    (["--set", "optim.lr=abc"], "optim.lr"),
    (["--set", "run.max_steps=2.5"], "run.max_steps"),
    (["--set", "run.max_steps=True"], "run.max_steps"),
    (["--set", "run.resume=1"], "run.resume"),
    (["--set", "optim.grad_clip=inf"], "optim.grad_clip"),
    (["--set", "reward.correct=nan"], "reward.correct"),
    (["--set", "optim.betas=(0.9,)"], "optim.betas"),
    (["--set", "optim.betas=abc"], "optim.betas"),
    (["--set", "optim.betas=(0.9, 1.5)"], "optim.betas"),
    (["--set", "model.arch_kwargs=5"], "model.arch_kwargs"),
    (["--set", "loss.length_norm=-1"], "loss.length_norm"),
    (["--set", "loss.epsilon_low=-1"], "loss.epsilon_low"),
    (["--set", "loss.epsilon_high=nan"], "loss.epsilon_high"),
    (["--set", "loss.estimator=3"], "loss.estimator"),
    (["--set", "loss.chunk_size=2.5"], "loss.chunk_size"),
    (["--set", "data.arith_kwargs={'max_operand': 0}"], "data.arith_kwargs"),
    (["--set", "data.arith_kwargs={'nope': 1}"], "data.arith_kwargs"),
    (["--set", "model.arch=''", "--model", "{tmp}/no-such-model"], "model.name_or_path"),
    (["--set", "model.tokenizer='./no-such-tokenizer'"], "model.tokenizer"),
    (["--set", "warmup.lr=nan"], "warmup"),
    (["--set", "model.arch_kwargs={'hidden_size': 0}"], "model.arch_kwargs"),
    (["--set", "model.arch_kwargs={'hidden_size': 63}"], "model.arch_kwargs"),  # 4 heads
    (["--set", "model.arch_kwargs={'nope': 1}"], "model.arch_kwargs"),
    (["--set", "model.arch_kwargs={'num_key_value_heads': 3}"], "model.arch_kwargs"),
    (["--set", "model.attn_implementation=flash_attention_2"], "model.attn_implementation"),
    (["--set", "model.tokenizer=''"], "model.tokenizer"),
    (["--data", "{tmp}/a_file.jsonl"], "model.tokenizer"),  # the task is the file's; the preset's char tokenizer
    (["--set", "data.task=math", "--data", "{tmp}/a_file"], "data.path"),  # not JSON lines
    (["--set", "model.arch=''", "--model", "{tmp}"], "model.name_or_path"),  # a directory without config.json
    (["--set", "rollout.eval_top_p=inf"], "rollout.eval_top_p"),
    (["--loss", "grpo", "--set", "loss.beta=0.04"], "loss.beta"),  # no reference model
    (["--tau-schedule", "mean-reward", "--tau", "1e-8"], "loss.tau"),  # outside the schedule's range
    (["--set", "run.timeout_min=1e300"], "run.timeout_min"),
    (["--set", "run.timeout_min=1e-9"], "run.timeout_min"),
    (["--set", "run.timeout_min=2e9"], "run.timeout_min"),
    (["--out", "/proc/fastpmd-no-such-dir"], "run.out"),
    (["--set", "data.max_prompt_len=0"], "data.max_prompt_len"),
    (["--set", "data.task=math", "--data", "{tmp}/a_file.jsonl", "--eval-data", "{tmp}/empty.jsonl"], "data.eval_path"),
    (["--set", "data.task=math", "--data", "{tmp}/empty.jsonl"], "data.path"),
    (["--set", "data.task=math", "--data", "{tmp}/null_answer.jsonl"], "data.path"),
]


@pytest.mark.parametrize("argv,field", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_error_exits_2_before_work(argv, field, tmp_path, no_work, capsys):
    _used_out(tmp_path)
    _a_file(tmp_path)
    (tmp_path / "a_file.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "null_answer.jsonl").write_text('{"prompt": "1+1", "answer": null}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "fresh")]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastpmd train: error: "), err
    assert field in err[0], err[0]
    assert not (tmp_path / "fresh").exists()  # nothing written


def test_set_values_take_the_field_type():
    cfg, _ = build_config(["--set", "optim.lr=1", "--set", "model.name_or_path=123", "--set", "loss.chunk_size=None",
                           "--set", "optim.betas=[0.8, 0.9]", "--set", "run.out=runs/x", "--set", "loss.tau=0.5"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.name_or_path == "123" and cfg.loss.chunk_size is None
    assert cfg.optim.betas == (0.8, 0.9) and cfg.run.out == "runs/x" and cfg.loss.tau == 0.5


def test_good_command_passes_preflight(tmp_path):
    cfg, _ = build_config(["--out", str(tmp_path / "new" / "run")])
    train_cli.validate(cfg)
    train_cli.preflight(cfg)
    cfg, _ = build_config(["--out", str(_used_out(tmp_path)), "--resume"])  # --resume may reuse it
    train_cli.preflight(cfg)


@pytest.mark.parametrize("argv,field", [
    (["--tau", "-1"], "--tau"), (["--tau", "inf"], "--tau"), (["--tokens", "0"], "--tokens"),
    (["--hidden", "0"], "--hidden"), (["--vocab", "0"], "--vocab"), (["--reps", "0"], "--reps"),
    (["--out", "{tmp}/a_file"], "--out"), (["--out", "{tmp}/a_file/sub"], "--out"),
])
def test_demo_errors(argv, field, tmp_path, capsys, monkeypatch):
    from fastpmd import demo

    monkeypatch.setattr(demo, "check_agreement", lambda tau: pytest.fail("the demo started"))
    _a_file(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and err[0].startswith("fastpmd demo: error:"), err


def test_fastpmd_command_routes_exit_status(tmp_path, no_work, capsys):
    from fastpmd.cli import main

    assert main(["train", "--tau", "inf", "--out", str(tmp_path / "x")]) == 2
    assert "loss.tau" in capsys.readouterr().err


def test_cuda_device_available_is_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, _ = build_config(["--device", "cuda", "--backend", "torch", "--out", str(tmp_path / "x")])
    train_cli.preflight(cfg)
