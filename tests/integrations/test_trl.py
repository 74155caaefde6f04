"""fastpmd.integrations.trl against the installed TRL: FusedGRPOTrainer trains step for step like GRPOTrainer."""
import math

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

import trl_tiny  # noqa: E402
from fastpmd.integrations.trl import FusedGRPOTrainer  # noqa: E402

PARITY = {
    "default": {},
    "beta": {"beta": 0.04},
    "num_iterations": {"num_iterations": 2},
    "gspo": {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4, "loss_type": "grpo"},
    "temperature": {"temperature": 0.7},
}


def assert_same_steps(got, want):
    assert len(got) == len(want) >= 3
    assert sum(g["grad_norm"] > 0 for g in got) >= 2  # a step of equal rewards has no gradient
    for g, w in zip(got, want):
        assert math.isfinite(g["grad_norm"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), (got, want)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
        assert g.get("reward") == w.get("reward")  # same samples (logged on generation steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PARITY))
def test_fused_grpo_trains_like_trl(tmp_path, case):
    path = trl_tiny.saved_qwen2(tmp_path / "model")
    runs = [trl_tiny.train(cls, trl_tiny.grpo_args(tmp_path / cls.__name__, **PARITY[case]), path)[1]
            for cls in (GRPOTrainer, FusedGRPOTrainer)]
    assert_same_steps(runs[1], runs[0])


@pytest.mark.slow
def test_fused_grpo_peft_lora_like_trl(tmp_path):
    from peft import LoraConfig

    path = trl_tiny.saved_qwen2(tmp_path / "model")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    runs = [trl_tiny.train(cls, trl_tiny.grpo_args(tmp_path / cls.__name__, beta=0.04), path, peft_config=lora)[1]
            for cls in (GRPOTrainer, FusedGRPOTrainer)]  # beta: reference log-probs with the adapter disabled
    assert_same_steps(runs[1], runs[0])


@pytest.mark.slow
def test_fused_grpo_lm_head_bias_like_trl(tmp_path):
    model = trl_tiny.qwen2()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(0.3 * torch.randn(model.config.vocab_size))
    model.lm_head = head
    runs = [trl_tiny.train(cls, trl_tiny.grpo_args(tmp_path / cls.__name__), model)[1]
            for cls in (GRPOTrainer, FusedGRPOTrainer)]
    assert_same_steps(runs[1], runs[0])


@pytest.mark.slow
def test_fused_grpo_moe_aux_loss_like_trl(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=len(trl_tiny.WORDS), hidden_size=16, intermediate_size=32,
                         moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         output_router_logits=True, router_aux_loss_coef=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    runs = [trl_tiny.train(cls, trl_tiny.grpo_args(tmp_path / cls.__name__), model) for cls in
            (GRPOTrainer, FusedGRPOTrainer)]
    assert runs[1][0].aux_loss_enabled
    assert_same_steps(runs[1][1], runs[0][1])
    assert all(h["aux_loss"] > 0 for h in runs[1][1])
    assert [h["aux_loss"] for h in runs[1][1]] == pytest.approx([h["aux_loss"] for h in runs[0][1]], rel=1e-4)


def test_fused_grpo_rejects_softcapping_and_vision(tmp_path):
    model = trl_tiny.qwen2()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        trl_tiny.train(FusedGRPOTrainer, trl_tiny.grpo_args(tmp_path, max_steps=1), model)
    tr = FusedGRPOTrainer(model=trl_tiny.qwen2(), reward_funcs=trl_tiny.count_threes,
                          args=trl_tiny.grpo_args(tmp_path), train_dataset=trl_tiny.dataset(),
                          processing_class=trl_tiny.tokenizer())
    ids = torch.randint(3, 10, (2, 6))
    with pytest.raises(ValueError, match="pixel_values"):
        tr._get_per_token_logps_and_entropies(tr.model, ids, torch.ones_like(ids), 3, pixel_values=torch.zeros(2, 3))


def test_return_convention_follows_installed_trl(tmp_path, monkeypatch):
    import inspect

    import fastpmd.integrations.trl as ft

    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert ft._RETURNS_AUX == ("compute_aux_loss" in params)
    tr = FusedGRPOTrainer(model=trl_tiny.qwen2(), reward_funcs=trl_tiny.count_threes,
                          args=trl_tiny.grpo_args(tmp_path), train_dataset=trl_tiny.dataset(),
                          processing_class=trl_tiny.tokenizer())
    ids = torch.randint(3, 10, (2, 6))
    ours = tr._get_per_token_logps_and_entropies(tr.model, ids, torch.ones_like(ids), 3, compute_entropy=True)
    theirs = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, torch.ones_like(ids), 3,
                                                            compute_entropy=True)
    assert len(ours) == len(theirs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ft, "_RETURNS_AUX", False)  # an older TRL: (logps, entropies)
    assert len(tr._get_per_token_logps_and_entropies(tr.model, ids, torch.ones_like(ids), 3)) == 2
