"""Shared test set-up: nothing may reach a model hub, plots render off-screen."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
