"""The development sweep: its rows are the evaluation's own numbers, and the choice follows its rule."""

import pytest
import torch

from diffad.studies import tuning
from diffad.evaluate import CategoryData, diffusion_rows
from diffad.presets import get_preset
from diffad.scoring import RawMaps


def _toy_category(name: str, seed: int) -> tuple[CategoryData, RawMaps, RawMaps]:
    """16 test images (8 defective: half seen by the KL map only, half by the feature map only)."""
    g = torch.Generator().manual_seed(seed)
    n, size = 16, 16
    masks = torch.zeros(n, size, size)
    for i in range(8):
        y, x = 2 + i % 4 * 3, 3 + i // 4 * 6
        masks[i, y:y + 3, x:x + 4] = 1
    labels = (masks.flatten(1).sum(1) > 0).long()

    def raw(count: int, with_defects: bool) -> RawMaps:
        kl = torch.rand(count, 3, size, size, generator=g)
        feature = torch.rand(count, 3, size, size, generator=g) * 0.5
        if with_defects:
            kl[:4] += 1.5 * masks[:4, None]
            feature[4:8] += 0.8 * masks[4:8, None]
        return RawMaps((5, 10, 20), kl, kl.clone(), feature)

    data = CategoryData(name, torch.zeros(2, 3, size, size), torch.zeros(6, 3, size, size),
                        torch.zeros(n, 3, size, size), masks, labels, ["x"] * 8 + ["good"] * 8)
    return data, raw(n, True), raw(6, False)


@pytest.fixture(scope="module")
def toy():
    return [_toy_category("a", 0), _toy_category("b", 1)]


SMALL_GRID = {"alpha": (0.0, 0.5, 1.0), "smoothing_sigma": (0.0, 1.0), "top_k": (64, 1024)}


def test_sweep_rows_are_what_evaluation_reports(toy):
    rows = tuning.sweep(toy, SMALL_GRID)
    points = 3 * 2 * 2 * 2 * 2  # alpha, normalization, image normalization, sigma, top_k
    assert len(rows) == 2 * points * 3
    preset = get_preset("cpu")
    for setting in ({"alpha": 0.5, "normalization": "validation", "image_normalization": "per_image",
                     "smoothing_sigma": 1.0, "top_k": 64},
                    {"alpha": 1.0, "normalization": "per_image", "image_normalization": "validation",
                     "smoothing_sigma": 0.0, "top_k": 1024}):
        data, raw_test, raw_val = toy[1]
        expected, _, _ = diffusion_rows(data, raw_test, raw_val, preset.replace(**setting))
        for method in ("ensemble", "kl", "feature"):
            want = next(r for r in expected if r["method"] == method)
            got = next(r for r in rows if r["category"] == "b" and r["method"] == method
                       and all(r[k] == v for k, v in setting.items()))
            for metric in ("pixel_auroc", "pro", "image_auroc"):
                assert got[metric] == pytest.approx(want[metric], abs=1e-9), (setting, method, metric)


def test_choice_follows_the_rule(toy):
    rows = tuning.sweep(toy, SMALL_GRID)
    ranked = tuning.ranked(rows)
    assert len(ranked) == 3 * 2 * 2 * 2 * 2
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    best = ranked[0]
    chosen = tuning.choose(rows)
    assert chosen == {k: best[k] for k in tuning.SCORING_GRID}
    manual = [r for r in rows if r["method"] == "ensemble" and all(r[k] == v for k, v in chosen.items())]
    assert best["score"] == pytest.approx(tuning.selection_score(manual))
    # each branch sees half of the defects: neither alone is the choice
    assert chosen["alpha"] == 0.5
    effects = tuning.setting_effects(rows, chosen)
    assert [e["value"] for e in effects if e["setting"] == "alpha"] == [0.0, 0.5, 1.0]
    assert max(e["score"] for e in effects) == pytest.approx(best["score"])


def test_sweep_refuses_unknown_settings_and_methods(toy):
    with pytest.raises(ValueError, match="covers"):
        tuning.sweep(toy, {"test_timesteps": ((5,),)})
    with pytest.raises(ValueError, match="unknown method"):
        tuning.sweep(toy, SMALL_GRID, methods=("padim",))
    with pytest.raises(ValueError, match="no rows of method"):
        tuning.ranked(tuning.sweep(toy, SMALL_GRID, methods=("kl",)))


def test_preset_point_reads_none_as_the_maps_normalisation():
    point = tuning.preset_point(get_preset("cpu", normalization="validation", image_normalization=None))
    assert point["image_normalization"] == "validation" and set(point) == set(tuning.SCORING_GRID)
    for name, value in tuning.preset_point(get_preset("cpu")).items():
        assert value in tuning.SCORING_GRID[name], name  # the preset's own point is on the grid


@pytest.mark.slow
def test_tune_command_trains_scores_and_chooses(tmp_path, capsys):
    import json

    from diffad.cli import main
    from diffad.data import make_development_dataset

    from conftest import TINY_OVERRIDES

    with pytest.raises(SystemExit, match="one of --crosscheck and --development"):
        main(["builtin", str(tmp_path / "both"), "--crosscheck", "--development"])
    root = make_development_dataset(tmp_path / "dev", image_size=32, n_train=10, n_test_good=3, n_test_per_defect=1)
    sets = sum((["--set", f"{k}={v!r}"] for k, v in TINY_OVERRIDES.items()), [])
    assert main(["tune", "--data-root", str(root), "--out", str(tmp_path / "runs")] + sets) == 0
    written = json.loads((tmp_path / "runs" / "chosen.json").read_text())
    assert written["categories"] == ["coin", "tissue"]
    assert set(written["chosen"]) == set(tuning.SCORING_GRID)
    assert (tmp_path / "runs" / "chosen.json").read_text() in capsys.readouterr().out
    for category in ("coin", "tissue"):
        assert (tmp_path / "runs" / category / "model.pt").is_file()
    lines = (tmp_path / "runs" / "sweep.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 704 * 3  # header, 2 categories x 704 settings x 3 methods
