"""Group advantages: the per-sequence regression targets of PMD and the baselines' advantages.

Groups are either consecutive runs of `group_size` responses, or given by `group_ids` [B] (any integer ids, groups
of any sizes in any order, as verl groups by uid). Plain-PyTorch equivalents for one group r [n]:
    mean                   r - r.mean()                                          (PMD-mean, the paper)
    loo                    r_i - mean_{j != i} r_j = n/(n-1) * (r - r.mean())    (released code, verl "rloo")
    partition              r - tau * log(mean_j exp(r_j / tau))                  (PMD-part)
    partition_loo          r_i - tau * log(mean_{j != i} exp(r_j / tau))         (exact, logsumexp)
    partition_loo_clamped  the released code's "ploo", operation for operation:
                               m = r.max(); Z = exp((r - m)/tau).sum()
                               d_i = clamp((Z - exp((r_i - m)/tau)) / (n-1), min=1e-8)
                               A_i = r_i - (m + tau*log(d_i))
                           For a lone best answer the others' mean exp(-gap/tau) is below 1e-8 once gap/tau >
                           ln(1e8) = 18.42 (and Z - exp(...) cancels to exactly 0 beyond ~37 in float64), so the
                           clamp fires and A = -tau*log(1e-8) = 18.42*tau (+0.184 at tau 0.01, +1/-1 rewards,
                           instead of +2). Reproduces that code's values; not a better estimator.
    grpo                   (r - r.mean()) / (r.std(unbiased=True) + eps)
tau may be a number or a [B] tensor (one value per sequence, equal within a group: a per-prompt tau).

Groups of one: "mean", "partition" give 0, "grpo" 0 (no spread); the leave-one-out estimators raise ValueError.
verl differs here: its loop rloo/grpo/ploo pass the raw score through for a lone response (mean 0, std 1,
baseline 0) and its vectorised rloo gives 0; a lone response has no leave-one-out baseline, so fastpmd refuses.
No Python loop over groups: reductions run over a [groups, width] table (a view, or a scatter for group_ids).
One host sync validates the input (finite rewards, group sizes; with group_ids also the table's shape), one more
for a tensor tau (finite, > 0, constant within groups); the arithmetic itself has none.
"""
from __future__ import annotations

import torch

from ._checks import check_positive, check_sequence_tau, check_tensor

ESTIMATORS = ("mean", "loo", "partition", "partition_loo", "partition_loo_clamped", "grpo")
LOO_ESTIMATORS = ("loo", "partition_loo", "partition_loo_clamped")
RELEASED_CLAMP = 1e-8  # the released ploo's floor on the leave-one-out mean of exp((r - max)/tau)


class _Groups:
    """Group reductions broadcast back to [B] (sum, max, count) over a [G, width] layout: a view of consecutive
    groups (group_size), or the responses scattered into a padded [G, width] table by (group, position) (group_ids;
    the padding adds 0 to sums and -inf to maxima, so both layouts reduce in the same order, verl's order)."""

    def __init__(self, n_items: int, device, width: int, slot: torch.Tensor | None = None, groups: int = 0):
        self.B, self.width, self.slot = n_items, width, slot  # slot [B]: row * width + position
        self.G = n_items // width if slot is None else groups
        self.count = self.sum(torch.ones(n_items, device=device))

    def table(self, x: torch.Tensor, fill: float) -> torch.Tensor:  # [B] -> [G, width]
        if self.slot is None:
            return x.view(self.G, self.width)
        return x.new_full((self.G * self.width,), fill).scatter_(0, self.slot, x).view(self.G, self.width)

    def back(self, t: torch.Tensor) -> torch.Tensor:  # [G, 1] -> [B]
        t = t.expand(-1, self.width).reshape(-1)
        return t if self.slot is None else t[self.slot]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.table(x, 0.0).sum(1, keepdim=True))

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.table(x, float("-inf")).amax(1, keepdim=True))

    def first_argmax(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # bool [B]: one max per group
        pos = torch.arange(self.B, device=x.device)
        cand = torch.where(x == m, pos, self.B)
        return pos == self.back(self.table(cand, self.B).amin(1, keepdim=True))


def group_slots(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense group index [B] in [0, G), position within the group [B] (original order kept), and the group sizes
    broadcast to [B], from arbitrary integer ids, without a host sync (stable sort, then run starts)."""
    B = group_ids.numel()
    ids, order = torch.sort(group_ids, stable=True)
    ar = torch.arange(B, device=group_ids.device)
    new = torch.ones(B, dtype=torch.bool, device=group_ids.device)
    new[1:] = ids[1:] != ids[:-1]
    start = torch.cummax(torch.where(new, ar, 0), 0).values  # first sorted position of each run
    gid_sorted = new.long().cumsum(0) - 1
    pos_sorted = ar - start
    size_sorted = torch.zeros(B, dtype=torch.long, device=group_ids.device).index_add_(
        0, gid_sorted, torch.ones_like(gid_sorted))[gid_sorted]
    inv = torch.empty_like(order).scatter_(0, order, ar)  # sorted position of each original item
    return gid_sorted[inv], pos_sorted[inv], size_sorted[inv]


def make_groups(n_items: int, device, group_size: int | None, group_ids: torch.Tensor | None,
                check: torch.Tensor | None = None) -> tuple[_Groups, int, bool]:
    """(groups, smallest group size, bool(check)) with one host sync: group_ids fix the table's shape."""
    if group_ids is None:
        ok = bool(check) if check is not None else True
        return _Groups(n_items, device, group_size), group_size, ok
    gid, pos, size = group_slots(group_ids.to(device))
    flag = (check if check is not None else torch.ones((), dtype=torch.bool, device=device)).long()
    if n_items == 0:
        return _Groups(0, device, 1, slot=gid, groups=0), 2**31, bool(flag)
    lo, width, groups, ok = torch.stack([size.min(), size.max(), gid.max() + 1, flag]).tolist()
    return _Groups(n_items, device, width, slot=gid * width + pos, groups=groups), lo, bool(ok)


def check_group_args(n_items: int, group_size, group_ids) -> None:
    """Exactly one of group_size (a positive int dividing n_items) and group_ids ([n_items] integer ids)."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size and group_ids")
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n_items % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the batch of {n_items} rewards")
    else:
        check_tensor("group_ids", group_ids, dims=1, floating=False)
        if group_ids.shape != (n_items,):
            raise ValueError(f"group_ids must have the shape of rewards ({n_items},), got {tuple(group_ids.shape)}")


def _check_tau(tau, rewards: torch.Tensor, estimator: str):
    """None (only where the estimator needs none), a number, or a [B] tensor like rewards."""
    if tau is None:
        if estimator.startswith("partition"):
            raise ValueError(f"estimator={estimator!r} needs tau")
        return None
    return check_sequence_tau(tau, rewards.numel(), rewards.device)


def advantages(
    rewards: torch.Tensor,  # [B]
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,  # [B] integer group ids (uids); any sizes, any order
    estimator: str,
    tau: float | torch.Tensor | None = None,  # number or [B] (per sequence, constant within a group)
    eps: float = 1e-4,
) -> torch.Tensor:  # [B] float32 (float64 for float64 rewards)
    check_tensor("rewards", rewards, dims=1)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    B = rewards.numel()
    check_group_args(B, group_size, group_ids)
    if group_ids is None and estimator in LOO_ESTIMATORS and group_size < 2:
        raise ValueError(f"estimator={estimator!r} needs group_size >= 2, got {group_size}")
    tau = _check_tau(tau, rewards, estimator)
    if estimator == "grpo":
        eps = check_positive("eps", eps)  # eps = 0 turns a group of equal rewards into 0/0

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype)
    tau_t = tau.to(dtype) if isinstance(tau, torch.Tensor) else None
    g, min_size, finite = make_groups(B, r.device, group_size, group_ids, check=torch.isfinite(r).all())
    if not finite:
        raise ValueError("rewards must be finite (found NaN or inf)")
    if estimator in LOO_ESTIMATORS and min_size < 2:
        raise ValueError(f"estimator={estimator!r} needs every group (group_ids) to hold >= 2 responses")
    if tau_t is not None:
        same = (g.max(tau_t) == -g.max(-tau_t)).all() & (torch.isfinite(tau_t) & (tau_t > 0)).all()
        if not bool(same):  # a second sync, only with a tensor tau
            raise ValueError("tau tensor must be finite, > 0 and equal within each group")
        tau = tau_t
    count = g.count.to(dtype)
    return _estimate(r, g, count, estimator, tau, eps)


def _estimate(r, g: _Groups, count, estimator: str, tau, eps: float) -> torch.Tensor:
    mean = g.sum(r) / count  # [B]
    if estimator == "mean":
        return r - mean
    if estimator == "loo":
        return (r - mean) * (count / (count - 1))
    if estimator == "grpo":
        var = g.sum((r - mean).square()) / (count - 1).clamp(min=1)
        return (r - mean) / (var.sqrt() + eps)
    m = g.max(r)
    if estimator == "partition":  # tau*log mean exp(r/tau) = m + tau*log mean exp((r - m)/tau)
        return r - (m + tau * (torch.log(g.sum(torch.exp((r - m) / tau))) - torch.log(count)))
    if estimator == "partition_loo_clamped":  # the released ploo, same operations in the same order
        e = torch.exp((r - m) / tau)
        denom = torch.clamp((g.sum(e) - e) / (count - 1), min=RELEASED_CLAMP)
        return r - (m + tau * torch.log(denom))
    # partition_loo, exact: for all but one designated maximum, the others' logsumexp keeps that maximum
    # (sum >= 1, no cancellation); the designated maximum uses the second-largest value as its shift.
    top = g.first_argmax(r, m)  # [B] bool, one per group
    m2 = g.max(torch.where(top, float("-inf"), r))  # max over the group without the designated maximum
    s1 = g.sum(torch.exp((r - m) / tau)) - torch.exp((r - m) / tau)
    s2 = g.sum(torch.where(top, 0.0, torch.exp((r - m2) / tau)))
    shift = torch.where(top, m2, m)
    lse = torch.log(torch.where(top, s2, s1))
    return r - (shift + tau * (lse - torch.log(count - 1)))

