"""The scoring study of chapter 7b (diffad.studies.scoring_study), on small synthetic maps."""

import numpy as np
import pytest
import torch

from diffad.evaluate import CategoryData, diffusion_rows
from diffad.presets import get_preset, with_paper_scoring
from diffad.scoring import RawMaps
from diffad.studies import scoring_study


def synthetic(category: str, seed: int, n: int = 10, size: int = 16):
    """A category whose KL map sees the defect sharply and whose feature map sees it blurred."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(2, n):
        x, y = torch.randint(0, size - 4, (2,), generator=g).tolist()
        masks[i, x:x + 4, y:y + 4] = 1
        labels[i] = 1

    def maps(count, mask=None, strength=1.0):
        base = torch.rand(count, 3, size, size, generator=g)
        if mask is not None:
            base = base + strength * mask[:, None]
        return base

    raw_test = RawMaps((5, 10, 20), maps(n, masks, 1.0), maps(n, masks, 1.0), maps(n, masks, 0.6) + 0.5)
    raw_val = RawMaps((5, 10, 20), maps(4), maps(4), maps(4) + 0.5)
    images = torch.zeros(n, 3, size, size)
    data = CategoryData(category, images[:4], images[:4], images, masks, labels,
                        ["good"] * 2 + ["scratch"] * (n - 2))
    return data, raw_test, raw_val


@pytest.fixture(scope="module")
def preset():
    return get_preset("cpu").replace(image_size=16)


def test_four_scorings_the_first_is_the_papers(preset):
    found = scoring_study.scorings(preset)
    assert [s.label for s in found] == ["per image, no blur", "per image, blur 2 px", "validation, no blur",
                                        "validation, blur 2 px"]
    paper = found[0].preset(preset)
    reference = with_paper_scoring(preset)
    for field in ("normalization", "image_normalization", "smoothing_sigma", "top_k"):
        assert getattr(paper, field) == getattr(reference, field)
    assert found[-1].preset(preset).smoothing_sigma == preset.smoothing_sigma
    assert len(scoring_study.scorings(preset.replace(smoothing_sigma=0.0))) == 2


@pytest.mark.parametrize("index", range(4))
def test_a_unit_agrees_with_the_evaluation(preset, index):
    """The study's KL, feature and alpha-0.5 numbers are those diffusion_rows gives the same scoring."""
    data, raw_test, raw_val = synthetic("brick", 0)
    scoring = scoring_study.scorings(preset)[index].preset(preset)
    unit = scoring_study.score_unit(data, raw_test, raw_val, scoring, alphas=(0.0, 0.5, 1.0), n_resamples=0)
    for alpha, method in ((1.0, "kl"), (0.0, "feature"), (0.5, "ensemble")):
        rows = {r["method"]: r for r in diffusion_rows(data, raw_test, raw_val, scoring, alpha=alpha)[0]}
        expected = [rows[method][m] for m in scoring_study.METRICS]
        assert unit["alphas"][str(alpha)] == pytest.approx(expected, abs=1e-9), (alpha, method)


def test_the_study_summarises_with_paired_intervals_and_caches(preset, tmp_path):
    sets = {"test": [synthetic("brick", 0), synthetic("nut", 1)]}
    study = scoring_study.scoring_study(sets, preset, alphas=(0.0, 0.5, 1.0), n_resamples=50, cache=tmp_path)
    assert len(study) == 4 and len(list((tmp_path / "studies").glob("*.json"))) == 8
    again = scoring_study.scoring_study(sets, preset, alphas=(0.0, 0.5, 1.0), n_resamples=50, cache=tmp_path)
    assert again == study  # read back from the cache
    for s in study:
        for m in scoring_study.METRICS:
            for alpha in scoring_study.INTERVAL_ALPHAS:
                low, high = s["intervals"][alpha][m]
                assert low <= high
            g = s["gain"][m]
            better = 1.0 if g["better"] == "KL" else 0.0
            assert g["difference"] == pytest.approx(s["by_alpha"][0.5][m] - s["by_alpha"][better][m])
            assert g["lo"] <= g["hi"]
            assert s["best"][m] in (0.0, 0.5, 1.0)
    table = scoring_study.study_markdown(study)
    assert table.count("\n| test |") == 12 and "alpha 0.5 minus the better branch" in table
    assert {v for row in scoring_study.verdicts(study, "test") for k, v in row.items() if k != "scoring"} <= {
        "ahead", "tie", "behind"}
