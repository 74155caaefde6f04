"""Shared test set-up. Tests live in role folders (core, kernels, train, integrations, theory, bench); the helper
modules beside this file (train_helpers, trl_tiny, triton_interp, collective_check) are imported by name: pytest's
default (prepend) import mode puts this folder on sys.path because this conftest.py is here. Test file names are
unique across the folders for the same reason."""
