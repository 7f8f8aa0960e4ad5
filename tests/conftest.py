"""Shared test set-up: plots render off-screen; small datasets, presets and models. The
repository's own conftest.py keeps every test off the model hub and orders the chapters."""

import matplotlib

# Off-screen plots for this process only: an MPLBACKEND variable would reach nbval's kernels
# and stop them from showing figures inline.
matplotlib.use("Agg")

import pytest


@pytest.fixture(scope="session")
def tiny_builtin(tmp_path_factory):
    """A small built-in dataset at 32 px: two categories, few images (seconds to build)."""
    from diffad.data import make_builtin_dataset

    root = tmp_path_factory.mktemp("builtin")
    return make_builtin_dataset(root, seed=0, image_size=32, n_train=10, n_test_good=3, n_test_per_defect=1,
                                categories=["brick", "nut"])


TINY_OVERRIDES = dict(
    unet="tiny", image_size=32, batch_size=4, train_steps=6, lr_anneal_steps=6, checkpoint_every=3,
    backbone_input_size=64, max_train_timestep=100, score_batch_size=8, val_fraction=0.2,
)


@pytest.fixture(scope="session")
def tiny_preset():
    from diffad.presets import get_preset

    return get_preset("cpu", **TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(tiny_builtin, tiny_preset, tmp_path_factory):
    """A tiny model trained for a few steps on the 'brick' category."""
    from diffad.train import fit

    return fit(tiny_builtin, "brick", tmp_path_factory.mktemp("tiny_run"), tiny_preset, progress=False)
