"""Baselines that need no training: SPADE and PaDiM (the paper's Table 1) and PatchCore.

All three share one small, anomalib-like interface::

    model = PaDiM("tf_efficientnet_lite0", input_size=128)   # or SPADE(...), PatchCore(...)
    model.fit(train_images)                  # (N, 3, H, W) normal images in [0, 1]
    maps, scores = model.predict(test_images)  # (N, H, W) maps, (N,) image scores

``backbone`` is a timm name (the papers use ``wide_resnet50_2``, the default) or a built
:class:`diffad.backbones.FeatureExtractor`; the CPU preset and the tests use the offline
``tf_efficientnet_lite0``. PatchCore (Roth et al., CVPR 2022) is not in the paper's Table 1;
by its published numbers it is the strongest of the three on MVTec-AD.
"""

from diffad.baselines.common import Prediction
from diffad.baselines.padim import PaDiM
from diffad.baselines.patchcore import PatchCore
from diffad.baselines.spade import SPADE

__all__ = ["PaDiM", "PatchCore", "Prediction", "SPADE"]
