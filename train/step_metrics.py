"""The metrics of one RL step (a train row of metrics.jsonl): rewards, entropy, loss, log-ratios (all the step's
mini-batches, and its last one as the released code logs it), gradient norm, micro-batch size, rollout log-prob
gap and TIS weights, throughput and peak memory, reduced across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

import fastpmd

from .metrics import peak_memory


def step_metrics(batch: dict, rewards: torch.Tensor, entropy: torch.Tensor, stats: list[dict], *,
                 loss_cfg: fastpmd.LossConfig, device: torch.device, step: int, lr: float, t_gen: float,
                 t_update: float) -> dict:
    """One train row of metrics.jsonl from the step's generation batch, rewards [B], entropies [B, L] and the k
    optimizer steps' stats, reduced across ranks (a few collectives) with one host sync."""
    dev, W = device, dist.get_world_size()
    mask = batch["loss_mask"]
    k = len(stats)
    local = torch.stack([
        rewards.mean(), sum(s["loss"].float().cpu() for s in stats) / k,
        sum(s["logratio_mean"].float().cpu() for s in stats) / k, sum(s["grad_norm"].float().cpu() for s in stats) / k,
    ]).to(dev)  # rewards: every rank scored the same number of its own responses
    lo_min = torch.stack([s["logratio_min"].float() for s in stats]).min().reshape(1).to(dev)
    rank_tokens = float(batch["attention_mask"].sum())  # what this rank trained (after any balancing)
    extremes = torch.cat([-lo_min, torch.tensor([max(s["micro_batch_tokens_max"] for s in stats), rank_tokens],
                                                device=dev)])
    last_keys, last_lo, last_mean = last_minibatch_metrics(stats[-1], dev)
    rollout_lp = batch.get("rollout_logprobs")
    diff = (rollout_lp - batch["old_logprobs"]).abs()[mask].sum() if rollout_lp is not None else 0.0
    tis = loss_cfg.rollout_correction == "tis"
    w = fastpmd.truncated_is_weights(batch["old_logprobs"], rollout_lp, mask, cap=loss_cfg.rollout_is_cap,
                                     level="sequence" if loss_cfg.is_pmd else "token") if tis else None
    w_sum, w_cnt = (float(w.sum()), float(mask.sum() if w.dim() == 2 else w.numel())) if tis else (0.0, 0.0)
    tokens = torch.tensor([rank_tokens, float(mask.sum()), float(diff), w_sum, w_cnt, float((entropy * mask).sum()),
                           float(mask.shape[0])], device=dev, dtype=torch.float64)  # global sums (rows may have moved)
    if W > 1:
        dist.all_reduce(local)
        dist.all_reduce(tokens)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # [-min logratio, max micro-batch tokens, rank tokens]
        dist.all_reduce(last_lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(last_mean)
    v = (local / W).tolist()
    lv = torch.cat([last_lo * torch.tensor([1.0, 1.0, -1.0], device=dev), last_mean / W]).tolist()
    total_tokens, resp_tokens, diff_sum, w_sum, w_cnt, ent_sum, n_seqs = tokens.tolist()
    ext = extremes.tolist()
    row = {"kind": "train", "step": step, "reward_mean": v[0], "entropy": ent_sum / max(resp_tokens, 1),
           "response_len_mean": resp_tokens / n_seqs, "loss": v[1], "logratio_mean": v[2], "logratio_min": -ext[0],
           "micro_batch_tokens_max": ext[1], "rank_tokens_imbalance": ext[2] * W / total_tokens - 1.0,
           "grad_norm": v[3],
           "lr": lr, "update_s": t_update, "gen_s": t_gen,
           "tokens_per_s": total_tokens / t_update, "ms_per_token": 1000 * t_update / total_tokens,
           "gen_ms_per_token": 1000 * t_gen / max(resp_tokens, 1),
           **{k: x for k, x in zip(("logratio_min_last", "seq_ratio_min", "seq_ratio_max", "ppo_kl",
                                    "seq_ratio_mean"), lv) if k in last_keys}}
    if rollout_lp is not None:  # |engine log-prob - trainer's old log-prob|, mean over response tokens
        row["rollout_logp_diff_mean"] = diff_sum / max(resp_tokens, 1)
    if tis:  # mean TIS weight (per token for grpo/gspo, per sequence for pmd)
        row["rollout_is_weight_mean"] = w_sum / max(w_cnt, 1)
    return {**row, **peak_memory(dev)}

def last_minibatch_metrics(s: dict, dev):
    """The step's last mini-batch as the released code logs it: (keys present, [min log-ratio, min exp(Delta),
    -max exp(Delta)] to MIN-reduce, [ppo_kl, mean exp(Delta)] to SUM-reduce); absent metrics are left out."""
    def get(k, sign=1.0):
        return sign * s[k].float().cpu() if k in s else torch.tensor(0.0)

    keys = {"logratio_min_last"} | {k for k in ("seq_ratio_min", "seq_ratio_max", "ppo_kl", "seq_ratio_mean")
                                    if k in s}
    lo = torch.stack([get("logratio_min"), get("seq_ratio_min"), get("seq_ratio_max", -1.0)]).to(dev)
    return keys, lo, torch.stack([get("ppo_kl"), get("seq_ratio_mean")]).to(dev)
