"""The trainer end to end on tiny-arith for a few steps (single process, in-process), each loss by name, a tiny
Qwen3-MoE model, and torchrun over two gloo processes with a checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch


from fastpmd.train.cli import build_config
from fastpmd.train.trainer import Trainer

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
        "--warmup-steps", "2",
        "--eval-n", "1", "--set", "data.eval_size=4", "--max-new-tokens", "4", "--no-progress"]
KEYS = {"step", "reward_mean", "loss", "entropy", "logratio_min", "logratio_mean", "grad_norm", "response_len_mean",
        "tokens_per_s", "ms_per_token", "mem_peak_rss_gib"}


def _fit(tmp_path, d, *extra):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path), *extra])
    return Trainer(cfg, d).fit()


def test_tiny_arith_end_to_end(tmp_path, world_of_one):
    rows = _fit(tmp_path, world_of_one, "--max-steps", "3", "--save-every", "2")
    assert [r["step"] for r in rows] == [1, 2, 3]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert len(train) == 3 and KEYS <= train[0].keys()
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 3]  # before the first and after the last step
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert (tmp_path / "curves.png").stat().st_size > 0
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # the safetensors export loads
    assert model.config.model_type == "qwen2" and (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss", ["grpo", "pmd-part", "gspo", "pg", "cispo", "sapo", "luspo"])
def test_each_loss_runs(tmp_path, world_of_one, loss, monkeypatch):
    """The loss named on the command line is the one computed: every registry entry's function and fused path is
    spied on, and the logged loss is the sum of what the calls returned (a wrong dispatch or a dropped
    micro-batch fails)."""
    import dataclasses

    import fastpmd
    from fastpmd.registry import LOSSES

    seen, total = [], []

    def spy(fn, name):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(name)
            total.append(float(out[0].detach()))
            return out
        return wrapped

    for name, spec in LOSSES.items():
        monkeypatch.setitem(LOSSES, name, dataclasses.replace(
            spec, fn=spy(spec.fn, name), fused=spec.fused and spy(spec.fused, "fused " + name)))
    rows = _fit(tmp_path, world_of_one, "--loss", loss, "--max-steps", "1", "--no-export", "--no-plots",
                "--set", "data.eval_size=0")
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    assert seen and set(seen) == {"fused " + loss if LOSSES[loss].fused else loss}
    k = 2  # --mini-batches 2: the logged loss is the mean over the k optimizer steps of their summed micro-batches
    if LOSSES[loss].normaliser_of(fastpmd.LossConfig(name=loss)) != "batch":  # "batch" is reweighted after the call
        assert rows[0]["loss"] == pytest.approx(sum(total) / k, rel=1e-5)


USER_LOSS = """
import torch


def reinforce(logprobs, old_logprobs, advantages, mask, *, scale=1.0):
    seq = torch.where(mask, logprobs, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)  # [B] mean token log-prob
    loss = -(scale * (advantages + 0.1) * seq).mean()  # + 0.1: a gradient even where a group's rewards tie
    return loss, {"loss": loss.detach(), "user_scale": torch.tensor(scale), "user_seq_logp_min": seq.detach().min()}
"""


def test_user_loss_from_a_file_trains_and_logs_its_metrics(tmp_path, world_of_one):
    """loss.name="file.py:fn" trains without editing fastpmd; loss.options reach it; its metrics reach
    metrics.jsonl (a "_min" metric reduced as a min)."""
    (tmp_path / "my_loss.py").write_text(USER_LOSS)
    run = tmp_path / "run"
    cfg, _ = build_config(TINY + ["--out", str(run), "--max-steps", "2", "--no-export", "--no-plots",
                                  "--loss", f"{tmp_path}/my_loss.py:reinforce", "--set", "loss.options={'scale': 0.5}"])
    trainer = Trainer(cfg, world_of_one)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all(r["user_scale"] == 0.5 and r["user_seq_logp_min"] < 0 for r in train)
    assert all(r["grad_norm"] > 0 for r in train)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.policy.parameters()))
    with pytest.raises(ValueError, match="loss.name"):
        build_config(TINY + ["--out", str(run), "--loss", f"{tmp_path}/my_loss.py:missing"])


@pytest.mark.parametrize("arch", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_qwen3_and_moe_one_step(tmp_path, world_of_one, arch):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path), "--max-steps", "1", "--no-export", "--no-plots",
                                  "--set", f"model.arch={arch}", "--set", "data.eval_size=0",
                                  "--set", "model.activation_checkpointing=True"])
    trainer = Trainer(cfg, world_of_one)
    rows = trainer.fit()
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    # gradients reach every block through the fused loss (random advantages: a random model scores all zeros)
    batch = trainer.last_batch
    batch.advantages = torch.randn(batch.advantages.shape, generator=torch.Generator().manual_seed(0))
    trainer.accumulate_gradients(batch, torch.arange(batch.advantages.numel()))
    grads = {n: p.grad for n, p in trainer.policy.named_parameters() if p.grad is not None}
    assert any("lm_head" in n for n in grads) and any("layers.1." in n for n in grads)
    assert sum(float(g.full_tensor().square().sum()) for g in grads.values()) > 0
    if arch == "tiny-qwen3-moe":
        assert any("experts" in n for n in grads)


@pytest.mark.slow
def test_torchrun_two_processes_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastpmd.train",
           *TINY, "--max-steps", "2", "--save-every", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    ckpt = tmp_path / "checkpoints" / "step_000002"
    assert (ckpt / "rank0.pt").is_file() and (ckpt / "rank1.pt").is_file() and (ckpt / ".metadata").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _local_hf_tokenizer(path):
    """A small byte-level BPE tokenizer trained in memory and saved as a Hugging Face tokenizer (no download)."""
    from byo_helpers import bpe_tokenizer

    bpe_tokenizer(["Solve the following math problem step by step. Answer: 42", "What is 1+1?"], 400).save_pretrained(path)


def test_math_task_with_hf_tokenizer(tmp_path, world_of_one):
    """The math path: problem file, DAPO template, HF tokenizer, math-verify rewards (+1/-1), epoch shuffling."""
    _local_hf_tokenizer(tmp_path / "tok")
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(5)))
    cfg, _ = build_config(TINY + ["--out", str(tmp_path / "run"), "--max-steps", "2", "--warmup-steps", "0",
                                  "--prompts-per-step", "4", "--group-size", "2", "--mini-batches", "1",
                                  "--max-new-tokens", "6", "--data", str(problems), "--eval-data", str(problems),
                                  "--no-export", "--no-plots", "--set", "data.task='math'",
                                  "--set", f"model.tokenizer='{tmp_path / 'tok'}'", "--set", "reward.incorrect=-1.0"])
    trainer = Trainer(cfg, world_of_one)
    assert trainer.task.template.startswith("Solve the following math problem")
    rows = trainer.fit()
    assert len(rows) == 2 and all(-1.0 <= r["reward_mean"] <= 1.0 for r in rows)
    assert trainer.task.state_dict() == {"position": 8}  # 2 steps x 4 prompts, across an epoch boundary (5)
