"""memory_plan's arithmetic on a tiny spec worked out by hand, and the preset facts it reads."""
import pytest

from fastpmd.train import memory_plan as mp
from fastpmd.train.presets import get_preset

TINY = mp.Spec("t", layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, vocab=10, intermediate=8)


def test_parameter_counts_by_hand():
    # attention: q 4, kv 2 -> 4 x (4 + 2 + 2) + 4 x 4 = 48; MLP 3 x 4 x 8 = 96; two norms 8 -> block 152
    assert (TINY.attn_params(), TINY.block_params(), TINY.root_params()) == (48, 152, 84)  # root 2 x 10 x 4 + 4
    assert TINY.total_params() == 2 * 152 + 84 == 388
    assert mp.QWEN25_7B.total_params() == pytest.approx(7.62e9, rel=2e-3)  # the published 7.6B
    assert mp.QWEN3_30B_A3B.total_params() == pytest.approx(30.5e9, rel=3e-3)
    assert mp.QWEN3_30B_A3B.active_params() == pytest.approx(3.3e9, rel=2e-2)


def test_update_plan_by_hand():
    p = {k: v * mp.GB for k, v in mp.update_plan(TINY, 2, 3, chunk_bytes=100).items()}  # bytes
    assert p["params fp32 (sharded)"] == pytest.approx(4 * 388 / 2)  # 776
    assert p["AdamW m, v fp32 (sharded)"] == pytest.approx(8 * 388 / 2)  # 1552
    assert p["gathered bf16: root + 2 blocks"] == pytest.approx(2 * (84 + 2 * 152))  # 776
    assert p["unsharded fp32 grads: root + 1 block"] == pytest.approx(4 * (84 + 152))  # 944
    # block for T = 3: attention 3 x (8 + 4 + 4 + 4 + 4) x 2 + lse 3 x 2 x 4 = 168; MLP input + gate, up,
    # silu(gate), product: 3 x (4 + 4 x 8) x 2 = 216 -> 384; block inputs 2 x 3 x 4 x 2 = 48; final hidden + grad 48
    assert TINY.mlp_saved_bytes(3) == 216 and TINY.block_activation_bytes(3) == 384
    act = [v for k, v in p.items() if k.startswith("activations")]
    assert act == [pytest.approx(48 + 2 * 384 + 48)]  # 864
    full = {k: v * mp.GB for k, v in mp.update_plan(TINY, 2, 3, chunk_bytes=100, checkpointing=False).items()}
    assert [v for k, v in full.items() if k.startswith("activations")] == [pytest.approx(3 * 384 + 48)]
    assert p["loss (fused, chunked)"] == pytest.approx(2 * 100 + 4 * 10 * 4)  # 360
    assert p["foreach-AdamW temporary (optimizer step)"] == pytest.approx(4 * 388 / 2)
    assert p["backward"] == pytest.approx(3104 + 776 + 944 + 864 + 360)  # 6048
    assert p["optimizer step"] == pytest.approx(3104 + 776)  # state + the sqrt temporary: 20 B / param / N
    assert p["peak"] == pytest.approx(6048)
    naive = {k: v * mp.GB for k, v in mp.update_plan(TINY, 2, 3, fused=False).items()}
    assert naive["loss (naive logits)"] == pytest.approx(3 * 10 * (2 + 4 + 4))
    off = {k: v * mp.GB for k, v in mp.update_plan(TINY, 2, 3, chunk_bytes=100, cpu_offload=True).items()}
    assert off["optimizer step"] == 0 and off["peak"] == pytest.approx(6048 - 3104)


def test_rollout_plan_by_hand():
    gb = 4000 / mp.GB  # a 4000-byte "GPU"
    p = {k: v * mp.GB for k, v in mp.rollout_plan(TINY, 2, gb, tp=1, utilization=0.5, max_len=5).items()
         if k not in ("vllm_fits", "full-length sequences in the KV cache")}
    assert p["vLLM weights bf16 (1/TP)"] == pytest.approx(776)
    assert p["vLLM KV cache (rest of its share)"] == pytest.approx(2000 - 776)
    assert p["trainer: fp32 params + AdamW m, v (sharded)"] == pytest.approx(12 * 388 / 2)
    assert p["total"] == pytest.approx(2000 + 2328)
    # K and V, 2 layers, 1 KV head of width 2, bf16: 16 B per token; 1224 B / (16 x 5) = 15.3 sequences
    assert TINY.kv_bytes_per_token() == 16
    r = mp.rollout_plan(TINY, 2, gb, tp=1, utilization=0.5, max_len=5)
    assert r["full-length sequences in the KV cache"] == pytest.approx(1224 / 80)
    r2 = mp.rollout_plan(TINY, 2, gb, tp=2, utilization=0.5, max_len=5, offload_during_rollout=True)
    assert r2["trainer: fp32 params + AdamW m, v (sharded)"] == 0 and r2["total"] * mp.GB == pytest.approx(2000)
    assert r2["full-length sequences in the KV cache"] == pytest.approx((2000 - 388) / 80)  # 1 KV head kept
    assert not mp.rollout_plan(TINY, 2, 1000 / mp.GB, utilization=0.5)["vllm_fits"]  # 776 B > 500 B


def test_preset_facts():
    cfg = get_preset("qwen2.5-7b-dapo")
    # 512 prompts, 16 mini-batches of whole prompt groups: 512 / W must split into 16 -> W divides 32
    assert mp.accepted_gpu_counts(cfg) == [1, 2, 4, 8, 16, 32]
    text = mp.tables("qwen3-30b-a3b-dapo")
    assert "3 GPUs" not in text and "10 GPUs" not in text  # counts the config rejects are never offered
    assert "16 GPUs (preset)" in text and "- 16 GPUs: fits" in text
    assert "- 8 GPUs: exit 2: `config parallel.gpus:" in text  # the 8-GPU update is over the line
