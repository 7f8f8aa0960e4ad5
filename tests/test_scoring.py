"""Scores: one UNet pass per timestep, maps for every alpha from one run, normalisation options."""

import pytest
import torch

from diffad.data import MVTecAD
from diffad.scoring import (
    MAP_TYPES,
    Normalizer,
    RawMaps,
    anomaly_maps,
    image_scores,
    normalized,
    score_raw,
    smooth,
)


@pytest.fixture(scope="module")
def test_images(tiny_builtin, tiny_preset):
    images, masks, labels = MVTecAD(tiny_builtin, "brick", "test", image_size=tiny_preset.image_size).stack()
    return images[:6], masks[:6, 0], labels[:6]


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and counts forward passes."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


def test_one_unet_pass_per_timestep_and_deterministic(tiny_model, test_images):
    images = test_images[0]
    counting = CountingUNet(tiny_model.unet)
    model = type(tiny_model)(tiny_model.preset, tiny_model.categories, counting, tiny_model.feature_channels)
    raw = score_raw(model, images, t_indices=(1, 4, 9), batch_size=4, seed=3)
    assert counting.calls == 3 * 2  # 3 timesteps x 2 batches (6 images, batch 4)
    for kind in MAP_TYPES:
        assert raw.get(kind).shape == (6, 3, 32, 32)
        assert torch.isfinite(raw.get(kind)).all()
    assert (raw.kl >= -1e-6).all() and (raw.rgb >= 0).all() and (raw.feature >= 0).all()
    # Same seed, other batch size: same maps (noise is tied to the image, not the batch).
    again = score_raw(model, images, t_indices=(1, 4, 9), batch_size=6, seed=3)
    assert torch.allclose(raw.kl, again.kl, atol=1e-5) and torch.allclose(raw.feature, again.feature, atol=1e-5)
    other = score_raw(model, images, t_indices=(1, 4, 9), batch_size=6, seed=4)
    assert not torch.allclose(raw.kl, other.kl)


def test_authors_timestep_mode_spends_a_second_pass(tiny_model, test_images):
    counting = CountingUNet(tiny_model.unet)
    model = type(tiny_model)(tiny_model.preset.replace(timestep_respacing="250"), tiny_model.categories, counting,
                             tiny_model.feature_channels)
    consistent = score_raw(model, test_images[0][:2], t_indices=(5,), timestep_mode="consistent")
    assert counting.calls == 1
    authors = score_raw(model, test_images[0][:2], t_indices=(5,), timestep_mode="authors")
    assert counting.calls == 3
    # Same noise and KL branch; the feature branch saw another timestep embedding.
    assert torch.allclose(consistent.kl, authors.kl, atol=1e-5)
    assert not torch.allclose(consistent.feature, authors.feature)


def test_authors_timestep_mode_without_respacing_reuses_the_pass(tiny_model, test_images):
    """Unrespaced, the raw index is the model's timestep: the second pass would repeat the first."""
    counting = CountingUNet(tiny_model.unet)
    model = type(tiny_model)(tiny_model.preset.replace(timestep_respacing=""), tiny_model.categories, counting,
                             tiny_model.feature_channels)
    consistent = score_raw(model, test_images[0][:2], t_indices=(5, 20), timestep_mode="consistent")
    authors = score_raw(model, test_images[0][:2], t_indices=(5, 20), timestep_mode="authors")
    assert counting.calls == 2 + 2
    for kind in MAP_TYPES:
        assert torch.equal(consistent.get(kind), authors.get(kind))


def test_the_authors_mode_over_a_consistent_scoring_computes_only_its_feature_passes(tiny_model, test_images):
    """Both modes make the same first pass: given the consistent maps, the authors' mode copies them
    and spends only its second, feature-only passes, and its maps are those of a scoring from scratch."""
    images = test_images[0][:5]
    counting = CountingUNet(tiny_model.unet)
    model = type(tiny_model)(tiny_model.preset.replace(timestep_respacing="250"), tiny_model.categories, counting,
                             tiny_model.feature_channels)
    t_indices = (0, 5, 50)  # index 0 is step 0 under either reading: no second pass there
    consistent = score_raw(model, images, t_indices=t_indices, timestep_mode="consistent", batch_size=3)
    scratch = score_raw(model, images, t_indices=t_indices, timestep_mode="authors", batch_size=3)
    counting.calls = 0
    reused = score_raw(model, images, t_indices=t_indices, timestep_mode="authors", batch_size=3,
                       same_pass=consistent)
    assert counting.calls == 2 * 2  # two respaced timesteps x two batches: the feature passes alone
    for kind in MAP_TYPES:
        assert torch.equal(reused.get(kind), scratch.get(kind)), kind
    assert torch.equal(reused.feature[:, 0], consistent.feature[:, 0])
    narrow = score_raw(model, images, t_indices=t_indices[:2], timestep_mode="authors", batch_size=3)
    counting.calls = 0
    both = score_raw(model, images, t_indices=t_indices, timestep_mode="authors", batch_size=3, known=narrow,
                     same_pass=consistent)
    assert counting.calls == 2 and all(torch.equal(both.get(kind), scratch.get(kind)) for kind in MAP_TYPES)
    with pytest.raises(ValueError, match="authors' timestep mode"):
        score_raw(model, images, t_indices=t_indices, timestep_mode="consistent", same_pass=consistent)
    with pytest.raises(ValueError, match="not this scoring's"):
        score_raw(model, images, t_indices=(5, 50), timestep_mode="authors", same_pass=consistent)


def test_known_maps_of_the_first_timesteps_are_copied_and_the_rest_scored(tiny_model, test_images):
    images = test_images[0]
    counting = CountingUNet(tiny_model.unet)
    model = type(tiny_model)(tiny_model.preset, tiny_model.categories, counting, tiny_model.feature_channels)
    wide = score_raw(model, images, t_indices=(1, 4, 9, 30), batch_size=4, seed=3)
    narrow = score_raw(model, images, t_indices=(1, 4), batch_size=4, seed=3)
    counting.calls = 0
    extended = score_raw(model, images, t_indices=(1, 4, 9, 30), batch_size=4, seed=3, known=narrow)
    assert counting.calls == 2 * 2  # the two new timesteps x 2 batches
    assert extended.timesteps == (1, 4, 9, 30)
    for kind in MAP_TYPES:  # the maps of a scoring from scratch, to the bit
        assert torch.equal(extended.get(kind), wide.get(kind))
        assert torch.equal(narrow.get(kind), wide.get(kind)[:, :2])
    assert torch.equal(score_raw(model, images, t_indices=(1, 4), seed=3, known=narrow).kl, narrow.kl)
    with pytest.raises(ValueError, match="not the first timesteps"):
        score_raw(model, images, t_indices=(4, 9), seed=3, known=narrow)
    with pytest.raises(ValueError, match="shape"):
        score_raw(model, images[:3], t_indices=(1, 4, 9), seed=3, known=narrow)


def _raw(n=4, k=2, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RawMaps(tuple(range(k)), *(torch.rand(n, k, h, h, generator=g) for _ in MAP_TYPES))


def test_ensemble_is_the_weighted_sum_for_any_alpha():
    raw = _raw()
    for alpha in (0.0, 0.3, 1.0):
        maps = anomaly_maps(raw, alpha=alpha, normalization="per_image")
        assert torch.allclose(maps["ensemble"], alpha * maps["kl"] + (1 - alpha) * maps["feature"])
    assert torch.allclose(anomaly_maps(raw, 1.0)["ensemble"], anomaly_maps(raw, 1.0)["kl"])


def test_normalizations():
    raw = _raw()
    per_image = normalized(raw, "kl", "per_image")
    # Per image and timestep z-scores average to zero mean per image.
    assert per_image.mean(dim=(1, 2)).abs().max() < 1e-5
    assert torch.equal(normalized(raw, "feature", "per_image"), raw.feature.mean(dim=1))  # the paper: raw
    val = _raw(seed=1)
    norm = Normalizer.fit(val)
    z = normalized(raw, "feature", "validation", norm)
    expected = ((raw.feature - val.feature.mean(dim=(0, 2, 3))[None, :, None, None])
                / val.feature.std(dim=(0, 2, 3))[None, :, None, None]).mean(dim=1)
    assert torch.allclose(z, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs a Normalizer"):
        normalized(raw, "kl", "validation")
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalized(raw, "kl", "global")
    with pytest.raises(ValueError, match="alpha must be in"):
        anomaly_maps(raw, alpha=1.5)


def test_smoothing_preserves_constants_and_spreads_a_spike():
    flat = torch.full((1, 16, 16), 3.0)
    assert torch.allclose(smooth(flat, 2.0), flat)
    spike = torch.zeros(1, 17, 17)
    spike[0, 8, 8] = 1.0
    blurred = smooth(spike, 1.5)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 8, 8] < 0.2 and blurred[0, 8, 10] > 0
    assert torch.equal(smooth(spike, 0.0), spike)


def test_blurred_maps_are_made_once_and_survive_a_selection_but_not_a_pickle():
    import io

    raw = _raw()
    first = raw.smoothed("kl", 1.0)
    assert torch.equal(first, smooth(raw.kl, 1.0))
    assert raw.smoothed("kl", 1.0) is first  # kept, not blurred again
    assert not torch.equal(raw.smoothed("kl", 0.5), first)  # another sigma is another entry
    picked = raw.select((raw.timesteps[-1],))
    assert set(picked.__dict__["_smoothed"]) == {("kl", 1.0), ("kl", 0.5)}  # carried over
    assert picked.timesteps == (raw.timesteps[-1],) and torch.equal(picked.kl, raw.kl[:, -1:])
    # each map is blurred on its own: selecting carries the blurred maps over, equal to blurring anew
    assert torch.equal(picked.smoothed("kl", 1.0), smooth(raw.kl[:, -1:], 1.0))
    with pytest.raises(ValueError, match="were not scored"):
        raw.select((999,))
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert "_smoothed" not in loaded.__dict__ and torch.equal(loaded.kl, raw.kl)
    assert torch.equal(loaded.smoothed("kl", 1.0), first)


def test_image_score_is_top_k_mean_scaled_with_area():
    maps = torch.zeros(2, 256, 256)
    maps[0].view(-1)[:64] = 1.0
    maps[1].view(-1)[:32] = 1.0
    assert image_scores(maps, 64).tolist() == [1.0, 0.5]
    small = torch.zeros(1, 64, 64)
    small.view(-1)[:4] = 2.0  # k = 64 * (64*64)/(256*256) = 4
    assert image_scores(small, 64).item() == 2.0


def test_bad_inputs_are_named(tiny_model, test_images):
    with pytest.raises(ValueError, match="trained at 32x32"):
        score_raw(tiny_model, torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        score_raw(tiny_model, torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        score_raw(tiny_model, torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="test timesteps"):
        score_raw(tiny_model, test_images[0][:1], t_indices=(5000,))


def _recording(preset):
    """A copy of ``preset`` that records which fields are read."""
    from diffad.presets import Preset, field_names

    names, read = set(field_names()), set()

    class Recording(Preset):
        def __getattribute__(self, name):
            if name in names:
                read.add(name)
            return super().__getattribute__(name)

    recording = Recording(**{f: getattr(preset, f) for f in names})
    read.clear()  # what the preset's own checks read when it was made
    return recording, read


def test_field_lists_match_the_fields_scoring_reads(tiny_model, test_images):
    """RAW_MAP_FIELDS keys the book's cache of raw maps: a scoring field that score_raw reads but
    the list lacks would let the book reuse stale maps. FINAL_MAP_FIELDS is what final_maps reads."""
    from diffad.presets import SCORING_FIELDS
    from diffad.scoring import FINAL_MAP_FIELDS, RAW_MAP_FIELDS, final_maps

    preset, read = _recording(tiny_model.preset)
    original, tiny_model.preset = tiny_model.preset, preset
    try:
        raw = score_raw(tiny_model, test_images[0][:2])
    finally:
        tiny_model.preset = original
    assert read & SCORING_FIELDS <= set(RAW_MAP_FIELDS) | {"score_batch_size"}, read & SCORING_FIELDS
    assert set(RAW_MAP_FIELDS) <= read
    read.clear()
    final_maps(raw, raw, preset)
    assert read == set(FINAL_MAP_FIELDS) and read <= SCORING_FIELDS
