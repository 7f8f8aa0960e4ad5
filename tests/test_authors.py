"""The ``authors`` preset: each way the released code departs from the paper, pinned against a
transcription of the authors' lines (VandyLu/anomaly_diff) on small tensors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffad.backbones import FeatureExtractor
from diffad.data.mvtec import authors_mask
from diffad.models import create_unet
from diffad.presets import get_preset, training_differences
from diffad.scoring import score_raw, standardize_kl_authors


def test_authors_preset_names_each_difference():
    authors, paper = get_preset("authors"), get_preset("paper")
    assert (authors.timestep_mode, authors.test_feature_grid, authors.kl_standardization) == ("authors", 16, "authors")
    assert (authors.mask_rule, authors.pro_implementation, authors.normalization) == ("authors", "authors", "none")
    assert authors.grad_clip is None and authors.precision == "fp16" and not authors.backbone_normalization
    assert not authors.ema_warmup and authors.image_resize == "authors"
    # Four of them change what training learns; the rest are read at scoring time or on the device.
    assert sorted(training_differences(paper, authors)) == [
        "backbone_normalization", "ema_warmup", "grad_clip", "image_resize"]


def test_every_difference_is_a_field_the_authors_preset_sets():
    from diffad.presets import AUTHORS_DIFFERENCES, AUTHORS_UNMODELLED, PAPER, field_names

    authors = get_preset("authors")
    for name, paper_text, code_text, where in AUTHORS_DIFFERENCES:
        assert name in field_names() and getattr(authors, name) != getattr(PAPER, name), name
        assert ":" in where or where.startswith("train.sh"), where  # a file and a line
    assert all(len(entry) == 3 for entry in AUTHORS_UNMODELLED)


def test_ema_without_warmup_is_their_fixed_rate_from_the_first_step():
    from diffad.step import ema_rate_at

    # guided_diffusion/train_util.py: update_ema(params, master_params, rate=rate) with rate fixed
    assert [ema_rate_at(step, 0.997, warmup=False) for step in (0, 1, 10_000)] == [0.997] * 3
    assert ema_rate_at(0, 0.997) == pytest.approx(0.1) and ema_rate_at(10_000, 0.997) == 0.997


def test_kl_standardization_is_their_zscore_over_the_whole_map():
    kl = torch.rand(2, 3, 8, 8) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    ours = standardize_kl_authors(kl)
    for i in range(2):  # calc_bpd_loop, test batch size 1: vb = (vb - vb.mean()) / vb.std()
        vb = kl[i:i + 1]
        torch.testing.assert_close(ours[i:i + 1], (vb - vb.mean()) / vb.std())


def _center_crop_arr(pil_image, image_size):
    """guided_diffusion/image_datasets.py center_crop_arr, as the authors wrote it."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("size", [64, 100])
def test_mask_rule_keeps_only_full_pixels_like_their_loader(size):
    mask = np.zeros((400, 400), dtype=np.uint8)
    mask[100:300, 150:160] = 255  # a bar 10 px wide: thin at the target size
    mask[50:52, 20:380] = 255     # a 2 px line: vanishes
    picture = Image.fromarray(mask)
    theirs = (torch.from_numpy(_center_crop_arr(picture, size).astype(np.int64)) / 255).long().numpy()
    ours = authors_mask(picture, (size, size))
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    nearest = np.asarray(picture.resize((size, size), Image.NEAREST)) > 0
    assert ours.sum() < nearest.sum()  # edges eroded, the thin line gone


@pytest.mark.parametrize("size", [64, 100])
def test_image_resize_is_their_center_crop_arr(tmp_path, size):
    from diffad.data.mvtec import MVTecAD

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))
    (tmp_path / "toy" / "train" / "good").mkdir(parents=True)
    picture.save(tmp_path / "toy" / "train" / "good" / "000.png")
    theirs = _center_crop_arr(picture, size).astype(np.float32) / 255.0
    for rule, same in (("authors", True), ("bilinear", False)):
        item = MVTecAD(tmp_path, "toy", "train", image_size=size, val_fraction=0.0, image_resize=rule)[0]
        ours = item["image"].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, theirs) == same, rule
    with pytest.raises(ValueError, match="image_resize must be one of"):
        MVTecAD(tmp_path, "toy", "train", image_resize="lanczos")


def test_feature_grid_resizes_the_decoder_map_before_the_head():
    torch.manual_seed(0)
    unet = create_unet("tiny", feature_channels=8).eval()
    for p in unet.parameters():  # ADM zero-initialises output layers; give the head something to do
        p.data.add_(0.01 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    tapped = {}
    handle = unet.output_blocks[unet.feature_block_index].register_forward_hook(
        lambda module, inputs, output: tapped.setdefault("h", output))
    with torch.no_grad():
        _, full = unet(x, t, return_features=True)
        _, small = unet(x, t, return_features=True, feature_grid=4)
    handle.remove()
    assert full.shape[-2:] == (8, 8) and small.shape[-2:] == (4, 4)
    # unet.py line 708: h_resize = F.interpolate(h, size=(feat_shape, feat_shape), mode='bilinear')
    expected = unet.feature_head(F.interpolate(tapped["h"], size=(4, 4), mode="bilinear"))
    torch.testing.assert_close(small, expected)


def test_backbone_input_and_target_grid_as_the_authors_build_them():
    extractor = FeatureExtractor("tf_efficientnet_lite0", pretrained=False, imagenet_normalize=False)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(extractor.normalize(x), x)  # the [-1, 1] image as it is
    stages = extractor.stage_features(x)
    # calc_bpd_loop: each stage resized to feat_shape, then concatenated
    expected = torch.cat([F.interpolate(f, size=(4, 4), mode="bilinear") for f in stages], dim=1)
    torch.testing.assert_close(extractor(x, grid=(4, 4)), expected)


def test_scoring_with_the_authors_fields(tiny_model, tiny_builtin):
    from diffad.data import MVTecAD

    images = MVTecAD(tiny_builtin, "brick", split="test", image_size=32).stack()[0][:3]
    original = tiny_model.preset
    tiny_model.preset = original.replace(kl_standardization="authors", test_feature_grid=4, timestep_mode="authors")
    try:
        raw = score_raw(tiny_model, images)
    finally:
        tiny_model.preset = original
    # The z-scored KL, averaged over RGB, has mean 0 over each image at each timestep.
    assert raw.kl.mean(dim=(2, 3)).abs().max() < 1e-4
    assert raw.feature.shape == raw.kl.shape  # upsampled back to the image from the 4x4 grid
    with pytest.raises(ValueError, match="kl_standardization"):
        tiny_model.preset = original.replace(kl_standardization="zscore")
        try:
            score_raw(tiny_model, images)
        finally:
            tiny_model.preset = original


def test_scoring_changes_scale_the_grid_and_skip_what_cannot_differ():
    from diffad.studies.ablations import authors_difference_table, authors_scoring_changes
    from diffad.presets import AUTHORS_DIFFERENCES

    paper, cpu = authors_scoring_changes(get_preset("paper")), authors_scoring_changes(get_preset("cpu"))
    assert paper["test_feature_grid"] == {"test_feature_grid": 16} and "timestep_mode" in paper
    assert cpu["test_feature_grid"] == {"test_feature_grid": 4} and "timestep_mode" not in cpu  # no respacing
    assert cpu["all together"]["kl_standardization"] == "authors" and cpu["all together"]["normalization"] == "none"
    authors = get_preset("authors")
    table = authors_difference_table()
    for field, *_ in AUTHORS_DIFFERENCES:  # every listed difference is a real field the preset sets
        assert f"`{field}`" in table and getattr(authors, field) != getattr(get_preset("paper"), field)
