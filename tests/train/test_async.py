"""Asynchronous rollouts (rollout.mode="async", train/async_rollout.py): the staleness/overlap bookkeeping, the
config and launch checks, which inference rank serves which trainer rank, the bucketed weight push between two
gloo processes (bit-exact), 3-process runs of the tiny demo (1 inference rank, 2 trainer ranks) through the CLI,
and a 4-process one (2 + 2) with eval, warm-up and token-budget micro-batches that equals a colocated run."""
import json

import pytest

from train_helpers import GLOO_LEFT_EXIT, torchrun

from fastpmd.train.cli import build_config, main
from fastpmd.train.config import validate
from fastpmd.train.staleness import covered, min_version, overlap_frac, staleness


def test_staleness_and_bound():
    assert staleness(step=5, version=4) == 0 and staleness(step=5, version=2) == 2
    # the engine may make step j's batch with version j-1-k, and that batch is then exactly k updates old
    for k in range(4):
        for j in range(1, 8):
            assert staleness(j, min_version(j, k)) == k


def test_trainer_refuses_samples_older_than_k():
    from fastpmd.train.async_rollout import check_batch
    from fastpmd.train.rollout import SamplingConfig

    sampling = SamplingConfig(n=2, seed=3)
    msg = {"step": 5, "prompts": [[1, 2]], "sampling": sampling, "versions": [3, 3]}
    assert check_batch(msg, 5, [[1, 2]], sampling, k=1) == [1, 1]
    for bad, k in [({}, 0), ({"versions": [4, 2]}, 1), ({"versions": [5, 5]}, 1), ({"step": 4}, 1),
                   ({"prompts": [[1, 3]]}, 1), ({"sampling": SamplingConfig(n=2, seed=4)}, 1)]:
        with pytest.raises(RuntimeError, match="async rollout: step 5"):
            check_batch({**msg, **bad}, 5, [[1, 2]], sampling, k=k)


def test_overlap_frac():
    assert covered([(0, 2), (1, 3), (5, 6)], 0.5, 5.5) == pytest.approx(3.0)
    # window 0..10, trainer waited 0..2 (engine generating then: not overlap), engine also generated 6..8
    assert overlap_frac((0, 10), (0, 2), [(0, 2), (6, 8)]) == pytest.approx(0.2)
    assert overlap_frac((0, 10), (0, 0), [(-5, 20)]) == pytest.approx(1.0)
    assert overlap_frac((0, 10), (0, 1), []) == 0.0


def _cfg(*sets):
    cfg, _ = build_config(["--preset", "tiny-arith", *[a for s in sets for a in ("--set", s)]])
    return cfg


def test_config_checks():
    validate(_cfg("rollout.mode=async"))  # with the held-out eval (data.eval_size 200)
    validate(_cfg("rollout.mode=async", "rollout.inference_ranks=3"))
    validate(_cfg())  # colocated: the default, unchanged
    for sets, field in [(("rollout.mode=sync",), "rollout.mode"),
                        (("rollout.mode=async", "rollout.max_staleness=-1"), "rollout.max_staleness"),
                        (("rollout.mode=async", "rollout.inference_ranks=0"), "rollout.inference_ranks")]:
        with pytest.raises(ValueError, match=f"config {field}"):
            validate(_cfg(*sets))


@pytest.mark.parametrize("world, sets, field", [
    (None, [], "rollout.mode"),  # a plain process
    (2, ["rollout.inference_ranks=2"], "rollout.inference_ranks"),  # no trainer rank left
    (3, ["rollout.inference_ranks=2"], "rollout.inference_ranks"),  # 1 trainer rank for 2 inference ranks
    (5, ["rollout.inference_ranks=2"], "rollout.prompts_per_step"),  # 3 trainer ranks do not split 64 prompts
])
def test_async_launch_checks(tmp_path, capsys, monkeypatch, world, sets, field):
    """Refused on every rank before any process group (exit 2, one line naming the field)."""
    if world is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    rc = main(["--preset", "tiny-arith", "--out", str(tmp_path / "r"), "--set", "rollout.mode=async",
               *[a for s in sets for a in ("--set", s)]])
    assert rc == 2 and f"config {field}" in capsys.readouterr().err


def test_inference_ranks_serve_trainer_ranks_modulo():
    from fastpmd.train.async_link import Link

    link = Link(rank=0, world=5, trainers=3, weights=None, samples=None)  # 3 trainer + 2 inference ranks
    assert link.inference == 2 and [link.engine_of(r) for r in range(3)] == [3, 4, 3]
    assert link.served_by(3) == [0, 2] and link.served_by(4) == [1]


_PUSH_WORKER = """\
import torch
from fastpmd.train import async_link
from fastpmd.train.async_link import WeightPusher, WeightReceiver, init_async, recv_obj, send_obj

async_link.BUCKET_BYTES = 1000  # several buckets, one tensor larger than a bucket
from fastpmd.train.cli import build_config
cfg, _ = build_config(["--preset", "tiny-arith", "--set", "rollout.mode=async", "--set", "run.timeout_min=2.0"])
link, d = init_async(cfg)
shapes = {"a.weight": (7, 13), "b.bias": (5,), "big": (40, 30), "c": (3, 3)}
for version in (0, 1):
    g = torch.Generator().manual_seed(version)
    named = [(k, torch.randn(s, generator=g)) for k, s in shapes.items()]
    if link.is_trainer:
        pusher = pusher if version else WeightPusher(link.weights)
        pusher.push(version, named, torch.bfloat16)
        assert recv_obj(link.samples, 1) == version  # the receiver keeps only the newest push: one at a time
    else:
        recv = recv if version else WeightReceiver(link.weights)
        assert recv.wait(lambda: recv.latest is not None and recv.latest[1] == version)
        got = dict(recv.latest[2])
        assert list(got) == list(shapes)
        for k, t in named:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], t.to(torch.bfloat16)), k
        send_obj(link.samples, version, 0)
if link.is_trainer:
    pusher.close()
else:
    assert recv.wait(lambda: False) is False and recv.stopped
link.close()
"""


def test_weight_push_is_exact(tmp_path):
    """Two pushes in bf16 buckets (one tensor larger than a bucket) arrive bit-exact, names and order kept."""
    torchrun(_PUSH_WORKER, tmp_path, 2, timeout=120)


_ASYNC_RUN = """\
import sys
from fastpmd.train.cli import main
sys.exit(main(["--preset", "tiny-arith", "--out", sys.argv[1] + "/run", "--prompts-per-step", "4",
               "--group-size", "4", "--mini-batches", "1", "--warmup-steps", "2", "--max-new-tokens", "4",
               "--max-steps", "4", "--lr", "1e-2", "--lr-warmup-steps", "0", "--no-progress", "--no-plots",
               "--no-export", "--set", "data.eval_size=0", "--set", "rollout.mode=async",
               "--set", "optim.weight_decay=1.0",  # the weights change every step even where all rewards tie
               "--set", "rollout.max_staleness=1"]))
"""


@pytest.mark.slow
def test_async_three_processes(tmp_path):
    """1 inference + 2 trainer ranks, k = 1, 4 steps: staleness <= 1 and reaching 1; the first batch (weights of
    the warm-up's push, made before the start) has the trainer's log-probs (the push is exact); at every step
    the loss's Delta starts at 0 (pi_old is the trainer's recompute, not the stale engine log-probs, which differ
    by > 1e-3 once stale)."""
    # and no gloo thread left on any rank when main returns (the links and the trainers' group are gone)
    torchrun(_ASYNC_RUN.replace("sys.exit(main(", "rc = (main(") + GLOO_LEFT_EXIT, tmp_path, 3, timeout=300)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    st = [r["staleness_max"] for r in train]
    assert max(st) == 1 and st[0] == 0 and all(r["staleness_mean"] <= r["staleness_max"] for r in train)
    assert train[0]["rollout_logp_diff_mean"] < 1e-5
    for r in train:
        assert abs(r["logratio_mean"]) < 1e-6  # one mini-batch: Delta = log pi_theta - log pi_old = 0 at its start
        if r["staleness_max"] >= 1:
            assert r["rollout_logp_diff_mean"] > 1e-5
        assert 0.0 <= r["overlap_frac"] <= 1.0 and r["trainer_idle_s"] >= 0 and r["engine_idle_s"] >= 0
    assert max(r["overlap_frac"] for r in train[1:]) > 0.0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000004"


@pytest.mark.slow
def test_async_two_inference_ranks_k1_with_eval(tmp_path):
    """2 inference + 2 trainer ranks, k = 1, 3 steps, a held-out eval before and after every step (its chunks
    split over the two inference ranks, which may be generating ahead meanwhile): staleness <= 1 and reaching 1,
    every eval row logged where a colocated run logs it, the run finishes."""
    sets = ["data.eval_size=8", "rollout.eval_n=2", "rollout.eval_batch_size=4", "run.eval_every=1",
            "rollout.inference_ranks=2"]
    script = _ASYNC_RUN.replace('"--max-steps", "4"', '"--max-steps", "3"').replace(
        '"data.eval_size=0",', '"' + '", "--set", "'.join(sets) + '",')
    torchrun(script, tmp_path, 4, timeout=300)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("warmup", 0), ("eval", 0), ("train", 1), ("eval", 1),
                                                      ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    assert all(r["num_problems"] == 8 for r in rows if r["kind"] == "eval")
    st = [r["staleness_max"] for r in rows if r["kind"] == "train"]
    assert st[0] == 0 and max(st) == 1


def _torchrun_cmd(script, *args):
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(script), *args]


@pytest.mark.slow
def test_async_sigterm_saves_and_resume_finishes(tmp_path):
    """SIGTERM to the launcher (torchrun passes it to all three ranks): the trainers finish and save their step,
    stop the engine (whose in-flight batches are dropped) and exit 143; --resume regenerates from the saved
    prompt-stream states and the resumed weights (pushed before the start: the first batch has the trainers'
    log-probs) and finishes every step with the staleness bound kept."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "worker.py"
    script.write_text(_ASYNC_RUN.replace('"--max-steps", "4"', '"--max-steps", "12"')
                      .replace("main([", "main(sys.argv[2:] + ["))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_torchrun_cmd(script, str(tmp_path)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or metrics.read_text().count('"train"') < 2) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    train = [json.loads(x) for x in metrics.read_text().splitlines()]
    stopped_at = train[-1]["step"]
    assert 2 <= stopped_at < 12 and "stopped by SIGTERM after step" in err, err[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:06d}"
    done = subprocess.run(_torchrun_cmd(script, str(tmp_path), "--resume"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()][1:]  # the warm-up's row first
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["staleness_max"] <= 1 for r in rows) and rows[stopped_at]["staleness_max"] == 0  # restart
    assert rows[stopped_at]["rollout_logp_diff_mean"] < 1e-5


@pytest.mark.slow
def test_async_k0_equals_colocated(tmp_path):
    """At max_staleness 0 the engines generate each batch with exactly the trainers' weights (pushed in fp32),
    the same prompts and the same per-(step, rank) seeds, so 2 inference + 2 trainer async ranks (each inference
    rank serving one trainer rank) log the same rows as 2 colocated ranks, timing, memory and the async-only
    metrics aside: with a supervised warm-up (pushed before the start), a held-out eval before and after every
    step (run by the two inference ranks, each half of the chunks, with the weights the trainers held), and
    token-budget micro-batches with rank balancing on the trainer ranks."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_ASYNC_RUN.replace('"--max-steps", "4"', '"--max-steps", "2"')
                      .replace('"rollout.max_staleness=1"]))', '"rollout.max_staleness=0"] + sys.argv[3:]))')
                      .replace('sys.argv[1] + "/run"', 'sys.argv[2]')
                      .replace("sys.exit(main(", "rc = (main(") + GLOO_LEFT_EXIT)  # both modes end every group
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--warmup-steps", "2", "--lr", "0.1", "--set", "data.eval_size=8", "--set", "rollout.eval_n=4",
              "--set", "rollout.eval_batch_size=4", "--set", "run.eval_every=1",
              "--set", "optim.micro_batch_tokens=24", "--set", "optim.balance_ranks=True"]
    for name, nproc, extra in (("colocated", 2, ["--set", "rollout.mode=colocated"]),
                               ("async", 4, ["--set", "rollout.inference_ranks=2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(tmp_path), str(tmp_path / name), *common, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    skip = ("_s", "per_s", "per_token", "mem_", "staleness", "overlap")

    def rows(name):
        return [{k: v for k, v in json.loads(x).items() if not any(s in k for s in skip)}
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    colocated, asynchronous = rows("colocated"), rows("async")
    assert [r["kind"] for r in colocated] == ["warmup", "eval", "train", "eval", "train", "eval"]
    assert colocated[1]["num_problems"] == 8 and max(r["micro_batch_tokens_max"] for r in colocated[2::2]) <= 24
    evals = [r["mean_response_tokens"] for r in colocated if r["kind"] == "eval"]
    assert len(set(evals)) == 3  # the eval sees each step's weights (the AdamW decay alone changes them)
    assert colocated == asynchronous
