"""Baselines of the paper's Table 1 that need no training: SPADE and PaDiM.

Both share one small, anomalib-like interface::

    model = PaDiM("tf_efficientnet_lite0", input_size=128)   # or SPADE(...)
    model.fit(train_images)                  # (N, 3, H, W) normal images in [0, 1]
    maps, scores = model.predict(test_images)  # (N, H, W) maps, (N,) image scores

``backbone`` is a timm name (the papers use ``wide_resnet50_2``, the default) or a built
:class:`diffad.backbones.FeatureExtractor`; the CPU preset and the tests use the offline
``tf_efficientnet_lite0``.
"""

from diffad.baselines.common import Prediction
from diffad.baselines.padim import PaDiM
from diffad.baselines.spade import SPADE

__all__ = ["PaDiM", "Prediction", "SPADE"]
