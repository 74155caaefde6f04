"""Op-level microbenchmarks with pytest-benchmark: `pytest bench/micro --benchmark-only`.

One forward+backward of every method (the same adapters as `fastpmd bench`) on one small fp32 shape, for
PMD-mean and GRPO, plus the matmul floor. Methods that cannot run here are skipped with their reason.
Kept out of the default `pytest` run (testpaths = ["tests"]).
"""
import pytest
import torch

from fastpmd.bench.inputs import make_inputs
from fastpmd.bench.methods import FLOOR, METHODS, loss_config
from fastpmd.bench.presets import shape_for_tokens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = shape_for_tokens(512, 256, 8192, seq_len=128)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(SHAPE, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("loss", ["pmd-mean", "grpo"])
@pytest.mark.parametrize("name", [*METHODS, FLOOR.name])
def test_fwd_bwd(benchmark, inputs, name, loss):
    method = FLOOR if name == FLOOR.name else METHODS[name]
    reason = method.skip_reason(loss, DEVICE)
    if reason:
        pytest.skip(reason)
    step = method.build(inputs, loss_config(loss))
    step()  # warm-up (compilation happens here)
    benchmark.extra_info.update(tokens=inputs.tokens, flops=method.flops(inputs, loss_config(loss)))

    def run():
        step()
        _sync()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    inputs.zero_grad()
