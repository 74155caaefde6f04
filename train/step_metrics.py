"""The metrics of one RL step (a train row of metrics.jsonl): rewards, entropy, the loss and every metric the loss
returns (all the step's mini-batches; a few of its last one as the released code logs them), gradient norm,
micro-batch size, rollout log-prob gap and TIS weights, throughput and peak memory, reduced across ranks by name."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .batch import RolloutBatch
from .metrics import peak_memory

OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
LAST = ("seq_ratio_min", "seq_ratio_max", "ppo_kl", "seq_ratio_mean")  # the last mini-batch's only
SKIP = ("num_tokens",)  # loss metrics the row states otherwise (response_len_mean)


def metric_op(name: str) -> str:
    """How a loss metric combines over micro-batches, mini-batches and ranks: by its name's suffix, "min" / "max",
    else a (sequence-weighted) "mean"."""
    return "min" if name.endswith("_min") else "max" if name.endswith("_max") else "mean"


def accumulate(stats: dict, metrics: dict, w: float) -> None:
    """Fold one micro-batch's loss metrics into the mini-batch's `stats`: its loss added (already globally
    normalised), a "mean" metric weighted by w (the micro-batch's share of the mini-batch's sequences), "min" /
    "max" metrics by their op."""
    stats["loss"] = stats.get("loss", 0.0) + metrics["loss"].detach()
    for key, v in metrics.items():
        if key == "loss" or key in SKIP:
            continue
        op = metric_op(key)
        if op == "mean":
            stats[key] = stats.get(key, 0.0) + v.detach() * w
        else:
            stats[key] = v.detach() if key not in stats else (torch.minimum if op == "min" else torch.maximum)(
                stats[key], v.detach())


def reduce_named(values: dict[str, tuple], device: torch.device) -> dict[str, float]:
    """{name: (value, "sum" | "min" | "max")} reduced across ranks: one all_reduce per op, one host sync."""
    names = {op: sorted(k for k, (_, o) in values.items() if o == op) for op in OPS}
    parts = {op: torch.stack([torch.as_tensor(values[k][0]).detach().to(device, torch.float64).reshape(())
                              for k in ks]) for op, ks in names.items() if ks}
    if dist.get_world_size() > 1:
        for op, t in parts.items():
            dist.all_reduce(t, op=OPS[op])
    flat = torch.cat(list(parts.values())).tolist() if parts else []
    return dict(zip([k for op in parts for k in names[op]], flat))


def loss_values(stats: list[dict], world: int) -> dict[str, tuple]:
    """The mini-batches' stats as named values to reduce: "mean" metrics averaged over the k mini-batches (a SUM
    of value / world over ranks), "min" / "max" over them; LAST keys from the last mini-batch, and its
    logratio_min as logratio_min_last."""
    k, last = len(stats), stats[-1]
    out = {}
    for key in sorted(last):
        op = metric_op(key)
        if key in LAST:
            v = last[key]
        elif op == "mean":
            v = sum(torch.as_tensor(s[key]).float().cpu() for s in stats) / k
        else:
            v = torch.stack([torch.as_tensor(s[key]).float().cpu() for s in stats])
            v = v.min() if op == "min" else v.max()
        out[key] = (v / world, "sum") if op == "mean" else (v, op)
    if "logratio_min" in last:
        out["logratio_min_last"] = (last["logratio_min"], "min")
    return out


def step_metrics(batch: RolloutBatch, rewards: torch.Tensor, entropy: torch.Tensor, stats: list[dict], *,
                 device: torch.device, step: int, lr: float, t_gen: float, t_update: float) -> dict:
    """One train row of metrics.jsonl from the step's generation batch, rewards [B], entropies [B, L] and the k
    optimizer steps' stats, reduced across ranks (one collective per op) with one host sync."""
    W, mask = dist.get_world_size(), batch.loss_mask
    rank_tokens = batch.attention_mask.sum().double()  # what this rank trained (after any balancing)
    w = batch.is_weights
    diff = (batch.rollout_logprobs - batch.old_logprobs).abs()[mask].sum() if batch.rollout_logprobs is not None \
        else 0.0
    r = reduce_named({
        **loss_values(stats, W), "reward_mean": (rewards.mean() / W, "sum"),  # every rank scored as many responses
        "rank_tokens_max": (rank_tokens, "max"), "total_tokens": (rank_tokens, "sum"),
        "resp_tokens": (mask.sum(), "sum"),
        "diff_sum": (diff, "sum"), "entropy_sum": ((entropy * mask).sum(), "sum"), "n_seqs": (mask.shape[0], "sum"),
        "w_sum": (0.0 if w is None else w.sum(), "sum"),  # TIS weights: per token for grpo, per sequence for pmd
        "w_cnt": (0.0 if w is None else mask.sum() if w.dim() == 2 else w.numel(), "sum"),
    }, device)  # global sums: rows may have moved between ranks
    total, resp = r.pop("total_tokens"), r.pop("resp_tokens")
    diff_sum, ent_sum, n_seqs, w_sum, w_cnt = (r.pop(k) for k in ("diff_sum", "entropy_sum", "n_seqs", "w_sum",
                                                                   "w_cnt"))
    row = {"kind": "train", "step": step, "reward_mean": r.pop("reward_mean"), "entropy": ent_sum / max(resp, 1),
           "response_len_mean": resp / n_seqs, "rank_tokens_imbalance": r.pop("rank_tokens_max") * W / total - 1.0,
           **r, "lr": lr, "update_s": t_update, "gen_s": t_gen, "tokens_per_s": total / t_update,
           "ms_per_token": 1000 * t_update / total, "gen_ms_per_token": 1000 * t_gen / max(resp, 1)}
    if batch.rollout_logprobs is not None:  # |engine log-prob - trainer's old log-prob|, mean over response tokens
        row["rollout_logp_diff_mean"] = diff_sum / max(resp, 1)
    if w is not None:
        row["rollout_is_weight_mean"] = w_sum / max(w_cnt, 1)
    return {**row, **peak_memory(device)}
