"""Tests of diffad.studies.ablations: rescoring settings, timestep ranges, PaDiM ablations, comparison tables."""

import pytest
import torch

from diffad.studies import ablations
from diffad.baselines import PaDiM
from diffad.evaluate import CategoryData
from diffad.presets import get_preset


@pytest.fixture(scope="module")
def tiny_data(tiny_builtin, tiny_preset):
    return [CategoryData.load(tiny_builtin, c, tiny_preset) for c in ("brick", "nut")]


def test_unified_overrides_are_class_conditional_and_longer():
    cpu = get_preset("cpu")
    overrides = ablations.unified_overrides("cpu")
    assert overrides["class_cond"] and overrides["train_steps"] == 2 * cpu.train_steps
    assert ablations.unified_overrides(get_preset("paper"))["train_steps"] == 20_000
    overrides["train_steps"] = 1  # a copy: the table itself is unchanged
    assert ablations.UNIFIED_TRAINING["cpu"]["train_steps"] == 1200
    with pytest.raises(ValueError, match="nope"):
        ablations.unified_overrides("nope")


def test_unified_overrides_of_other_presets_double_their_own_steps():
    # authors (what chapters 11b and 14 recommend on a GPU) and a preset made by hand
    assert ablations.unified_overrides("authors") == {
        "class_cond": True, "train_steps": 20_000, "lr_anneal_steps": 20_000}
    mine = get_preset("paper").replace(name="mine", train_steps=300)
    assert ablations.unified_overrides(mine)["train_steps"] == 600


def test_rescored_changes_scoring_only_and_shares_weights(tiny_model):
    other = ablations.rescored(tiny_model, test_timesteps=(1, 2), timestep_mode="authors")
    assert other.preset.test_timesteps == (1, 2) and other.preset.timestep_mode == "authors"
    assert other.unet is tiny_model.unet and tiny_model.preset.timestep_mode == "consistent"
    with pytest.raises(ValueError, match="train_steps"):
        ablations.rescored(tiny_model, train_steps=5)


def test_timestep_ranges_map_respaced_indices_to_original_steps():
    preset = get_preset("cpu", timestep_respacing="250", test_timesteps=(5, 50, 100))
    rows = ablations.timestep_ranges(preset)
    # 250 evenly spaced steps of 1000: index k is original step round(k * 999 / 249).
    assert [r["original_step"] for r in rows] == [round(k * 999 / 249) for k in (5, 50, 100)] == [20, 201, 401]
    assert [r["trained_on"] for r in rows] == [True, True, False]  # cpu trains t < 300 only
    plain = ablations.timestep_ranges(get_preset("cpu"), (5, 299, 300))
    assert [(r["original_step"], r["trained_on"]) for r in plain] == [(5, True), (299, True), (300, False)]
    assert all(r["trained_on"] for r in ablations.timestep_ranges(get_preset("paper")))
    with pytest.raises(ValueError, match="250"):
        ablations.timestep_ranges(preset, (250,))


def test_padim_row_and_backbone_ablation(tiny_data, tiny_preset):
    rows = ablations.backbone_ablation(tiny_data, ["tf_efficientnet_lite0"], tiny_preset, device="cpu")
    assert [(r["backbone"], r["category"], r["method"]) for r in rows] == [
        ("tf_efficientnet_lite0", "brick", "padim"), ("tf_efficientnet_lite0", "nut", "padim")]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("pixel_auroc", "pro", "image_auroc"))
    extractor = ablations.backbone_extractor(tiny_preset, device="cpu")
    assert extractor.grid_size == (tiny_preset.image_size // 4,) * 2 and rows[0]["channels"] == extractor.out_channels
    # The same as PaDiM run by hand on that extractor.
    expected = PaDiM(extractor=extractor, device="cpu").fit(tiny_data[0].train_images).predict(tiny_data[0].test_images)
    row, maps = ablations.padim_row(tiny_data[0], extractor, device="cpu")
    assert torch.allclose(maps, expected.maps) and row == rows[0]
    with pytest.raises(ValueError, match="at least one"):
        ablations.backbone_ablation([], ["tf_efficientnet_lite0"], tiny_preset)


def test_backbone_ablation_rows_come_from_a_cache_one_row_at_a_time(tiny_data, tiny_preset, monkeypatch):
    """With a cache, each (category, backbone) row is computed once: a later call for a subset
    (one category) reads it, builds no extractor, and gives the same rows as without a cache."""
    store, computed = {}, []

    def cache(kind, parts, compute):
        key = (kind, parts[0].category, parts[1])
        if key not in store:
            computed.append(key)
            store[key] = compute()
        return store[key]

    rows = ablations.backbone_ablation(tiny_data, ["tf_efficientnet_lite0"], tiny_preset, device="cpu", cache=cache)
    assert rows == ablations.backbone_ablation(tiny_data, ["tf_efficientnet_lite0"], tiny_preset, device="cpu")
    assert computed == [("padim-row", "brick", "tf_efficientnet_lite0"), ("padim-row", "nut", "tf_efficientnet_lite0")]
    monkeypatch.setattr(ablations, "backbone_extractor", lambda *a, **k: pytest.fail("built an extractor"))
    again = ablations.backbone_ablation(tiny_data[1:], ["tf_efficientnet_lite0"], tiny_preset, device="cpu",
                                        cache=cache)
    assert again == rows[1:] and len(computed) == 2
    pooled = ablations.unified_padim_rows(tiny_data, tiny_preset, device="cpu", cache=lambda k, p, c: ("read", k))
    assert pooled == ("read", "padim-pooled")


def test_unified_padim_fits_once_on_pooled_images(tiny_data, tiny_preset):
    rows = ablations.unified_padim_rows(tiny_data, tiny_preset, device="cpu")
    assert [(r["category"], r["method"]) for r in rows] == [("brick", "padim"), ("nut", "padim")]
    pooled = torch.cat([d.train_images for d in tiny_data])
    extractor = ablations.backbone_extractor(tiny_preset, device="cpu")
    row, _ = ablations.padim_row(tiny_data[1], extractor, train_images=pooled, device="cpu")
    assert row["pro"] == pytest.approx(rows[1]["pro"]) and row["pixel_auroc"] == pytest.approx(rows[1]["pixel_auroc"])


def test_backbone_options_put_offline_weights_first():
    from diffad.backbones import available_offline, default_layers

    options = ablations.backbone_options()
    names = [name for _, name in options]
    offline = available_offline()
    assert names[:len(offline)] == offline and "tf_efficientnet_lite0" in offline
    assert dict(options)["tf_efficientnet_lite0 (offline)"] == "tf_efficientnet_lite0"
    assert ("resnet18 (download)", "resnet18") in options and ("wide_resnet50_2 (download)", "wide_resnet50_2") in options
    assert len(set(names)) == len(names)
    for name in names:
        default_layers(name)  # every option has default feature stages


def _rows(values):
    return [{"category": c, "method": m, "pixel_auroc": 0.5, "pro": p, "image_auroc": 0.5}
            for (c, m), p in values.items()]


def test_comparison_markdown_and_average_change():
    per_category = _rows({("a", "ensemble"): 0.90, ("b", "ensemble"): 0.80, ("a", "padim"): 0.70})
    unified = _rows({("a", "ensemble"): 0.85, ("b", "ensemble"): 0.81, ("a", "padim"): 0.60})
    table = ablations.comparison_markdown(per_category, unified, ("ensemble",))
    assert "| a | 90.0 | 85.0 | -5.0 |" in table and "| b | 80.0 | 81.0 | +1.0 |" in table
    assert "| **average** | 85.0 | 83.0 | -2.0 |" in table
    assert ablations.average_change(per_category, unified, "ensemble") == pytest.approx(-0.02)
    assert ablations.average_change(per_category, unified, "padim") == pytest.approx(-0.10)
    # Only categories with every method in both sets are listed.
    both = ablations.comparison_markdown(per_category, unified, ("ensemble", "padim"))
    assert "| a |" in both and "| b |" not in both
    with pytest.raises(ValueError, match="spade"):
        ablations.average_change(per_category, unified, "spade")
    with pytest.raises(ValueError, match="metric"):
        ablations.comparison_markdown(per_category, unified, ("ensemble",), metric="f1")


def test_sweep_markdown_averages_over_categories():
    rows = [{"category": c, "method": "ensemble", "alpha": a, "test_timesteps": (5, 10),
             "pixel_auroc": p, "pro": p, "image_auroc": p}
            for c, a, p in (("x", 0.0, 0.50), ("y", 0.0, 0.70), ("x", 1.0, 0.90), ("y", 1.0, 0.95))]
    lines = ablations.sweep_markdown(rows, ("alpha", "test_timesteps"), metrics=("pro",)).splitlines()
    assert lines[0] == "| alpha | test_timesteps | ensemble |"
    assert lines[2:4] == ["| 0.0 | (5, 10) | 60.0 |", "| 1.0 | (5, 10) | 92.5 |"]
    assert "mean over 2 categories" in lines[-1]
    assert "| – |" in ablations.sweep_markdown(rows, ("alpha",), methods=("ensemble", "kl"))
    with pytest.raises(ValueError, match="sigma"):
        ablations.sweep_markdown(rows, ("sigma",))


def test_rank_timestep_subsets_tries_every_subset_best_first():
    from diffad.scoring import RawMaps

    g = torch.Generator().manual_seed(0)
    n, size = 6, 16
    masks = torch.zeros(n, size, size)
    masks[3:, 4:8, 4:8] = 1
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # Timestep 1 sees the defect clearly, timestep 2 faintly, timestep 3 not at all.
    strength = torch.tensor([3.0, 0.5, 0.0])[None, :, None, None]
    maps = [torch.rand(n, 3, size, size, generator=g) + strength * masks[:, None] for _ in range(3)]
    test = RawMaps((1, 2, 3), *maps)
    val = RawMaps((1, 2, 3), *(torch.rand(4, 3, size, size, generator=g) for _ in range(3)))
    data = CategoryData("x", torch.zeros(0), torch.zeros(0), torch.zeros(n, 3, size, size), masks, labels, ["d"] * n)
    preset = get_preset("cpu", smoothing_sigma=0.0)
    rows = ablations.rank_timestep_subsets(data, test, val, preset, max_size=2)
    assert len(rows) == 3 + 3 and {r["method"] for r in rows} == {"ensemble"}
    assert rows[0]["test_timesteps"] == (1,) and rows[-1]["test_timesteps"] == (3,)
    assert [r["pro"] for r in rows] == sorted((r["pro"] for r in rows), reverse=True)
    with pytest.raises(ValueError, match="max_size"):
        ablations.rank_timestep_subsets(data, test, val, preset, max_size=4)


def test_error_maps_come_from_the_passes_score_raw_makes(tiny_model, tiny_data):
    from diffad.scoring import score_raw

    images = tiny_data[0].test_images[:3]
    raw = score_raw(tiny_model, images, seed=4)
    maps = ablations.error_maps(tiny_model, images, seed=4)
    assert set(maps) == set(ablations.ERROR_MAPS)
    torch.testing.assert_close(maps["kl_learned"], raw.kl)
    torch.testing.assert_close(maps["rgb_absolute"], raw.rgb)
    torch.testing.assert_close(maps["rgb_squared"].sqrt(), maps["rgb_absolute"], atol=0.05, rtol=0.5)  # same error
    assert not torch.equal(maps["kl_fixed"], maps["kl_learned"])
    # one variance for both Gaussians: the KL is c_t^2 |x0 - x0_hat|^2 / (2 beta~) in nats, per element;
    # averaged over RGB the fixed-variance map is a per-timestep multiple of the squared error
    ratio = maps["kl_fixed"] / maps["rgb_squared"].clamp_min(1e-12)
    busy = maps["rgb_squared"] > 1e-6
    for j in range(ratio.shape[1]):
        values = ratio[:, j][busy[:, j]]
        assert values.std() / values.mean() < 1e-3


def test_error_map_rows_score_each_map_with_and_without_smoothing(tiny_model, tiny_data):
    rows = ablations.error_map_rows(tiny_model, tiny_data[0], sigmas=(0.0, 1.0))
    assert [(r["method"], r["smoothing"]) for r in rows] == [
        (m, s) for m in ablations.ERROR_MAPS for s in (0.0, 1.0)]
    assert all(0.0 <= r["pro"] <= 1.0 for r in rows)


def test_authors_training_changes_skip_what_the_preset_already_does():
    cpu = get_preset("cpu")
    # EfficientNet-Lite's own normalisation (mean 0.5, std 0.5) already maps [0, 1] to [-1, 1]
    assert list(ablations.authors_training_changes(cpu)) == ["grad_clip", "ema_warmup", "image_resize"]
    b4 = cpu.replace(backbone="tf_efficientnet_b4.aa_in1k")
    assert list(ablations.authors_training_changes(b4)) == [
        "grad_clip", "backbone_normalization", "ema_warmup", "image_resize"]
    assert ablations.authors_training_changes(get_preset("authors")) == {}
    assert list(ablations.authors_training_changes(cpu.replace(grad_clip=None))) == ["ema_warmup", "image_resize"]


def test_unnormalised_input_is_the_lite_backbones_own_normalisation():
    from diffad.backbones import FeatureExtractor, expects_diffusion_range

    assert expects_diffusion_range("tf_efficientnet_lite0") and not expects_diffusion_range("tf_efficientnet_b4")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ours = FeatureExtractor("tf_efficientnet_lite0", pretrained=False)
    theirs = FeatureExtractor("tf_efficientnet_lite0", pretrained=False, imagenet_normalize=False)
    torch.testing.assert_close(ours.normalize(images), theirs.normalize(images))


def test_authors_training_rows_score_each_variant_beside_the_base(tiny_model, tiny_builtin):
    asked = []

    def load_model(**fields):  # only the clipping variant "exists": the same weights stand in for it
        asked.append(fields)
        return ablations.rescored(tiny_model) if "grad_clip" in fields else None

    scored_with = []

    def scored(model, data):
        scored_with.append(model.preset.grad_clip)
        from diffad.evaluate import score_category
        return score_category(model, data)

    rows = ablations.authors_training_rows(load_model, tiny_builtin, "brick", scored, tiny_model,
                                           methods=("kl",))
    assert asked == list(ablations.authors_training_changes(tiny_model.preset).values())
    assert [r["difference"] for r in rows] == ["none", "grad_clip"] and len(scored_with) == 2


def test_matched_unified_model_trains_each_category_as_long_as_its_own_model():
    cpu = get_preset("cpu")
    assert ablations.matched_unified_overrides(cpu, ["brick", "capsule", "nut"]) == {
        "class_cond": True, "train_steps": 1800, "lr_anneal_steps": 1800}
    longer = cpu.replace(category_overrides={"grass": {"train_steps": 1000, "lr_anneal_steps": 1000}})
    both = ablations.matched_unified_overrides(longer, ["brick", "grass"])  # grass trains 1000 alone
    assert both["train_steps"] == 1600


def test_variant_studies_train_the_cpu_preset_shorter_and_other_presets_as_they_are():
    cpu = get_preset("cpu")
    study = ablations.variant_study_preset(cpu)
    assert (study.train_steps, study.lr_anneal_steps) == (200, 200) and cpu.train_steps == 600
    assert ablations.variant_study_preset(get_preset("paper")) == get_preset("paper")
