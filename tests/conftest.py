"""Shared test set-up: nothing may reach a model hub, plots render off-screen."""

import os

import matplotlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by nbval's kernels too: no hub there either
# Off-screen plots for this process only: an MPLBACKEND variable would reach nbval's kernels
# and stop them from showing figures inline.
matplotlib.use("Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pyproject's -n 2 each worker computes on one thread: two workers of two threads each
    # on two cores made the unit tests twice as slow (OpenMP threads waiting on each other). The
    # chapters' kernels are processes of their own and keep torch's default.
    import torch

    torch.set_num_threads(1)

import pytest
from tiny import TINY_OVERRIDES  # noqa: F401  (tests import it from tiny: book/ has a conftest too)


@pytest.fixture(scope="session")
def tiny_builtin(tmp_path_factory):
    """A small built-in dataset at 32 px: two categories, few images (seconds to build)."""
    from diffad.data import make_builtin_dataset

    root = tmp_path_factory.mktemp("builtin")
    return make_builtin_dataset(root, seed=0, image_size=32, n_train=10, n_test_good=3, n_test_per_defect=1,
                                categories=["brick", "nut"])


@pytest.fixture(scope="session")
def tiny_preset():
    from diffad.presets import get_preset

    return get_preset("cpu", **TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(tiny_builtin, tiny_preset, tmp_path_factory):
    """A tiny model trained for a few steps on the 'brick' category."""
    from diffad.train import fit

    return fit(tiny_builtin, "brick", tmp_path_factory.mktemp("tiny_run"), tiny_preset, progress=False)
