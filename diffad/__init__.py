"""diffad: Removing Anomalies as Noises for Industrial Defect Localization (ICCV 2023).

The library grows out of the book: each module maps to a chapter (data, backbones,
diffusion, models, train, scoring, denoise, baselines, metrics, evaluate).
"""

__version__ = "0.1.0"
