"""`python -m fastpmd.bench.rank_balance`: what moving sequences between ranks (`optim.balance_ranks`,
train/rank_balance.py) buys in the update of the 7B/30B recipe, planned with the trainer's own planners on
synthetic response lengths (CPU, seconds; a cost model, not a GPU timing).

Cost model: FSDP all-gathers and reduce-scatters every block in every micro-batch, so the ranks meet once per
micro-batch and a mini-batch takes sum_i max_r cost(r, i) over its micro-batches i; the ideal is the total cost
spread evenly, sum_r,i cost(r, i) / W. Efficiency = ideal / planned. cost(r, i) = tokens, or tokens plus the
attention term sum L_s^2 * ATTN (causal attention's 2 * L^2 * H * layers flops per sequence against the linear
layers' 6 * params per token: ATTN = 2 * layers * H / (6 * params) per token of length, Qwen2.5-7B's numbers).

Lengths: the recipe's 512 prompts x 16 responses, prompts 60..400 tokens, responses lognormal with a per-prompt
difficulty (hard prompts make all their 16 responses long), clipped at max_new_tokens 8192 (truncated responses
pile up there, as in DAPO-style runs); the group's prompts are split over W ranks as the trainer does.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fastpmd.train.microbatch import pack_micro_batches
from fastpmd.train.rank_balance import plan_owners

ATTN_7B = 2 * 28 * 3584 / (6 * 7.6e9)  # extra cost per token per token of its sequence's length


def synthetic_lengths(prompts: int, n: int, seed: int, median: float, max_new: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(60, 401, (prompts,), generator=g).repeat_interleave(n)
    difficulty = torch.randn(prompts, generator=g).repeat_interleave(n) * 0.7
    rlen = (math.log(median) + difficulty + 0.6 * torch.randn(prompts * n, generator=g)).exp()
    return (plen + rlen.clamp(1, max_new).round().long()).tolist()


def plan_cost(lengths: list[int], world: int, k: int, budget: int, balance: bool, attn: float) -> dict:
    """Planned update cost of one generation batch (k mini-batches of whole prompt groups, groups in order)."""
    W, B = world, len(lengths) // world
    mb = [(i % B) * k // B for i in range(len(lengths))]  # rank r's rows r*B.. ; mini-batch of each row
    owners = plan_owners(lengths, mb, W) if balance else [i // B for i in range(len(lengths))]
    cost = lambda seqs: sum(lengths[s] + attn * lengths[s] ** 2 for s in seqs)  # noqa: E731
    planned = ideal = 0.0
    micro = rank_max = 0
    for j in range(k):
        per_rank = [[s for s in range(len(lengths)) if mb[s] == j and owners[s] == r] for r in range(W)]
        count = max(len(pack_micro_batches([lengths[s] for s in seqs], budget)) for seqs in per_rank)
        plans = [[[seqs[i] for i in b] for b in pack_micro_batches([lengths[s] for s in seqs], budget, count)]
                 for seqs in per_rank]
        planned += sum(max(cost(plans[r][i]) for r in range(W)) for i in range(count))
        ideal += sum(cost(seqs) for seqs in per_rank) / W
        micro += count
        rank_max = max(rank_max, max(sum(lengths[s] for s in seqs) for seqs in per_rank))
    return {"efficiency": ideal / planned, "micro_batches": micro, "rank_tokens_max_per_minibatch": rank_max}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastpmd.bench.rank_balance", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write rank_balance.json / .md here")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args(argv)
    rows = []
    for world in (2, 8):
        for median in (600, 2500):
            for attn_name, attn in (("tokens", 0.0), ("tokens+attention", ATTN_7B)):
                for balance in (False, True):
                    runs = [plan_cost(synthetic_lengths(512, 16, s, median, 8192), world, 16, 16384, balance, attn)
                            for s in range(a.seeds)]
                    rows.append({"world": world, "median_response": median, "cost": attn_name, "balance": balance,
                                 **{key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}})
                    print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "rank_balance.json").write_text(json.dumps(rows, indent=1))
        lines = ["| ranks | median response | cost | balance_ranks | efficiency | micro-batches / step |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['world']} | {r['median_response']} | {r['cost']} | {r['balance']} | {r['efficiency']:.3f} "
                  f"| {r['micro_batches']:.1f} |" for r in rows]
        (a.out / "rank_balance.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
