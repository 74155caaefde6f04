"""fastpmd.advantages with groups as verl forms them (group_ids), the released ploo, and per-sequence tau."""
import math
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpmd
from fastpmd.advantages import ESTIMATORS


def group_reference(r: torch.Tensor, estimator: str, tau: float, eps: float) -> torch.Tensor:
    """One group r [n], float64, written from the definitions (masked diagonal for leave-one-out)."""
    n = r.numel()
    if estimator == "mean":
        return r - r.mean()
    if estimator == "loo":
        return torch.stack([r[i] - torch.cat([r[:i], r[i + 1:]]).mean() for i in range(n)])
    if estimator == "grpo":
        return (r - r.mean()) / ((r.std() if n > 1 else torch.zeros((), dtype=r.dtype)) + eps)
    if estimator == "partition":
        return r - tau * (torch.logsumexp(r / tau, 0) - math.log(n))
    others = [torch.cat([r[:i], r[i + 1:]]) for i in range(n)]
    if estimator == "partition_loo":
        return torch.stack([r[i] - tau * (torch.logsumexp(o / tau, 0) - math.log(n - 1)) for i, o in enumerate(others)])
    return released_ploo(r, [0] * n, tau)


def released_ploo(scores: torch.Tensor, index, tau: float) -> torch.Tensor:
    """float64 transcription of the released code's ploo (OpenKimi openkimi/pmd/core_algos.py), uid loop and all."""
    id2score, id2partition, id2max = defaultdict(list), {}, {}
    baseline = torch.zeros_like(scores)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, s in id2score.items():
        t = torch.stack(s)
        id2max[idx] = torch.max(t)
        id2partition[idx] = torch.sum(torch.exp((t - id2max[idx]) / tau))
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        if n > 1:
            partition = id2partition[index[i]] - torch.exp((scores[i] - id2max[index[i]]) / tau)
            baseline[i] = id2max[index[i]] + tau * torch.log(torch.clamp(partition / (n - 1), min=1e-8))
    return scores - baseline


def loop_reference(r, ids, estimator, tau, eps=1e-4):
    out = torch.empty_like(r)
    for g in ids.unique():
        sel = ids == g
        out[sel] = group_reference(r[sel], estimator, tau, eps)
    return out


def ragged_batch(seed: int, binary: bool):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(2, 9, (7,), generator=gen)]
    ids = torch.cat([torch.full((s,), 1000 - 37 * g) for g, s in enumerate(sizes)])  # arbitrary ids
    perm = torch.randperm(ids.numel(), generator=gen)  # groups interleaved, any order
    ids = ids[perm]
    r = (torch.randint(0, 2, ids.shape, generator=gen) * 2.0 - 1 if binary else torch.randn(ids.shape, generator=gen))
    return r.double(), ids


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("tau", [0.01, 0.3, 2.0])
def test_group_ids_match_a_per_group_loop(estimator, binary, tau):
    r, ids = ragged_batch(int(tau * 100) + binary, binary)
    got = fastpmd.advantages(r, group_ids=ids, estimator=estimator, tau=tau)
    ref = loop_reference(r, ids, estimator, tau)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # consecutive equal-size groups: group_size and group_ids agree
    r2 = r[:12]
    a = fastpmd.advantages(r2, group_size=4, estimator=estimator, tau=tau)
    b = fastpmd.advantages(r2, group_ids=torch.arange(12) // 4, estimator=estimator, tau=tau)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=24), st.integers(0, 10_000), st.sampled_from(ESTIMATORS))
def test_permutation_equivariant(labels, seed, estimator):
    ids = torch.tensor(labels)
    if estimator in ("loo", "partition_loo", "partition_loo_clamped") and torch.bincount(ids).min() < 2:
        ids = torch.cat([ids, ids])  # every present id now occurs at least twice
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    a = fastpmd.advantages(r, group_ids=ids, estimator=estimator, tau=0.5)
    perm = torch.randperm(ids.numel(), generator=gen)
    b = fastpmd.advantages(r[perm], group_ids=ids[perm], estimator=estimator, tau=0.5)
    torch.testing.assert_close(b, a[perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, loop_reference(r, ids, estimator, 0.5), rtol=1e-12, atol=1e-12)


def test_released_ploo_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = int(torch.randint(2, 17, (), generator=gen))
        r = torch.randn(5 * n, generator=gen, dtype=torch.float64)
        if trial % 2:
            r = torch.sign(r)  # +1/-1 rewards, where the clamp fires
        tau = [0.01, 0.05, 0.3, 1.7][trial % 4]
        ref = released_ploo(r.clone(), [i // n for i in range(5 * n)], tau)
        assert torch.equal(fastpmd.advantages(r, group_size=n, estimator="partition_loo_clamped", tau=tau), ref)
        perm = torch.randperm(5 * n, generator=gen)  # uids interleaved: verl's grouping, verl's order in a group
        ids = (torch.arange(5 * n) // n)[perm]
        ref = released_ploo(r[perm].clone(), ids.tolist(), tau)
        assert torch.equal(fastpmd.advantages(r[perm], group_ids=ids, estimator="partition_loo_clamped", tau=tau),
                           ref)


def test_released_clamp_value_lone_correct_answer():
    # PMD_NOTES: a lone correct answer, tau 0.01, +1/-1 rewards -> exactly -tau*log(1e-8) = 0.1842 (exact: +2)
    r = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    clamped = fastpmd.advantages(r, group_size=4, estimator="partition_loo_clamped", tau=0.01)
    assert clamped[1].item() == pytest.approx(-0.01 * math.log(1e-8), rel=1e-14)
    assert round(clamped[1].item(), 3) == 0.184
    exact = fastpmd.advantages(r, group_size=4, estimator="partition_loo", tau=0.01)
    assert exact[1].item() == pytest.approx(2.0, abs=1e-12)
    # the wrong answers' baselines keep the correct one in their sum: both estimators agree there
    torch.testing.assert_close(clamped[[0, 2, 3]], exact[[0, 2, 3]], rtol=1e-14, atol=1e-14)
    # float32 rewards: float32 arithmetic, the same clamp
    c32 = fastpmd.advantages(r.float(), group_size=4, estimator="partition_loo_clamped", tau=0.01)
    assert c32.dtype == torch.float32 and abs(c32[1].item() - 0.18420681) < 1e-6


def test_singleton_groups():
    r = torch.tensor([1.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([7, 7, 7, 3])  # uid 3 has one response
    for est in ("mean", "partition", "grpo"):
        a = fastpmd.advantages(r, group_ids=ids, estimator=est, tau=0.5)
        assert a[3].item() == 0.0
    for est in ("loo", "partition_loo", "partition_loo_clamped"):
        with pytest.raises(ValueError, match="group_ids"):
            fastpmd.advantages(r, group_ids=ids, estimator=est, tau=0.5)


def test_tensor_tau_per_group():
    r, ids = ragged_batch(5, binary=True)
    taus = {int(g): 0.05 * (1 + k) for k, g in enumerate(ids.unique())}
    tau = torch.tensor([taus[int(g)] for g in ids], dtype=torch.float64)
    for est in ("partition", "partition_loo", "partition_loo_clamped"):
        got = fastpmd.advantages(r, group_ids=ids, estimator=est, tau=tau)
        for g, t in taus.items():
            sel = ids == g
            torch.testing.assert_close(got[sel], group_reference(r[sel], est, t, 1e-4), rtol=1e-12, atol=1e-12)
    bad = tau.clone()
    bad[0] *= 2  # not constant within its group
    with pytest.raises(ValueError, match="tau"):
        fastpmd.advantages(r, group_ids=ids, estimator="partition", tau=bad)
    with pytest.raises(ValueError, match="tau"):
        fastpmd.advantages(r, group_ids=ids, estimator="partition", tau=tau[:3])


def test_group_argument_errors():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="exactly one"):
        fastpmd.advantages(r, estimator="mean")
    with pytest.raises(ValueError, match="exactly one"):
        fastpmd.advantages(r, group_size=2, group_ids=torch.zeros(4, dtype=torch.long), estimator="mean")
    with pytest.raises(ValueError, match="group_ids"):
        fastpmd.advantages(r, group_ids=torch.zeros(3, dtype=torch.long), estimator="mean")
    with pytest.raises(ValueError, match="group_ids"):
        fastpmd.advantages(r, group_ids=torch.zeros(4), estimator="mean")
