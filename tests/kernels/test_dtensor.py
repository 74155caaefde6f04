"""A sharded LM head (issue 23): a DTensor weight/bias (tensor-parallel heads, FSDP2 parameters) is gathered with
autograd by the public ops on every backend, values and gradients equal to the plain tensors'; the kernel entry
points refuse it (and any tensor without storage) with a ValueError naming the argument, before any launch (a
DTensor's data_ptr() is 0, which Triton would launch as a null pointer). A 1-process gloo mesh on CPU; triton
runs under the interpreter (tests/triton_interp.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from triton_interp import ON_GPU, prepare, run_module_in_subprocess

IN_PROCESS = prepare()      # before fastpmd.kernels imports triton (see tests/triton_interp.py)

import fastpmd  # noqa: E402
from fastpmd.kernels import linear_logprobs_triton  # noqa: E402
from fastpmd.train.distributed import shutdown_distributed  # noqa: E402  (before any group: see its docstring)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
N, H, V = 13, 24, 70
BACKENDS = ["naive", "torch", "triton"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    own = not dist.is_initialized()
    if own:
        store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("needs a 1-process group")
    yield init_device_mesh(DEV, (1,))
    if own:  # the meshes in DTensor's caches would keep the group alive into interpreter exit (an abort risk)
        shutdown_distributed()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _skip_triton(backend):
    if backend in ("triton", "cublas") and not IN_PROCESS:
        pytest.skip("kernels run in the subprocess (test_interpreter_subprocess)")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(2, 7, H, generator=g)[:, :, :].to(DEV)
    w = (torch.randn(V, H, generator=g) * 0.3).to(DEV)
    b = (torch.randn(V, generator=g) * 0.5).to(DEV)
    tgt = torch.randint(0, V, (2, 7), generator=g).to(DEV)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEV)
    mask[1, 5:] = False
    return hid, w, b, tgt, mask


def _pair(t, mesh, placement):
    plain = t.detach().clone().requires_grad_()
    sharded = distribute_tensor(t.detach().clone(), mesh, [placement]).requires_grad_()
    return plain, sharded


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _close(got, ref, what):
    got = _full(got)
    assert torch.isfinite(got).all(), what
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize("placement", [Shard(0), Replicate()], ids=["shard", "replicate"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_dtensor_head(mesh, backend, placement):
    _skip_triton(backend)
    hid, w, b, tgt, mask = _inputs()
    w1, w2 = _pair(w, mesh, placement)
    b1, b2 = _pair(b, mesh, placement)
    h1, h2 = hid.clone().requires_grad_(), hid.clone().requires_grad_()
    outs = []
    for h, ww, bb in ((h1, w1, b1), (h2, w2, b2)):
        lp, ent = fastpmd.linear_logprobs(h, ww, tgt, mask=mask, bias=bb, temperature=0.9, return_entropy=True,
                                          backend=backend)
        assert not hasattr(lp, "full_tensor")        # plain tensors out
        (lp.sum() * 0.7 + (ent * mask).sum() * 0.3).backward()
        outs.append((lp, ent))
    _close(outs[1][0], outs[0][0].detach(), "logp")
    _close(outs[1][1], outs[0][1].detach(), "entropy")
    _close(h2.grad, h1.grad, "grad_hidden")
    assert type(w2.grad) is type(w2)                 # the DTensor parameter gets a DTensor gradient
    _close(w2.grad, w1.grad, "grad_weight")
    _close(b2.grad, b1.grad, "grad_bias")


@pytest.mark.parametrize("backend", BACKENDS + ["cublas"])
def test_fused_pmd_dtensor_head(mesh, backend):
    _skip_triton(backend)
    hid, w, _, tgt, mask = _inputs(1)
    old = torch.randn(2, 7, device=DEV) * 0.1 - 4.0
    adv = torch.tensor([0.5, -1.0], device=DEV)
    w1, w2 = _pair(w, mesh, Shard(0))
    h1, h2 = hid.clone().requires_grad_(), hid.clone().requires_grad_()
    losses = []
    for h, ww in ((h1, w1), (h2, w2)):
        loss, _ = fastpmd.fused_linear_pmd_loss(h, ww, tgt, mask, old, adv, tau=0.2, backend=backend)
        loss.backward()
        losses.append(loss)
    _close(losses[1], losses[0].detach(), "loss")
    _close(h2.grad, h1.grad, "grad_hidden")
    _close(w2.grad, w1.grad, "grad_weight")


def test_dtensor_hidden_refused(mesh):
    hid, w, _, tgt, _ = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        fastpmd.linear_logprobs(distribute_tensor(hid, mesh, [Replicate()]), w, tgt, backend="torch")


def test_kernel_entry_refuses_storage_less_weight(mesh):
    """The Triton entry point never gathers: a DTensor (data_ptr() == 0, numel() > 0) is a ValueError naming
    weight, raised before any launch, also where no kernel could run (the check comes first)."""
    hid, w, _, tgt, _ = _inputs()
    wd = distribute_tensor(w, mesh, [Shard(0)])
    assert wd.data_ptr() == 0 and wd.numel() > 0
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs_triton(hid.reshape(-1, H), wd, tgt.reshape(-1))


def test_interpreter_subprocess():
    if IN_PROCESS or ON_GPU:
        pytest.skip("the kernels ran in this process")
    run_module_in_subprocess(__file__)
