"""`fastpmd train --plan`: the memory plan of exactly the config (update, weight sync, rollout), exit 0 when all
fit under 90% of the GPU, else exit 2 with one line naming a field and a value that fits; the presets pass it at
their own GPU count."""
import pytest
import transformers

from fastpmd.train import config_plan as cp
from fastpmd.train import memory_plan as mp
from fastpmd.train.cli import build_config, main
from fastpmd.train.presets import get_preset


def run_plan(capsys, *argv):
    status = main(["--plan", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("preset", ["qwen2.5-7b-dapo", "qwen3-30b-a3b-dapo"])
def test_presets_fit_at_their_own_gpu_count(capsys, preset):
    status, out, err = run_plan(capsys, "--preset", preset)
    assert status == 0, err
    gpus = get_preset(preset).parallel.gpus
    assert f"{gpus} GPUs x 80 GB" in out and "DOES NOT FIT" not in out
    for moment in ("update:", "sync:", "rollout:"):
        assert moment in out


def test_30b_preset_choices():
    cfg = get_preset("qwen3-30b-a3b-dapo")
    assert (cfg.parallel.gpus, cfg.rollout.tensor_parallel_size, cfg.model.offload_during_rollout) == (16, 2, True)
    assert cfg.loss.rollout_correction == "tis" and cfg.loss.rollout_is_cap == 2.0
    p = cp.check(cfg, 16, 80.0)
    assert p.kv_sequences >= 64  # the KV budget holds many full-length sequences per engine


def test_infeasible_vllm_share_names_a_rollout_field(capsys):
    # 7B at a 16 GB share: its 15.2 GB of bf16 weights + workspace leave no KV cache at TP 1
    status, out, err = run_plan(capsys, "--preset", "qwen2.5-7b-dapo", "--set", "rollout.gpu_memory_utilization=0.2")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("fastpmd train: error: config rollout.tensor_parallel_size:") and "=2 would fit" in err
    # the old 30B preset (TP 1, utilization 0.5): vLLM's 61 GB of weights exceed its 40 GB share
    status, _, err = run_plan(capsys, "--preset", "qwen3-30b-a3b-dapo", "--set", "rollout.tensor_parallel_size=1",
                              "--set", "rollout.gpu_memory_utilization=0.5")
    assert status == 2 and err.startswith("fastpmd train: error: config rollout.")


def test_update_over_the_line_names_the_gpu_count(capsys):
    status, _, err = run_plan(capsys, "--preset", "qwen3-30b-a3b-dapo", "--gpus", "8")
    assert status == 2
    assert err.startswith("fastpmd train: error: config parallel.gpus: update needs") and "parallel.gpus=16" in err


def test_plan_needs_a_gpu_count(capsys):
    status, _, err = run_plan(capsys, "--preset", "tiny-arith")
    assert status == 2 and "config parallel.gpus" in err
    status, out, _ = run_plan(capsys, "--preset", "tiny-arith", "--gpus", "1", "--gpu-gb", "8")
    assert status == 0 and "update:" in out


def test_moments_are_the_plan_arithmetic():
    cfg, _ = build_config(["--preset", "qwen2.5-7b-dapo"])
    p = cp.plan(cfg, 8, 80.0)
    spec, P = mp.QWEN25_7B, mp.QWEN25_7B.total_params()
    assert p.peak("update") == pytest.approx(mp.update_plan(spec, 8, 16384)["peak"])
    sync = p.moments["sync"]  # no offload: fp32 params + AdamW m, v + vLLM's weights + one gathered unit x2
    assert sum(sync.values()) * mp.GB == pytest.approx(12 * P / 8 + 2 * P + 4 * spec.root_params())
    assert p.moments["rollout"]["vLLM weights bf16 (1/TP)"] + p.moments["rollout"]["vLLM workspace (allowance)"] + \
        p.moments["rollout"]["vLLM KV cache (fixed budget)"] == pytest.approx(0.5 * 80)
    cfg.model.offload_during_rollout = True  # AdamW leaves before the sync, params after it
    q = cp.plan(cfg, 8, 80.0)
    assert "trainer: AdamW m, v (sharded)" not in q.moments["sync"]
    assert q.moments["sync"]["trainer: fp32 params (sharded)"] * mp.GB == pytest.approx(4 * P / 8)
    assert set(q.moments["rollout"]) == {"vLLM weights bf16 (1/TP)", "vLLM workspace (allowance)",
                                         "vLLM KV cache (fixed budget)"}


def test_spec_from_hf_config_matches_the_preset_specs():
    q7 = transformers.Qwen2Config(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                                  num_key_value_heads=4, vocab_size=152064, intermediate_size=18944,
                                  tie_word_embeddings=False)
    assert mp.spec_from_hf_config(q7).total_params() == mp.QWEN25_7B.total_params()
    q30 = transformers.Qwen3MoeConfig(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32,
                                      num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
                                      num_experts_per_tok=8, moe_intermediate_size=768, tie_word_embeddings=False)
    s = mp.spec_from_hf_config(q30)
    assert (s.total_params(), s.active_params()) == (mp.QWEN3_30B_A3B.total_params(),
                                                     mp.QWEN3_30B_A3B.active_params())
    tied = mp.spec_from_hf_config(transformers.Qwen2Config(**{**q7.to_dict(), "tie_word_embeddings": True}))
    assert tied.total_params() == mp.QWEN25_7B.total_params() - 152064 * 3584


def test_hsdp_shards_within_a_replica_group(capsys):
    cfg = get_preset("qwen3-30b-a3b-dapo")
    flat = cp.plan(cfg, 8, 80.0)
    cfg.parallel.dp_replicate = 2  # 16 GPUs as 2 replicas of 8: the update of FSDP over 8
    hsdp = cp.plan(cfg, 16, 80.0)
    assert hsdp.shard == 8 and hsdp.moments["update"] == flat.moments["update"]
    status, _, err = run_plan(capsys, "--preset", "qwen3-30b-a3b-dapo", "--set", "parallel.dp_replicate=2")
    assert status == 2 and err.startswith("fastpmd train: error: config parallel.dp_replicate:") and "=1 would" in err
