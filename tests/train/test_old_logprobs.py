"""The sampling temperature reaches the trainer's log-probs: the rollout engine's log-probs of the sampled tokens
and the trainer's old log-probs (FSDP model, packed rows, fp32 on CPU) agree to < 1e-3 at any temperature
(`rollout_logp_diff_mean`); at temperature 1 computed log-probs would be off by far more at T = 0.7."""
import pytest
import torch


from fastpmd.train.cli import build_config
from fastpmd.train.micro_loss import tis_weights
from fastpmd.train.trainer import Trainer

TINY = ["--preset", "tiny-arith", "--prompts-per-step", "8", "--group-size", "4", "--mini-batches", "2",
        "--warmup-steps", "20", "--max-new-tokens", "4", "--no-progress", "--no-export", "--no-plots",
        "--set", "data.eval_size=0"]


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_rollout_and_trainer_logprobs_agree_at_the_sampling_temperature(tmp_path, world_of_one, T):
    cfg, _ = build_config(TINY + ["--out", str(tmp_path), "--max-steps", "2", "--temperature", str(T)])
    tr = Trainer(cfg, world_of_one)
    rows = tr.fit()
    assert all(r["rollout_logp_diff_mean"] < 1e-3 for r in rows), [r["rollout_logp_diff_mean"] for r in rows]
    b = tr.last_batch
    mask = b.loss_mask
    assert mask.sum() > 10 and (b.old_logprobs[mask] < -1e-3).any()  # real, non-trivial log-probs compared
    if T != 1.0:  # the same tokens scored at temperature 1 differ clearly: the check can fail
        tr.temperature = 1.0
        at_one, _ = tr.old_logprobs(b)
        assert (at_one - b.rollout_logprobs).abs()[mask].mean() > 1e-2


@pytest.mark.parametrize("loss, loss_type", [("pmd-mean", "grpo"), ("grpo", "grpo")])
def test_rollout_correction_tis_in_the_trainer_against_float64(tmp_path, world_of_one, loss, loss_type):
    """loss.rollout_correction=tis: the trainer's loss equals a float64 reference with min(pi_old/pi_rollout, cap)
    per sequence (pmd-mean: exp(sum_t old - rollout), capped) or per token (grpo)."""
    import fastpmd

    cfg, _ = build_config(TINY + ["--out", str(tmp_path), "--max-steps", "1", "--temperature", "0.8",
                                  "--loss", loss, "--set", f"loss.loss_type={loss_type}",
                                  "--set", "loss.rollout_correction=tis", "--set", "loss.rollout_is_cap=1.5"])
    tr = Trainer(cfg, world_of_one)
    (row,) = tr.fit()
    assert abs(row["rollout_is_weight_mean"] - 1.0) < 1e-3  # engine and trainer agree on CPU: weights ~ 1
    b = tr.last_batch
    g = torch.Generator().manual_seed(0)
    mask = b.loss_mask
    logp, _ = tr.old_logprobs(b)  # the current policy's log-probs: what the loss sees
    old = torch.where(mask, logp + 0.05 * torch.randn(logp.shape, generator=g), 0.0)
    rollout = torch.where(mask, old + 0.3 * torch.randn(logp.shape, generator=g), 0.0)
    b.old_logprobs, b.rollout_logprobs = old, rollout
    b.advantages = torch.randn(b.advantages.shape, generator=g)
    b.is_weights = tis_weights(tr.loss_cfg, b)  # the step computes them once, from these log-probs
    B = mask.shape[0]
    stats = tr.accumulate_gradients(b, torch.arange(B))
    tr.optimizer.zero_grad(set_to_none=True)
    lp, o, r, m, adv = logp.double(), old.double(), rollout.double(), mask, b.advantages.double()
    if loss == "pmd-mean":
        w = torch.exp((o - r).masked_fill(~m, 0).sum(1)).clamp(max=1.5)
        delta = (lp - o).masked_fill(~m, 0).sum(1)
        ref = (w * (adv - 0.1 * delta) ** 2 / (2 * 0.1) / m.sum(1)).sum() / B
        assert (w < 1.5).any() and (w == 1.5).any()
    else:
        w = torch.exp(o - r).clamp(max=1.5)
        ratio = torch.exp(lp - o)
        per_tok = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * w
        ref = (per_tok.masked_fill(~m, 0).sum(1) / m.sum(1)).mean()
    assert float(stats["loss"]) == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    none_cfg = fastpmd.LossConfig(name=tr.loss_cfg.name, tau=0.1, loss_type=loss_type)
    unweighted, _ = fastpmd.compute_loss(none_cfg, lp, o, adv, m, num_sequences=B)
    assert abs(float(unweighted) - float(ref)) > 1e-3  # the weights matter here: the check can fail
