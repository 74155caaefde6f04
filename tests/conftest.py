"""Shared test set-up. Tests live in role folders (core, kernels, train, integrations, theory, bench); the helper
modules beside this file (train_helpers, trl_tiny, triton_interp, collective_check) are imported by name: pytest's
default (prepend) import mode puts this folder on sys.path because this conftest.py is here. Test file names are
unique across the folders for the same reason."""
import pytest
import torch


@pytest.fixture
def world_of_one():
    """A gloo process group of one in this process (the trainer's collectives run as in a real job)."""
    from fastpmd.train.distributed import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    yield d
    shutdown_distributed()
