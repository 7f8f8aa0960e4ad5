"""Shared test set-up: nothing may reach a model hub, plots render off-screen."""

import os

import matplotlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by nbval's kernels too: no hub there either
# Off-screen plots for this process only: an MPLBACKEND variable would reach nbval's kernels
# and stop them from showing figures inline.
matplotlib.use("Agg")

import pytest


def pytest_collection_modifyitems(config, items):
    """Every notebook cell nbval collects is in the slow tier, like retraining and the book build;
    tests marked ``after_chapters`` run last, after the chapters have filled book/cache."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("after_chapters") is not None)  # stable


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
