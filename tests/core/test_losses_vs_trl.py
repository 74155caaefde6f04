"""fastpmd.grpo_loss / gspo_loss against the installed TRL's GRPOTrainer._compute_loss itself (not a transcription),
with TRL's options (delta, use_bias_correction_kl, vLLM importance weights, top_entropy_quantile); and no NaN/inf
from finite input."""
import types
from collections import defaultdict

import pytest
import torch

import fastpmd

OPTIONS = ["none", "delta", "bias_correction_kl", "is_weights", "entropy_mask"]


def trl_loss(logp, old, adv, mask, ent, *, loss_type, level, beta, ref, option, is_ratio, eps=(0.2, 0.28),
             args=None):
    """TRL's own _compute_loss, called on an object holding exactly the attributes it reads (`args`: more
    GRPOConfig fields, e.g. sapo_temperature_pos)."""
    trl = pytest.importorskip("trl")
    from accelerate import Accelerator

    B, K = logp.shape
    obj = types.SimpleNamespace(
        aux_loss_enabled=False, top_entropy_quantile=0.6 if option == "entropy_mask" else 1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=eps[0], epsilon_high=eps[1], use_vllm=option == "is_weights",
        vllm_importance_sampling_correction=option == "is_weights", model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=K + 2, accelerator=Accelerator(cpu=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(delta=1.5 if option == "delta" else None, steps_per_generation=1,
                                   use_bias_correction_kl=option == "bias_correction_kl", **(args or {})))
    obj._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    obj.get_high_entropy_mask = types.MethodType(trl.GRPOTrainer.get_high_entropy_mask, obj)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, K, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
              "ref_per_token_logps": ref, "importance_sampling_ratio": is_ratio}
    loss = trl.GRPOTrainer._compute_loss(obj, None, inputs)
    emask = obj.get_high_entropy_mask(ent, mask.long(), 0.4) if option == "entropy_mask" else None
    return loss, emask


def random_batch(seed, B=5, K=7):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    logp = (torch.randn(B, K, generator=g, **f64) - 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, K, generator=g, **f64)
    ref = logp.detach() + 0.2 * torch.randn(B, K, generator=g, **f64)
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[:, 0] = True
    ent = torch.rand(B, K, generator=g, **f64) * 3
    is_ratio = torch.exp(0.2 * torch.randn(B, K, generator=g, **f64))
    return logp, old, ref, mask, torch.randn(B, generator=g, **f64), ent, is_ratio


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_equals_trl_compute_loss(loss_type, level, beta, option):
    logp, old, ref, mask, adv, ent, is_ratio = random_batch(hash((loss_type, level, option)) % 1000)
    eps = (0.2, 0.28) if level == "token" else (0.05, 0.08)  # wide enough that some sequences clip
    want, emask = trl_loss(logp, old, adv, mask, ent, loss_type=loss_type, level=level, beta=beta, ref=ref,
                           option=option, is_ratio=is_ratio, eps=eps)
    fn = fastpmd.grpo_loss if level == "token" else fastpmd.gspo_loss
    got, _ = fn(logp, old, adv, mask, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], beta=beta,
                ref_logprobs=ref, max_completion_length=logp.shape[1] + 2, num_items=mask.sum(),
                delta=1.5 if option == "delta" else None, bias_correction_kl=option == "bias_correction_kl",
                weights=is_ratio if option == "is_weights" else None, entropy_mask=emask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    g1, = torch.autograd.grad(got, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    if option == "entropy_mask":
        assert 0 < int(emask.sum()) < int(mask.sum())


def test_options_change_the_loss():
    logp, old, ref, mask, adv, ent, is_ratio = random_batch(7)
    old = logp.detach() + 0.8 * torch.randn(logp.shape, dtype=torch.float64)  # some ratios beyond delta
    base = fastpmd.grpo_loss(logp, old, adv, mask, beta=0.04, ref_logprobs=ref)[0]
    for kw in ({"delta": 1.2}, {"bias_correction_kl": True}, {"weights": is_ratio},
               {"entropy_mask": ent > 1.5}):
        assert not torch.isclose(fastpmd.grpo_loss(logp, old, adv, mask, beta=0.04, ref_logprobs=ref, **kw)[0],
                                 base), kw


def test_grpo_option_errors():
    logp, old, ref, mask, adv, ent, is_ratio = random_batch(8)
    with pytest.raises(ValueError, match="delta"):
        fastpmd.grpo_loss(logp, old, adv, mask, delta=0.0)
    with pytest.raises(ValueError, match="weights"):
        fastpmd.grpo_loss(logp, old, adv, mask, weights=is_ratio[:, :3])
    with pytest.raises(ValueError, match="entropy_mask"):
        fastpmd.grpo_loss(logp, old, adv, mask, entropy_mask=ent)


def test_grpo_no_nan_from_finite_input():
    # the case: log-ratio 99 > 88.7 (float32 exp overflows) with A = 0 (equal rewards): inf * 0 today
    m = torch.ones(2, 3, dtype=torch.bool)
    for fn in (fastpmd.grpo_loss, fastpmd.gspo_loss):
        logp = torch.full((2, 3), -1.0, requires_grad=True)
        loss, met = fn(logp, torch.full((2, 3), -100.0), torch.zeros(2), m)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and loss == 0 and torch.equal(g, torch.zeros_like(g)), fn


def reference_grpo(logp, old, adv, mask, el, eh, delta, level):
    """TRL's formula in float64 (its exp does not overflow at these log-ratios)."""
    m = mask.double()
    lr = logp - old
    if level == "sequence":
        lr = ((lr * m).sum(-1) / m.sum(-1)).unsqueeze(-1)
    c1 = torch.exp(lr)
    c2 = c1.clamp(1 - el, 1 + eh)
    if delta is not None:
        c1 = c1.clamp(max=delta)
    ptl = -torch.min(c1 * adv[:, None], c2 * adv[:, None])
    return ((ptl * m).sum(-1) / m.sum(-1)).mean()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 2.0])
def test_grpo_large_log_ratios_equal_float64(level, delta):
    torch.manual_seed(9)
    B, T = 6, 5
    old = -torch.rand(B, T) * 3 - 100.0  # log-ratios ~ 95..103: exp overflows float32
    logp32 = (-torch.rand(B, T) * 2).requires_grad_()
    logp32.data[:, 2] -= 110.0  # and some tokens far below old
    adv = torch.tensor([1.0, 0.0, 0.5, 0.0, -0.7, -1.0])
    if delta is None:
        adv = adv.clamp(min=0)  # A < 0 without delta: the exact loss is -A * ratio, beyond float32
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    got, _ = fastpmd.grpo_loss(logp32, old, adv, mask, epsilon_high=0.28, delta=delta,
                               importance_sampling_level=level)
    logp64 = logp32.detach().double().requires_grad_()
    want = reference_grpo(logp64, old.double(), adv.double(), mask, 0.2, 0.28, delta, level)
    assert torch.isfinite(got) and torch.isfinite(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    g32, = torch.autograd.grad(got, logp32)
    g64, = torch.autograd.grad(want, logp64)
    assert torch.isfinite(g32).all()
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-7)


def test_bias_corrected_kl_stays_finite_where_the_ratio_overflows():
    """A log-ratio of 99 (exp overflows float32) where the policy equals the reference (KL term 0): the loss and
    its gradient are finite, and the loss equals the float64 value (the policy term only)."""
    m = torch.ones(2, 3, dtype=torch.bool)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old, ref, adv = torch.full((2, 3), -100.0), torch.full((2, 3), -1.0), torch.zeros(2)
    loss, _ = fastpmd.grpo_loss(logp, old, adv, m, beta=0.04, ref_logprobs=ref, bias_correction_kl=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert loss.item() == 0.0
