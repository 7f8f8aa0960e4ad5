"""A shipped checkpoint is reproducible: retrain one category with the cpu preset and check it.

This is the slow test (about 3 minutes on 2 cores): the same command the checkpoints README
gives, on the built-in data, then the test split scored with the preset's settings. It retrains
the shipped 200-step brick model of the variant studies (``ablations.variant_study_preset``):
the same code as the preset's own 600-step model, a third as long, which keeps CI in budget.
"""

import pytest

from diffad.studies import book
from diffad.studies.ablations import variant_study_preset
from diffad.evaluate import CategoryData, diffusion_rows, score_category
from diffad.presets import get_preset
from diffad.train import TrainedModel, fit


@pytest.fixture(scope="module")
def builtin_256(tmp_path_factory):
    from diffad.data import make_builtin_dataset

    return make_builtin_dataset(tmp_path_factory.mktemp("builtin256"), seed=0, image_size=256,
                                categories=["brick"])


@pytest.mark.slow
def test_retrained_brick_matches_the_shipped_checkpoint(builtin_256, tmp_path):
    preset = variant_study_preset(get_preset("cpu"))
    assert preset.train_steps == 200
    shipped_path = book.shipped_checkpoint(preset, ["brick"])
    assert shipped_path is not None, "the 200-step brick model should ship with diffad"
    retrained = fit(builtin_256, "brick", tmp_path, preset, progress=False)
    data = CategoryData.load(builtin_256, "brick", preset)
    results = {}
    for name, model in (("retrained", retrained), ("shipped", TrainedModel.load(shipped_path))):
        model.preset = preset
        rows, _, _ = diffusion_rows(data, *score_category(model, data), preset)
        results[name] = {r["method"]: r for r in rows}
    for name in results:
        ensemble = results[name]["ensemble"]
        assert ensemble["pixel_auroc"] >= 0.93 and ensemble["pro"] >= 0.85 and ensemble["image_auroc"] >= 0.9, (
            name, ensemble)
    for key in ("pixel_auroc", "pro"):
        assert abs(results["retrained"]["ensemble"][key] - results["shipped"]["ensemble"][key]) < 0.05
