"""diffad: Removing Anomalies as Noises for Industrial Defect Localization (ICCV 2023).

The library grows out of the book, on two floors. The method's core: each module maps to a
chapter (data, backbones, diffusion, models, step and train, scoring, denoise, baselines and the
registry of methods, metrics, evaluate, detector for a folder of one's own photos), on a few
shared helpers (device and device_plan, io, checks, smoothing, tables, overlays). Above it,
:mod:`diffad.studies`: what the chapters measure and show, never imported by the core.

Timesteps, one convention everywhere: ``t_original`` is a step of the model's T = 1000
training steps; ``t_index`` indexes a respaced schedule (the preset's ``timestep_respacing``:
with "250", index 5 is original step 20). ``score_raw(t_indices=...)``, ``Preset.test_timesteps``
and ``feature_prediction(t_index)`` take indices; ``reconstruct(t_original=...)``,
``noise_sweep``/``timestep_profile(t_originals)`` take original steps; ``gradient_denoise``'s
``pull_t_index`` indexes the schedule its ``respacing`` names ("" = original steps).
"""

__version__ = "0.1.0"

import os as _os

# MKL picks some kernels by the memory alignment of their buffers, so the same CPU computation
# can differ in its last bits from one process to the next; chapter 8's gradient steps amplify
# that into a different first decimal. Strict conditional numerical reproducibility (read by
# MKL when it starts, so before torch is first used) keeps a chapter's numbers the same on
# every run on one machine; an MKL_CBWR of the user's own is left alone.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
