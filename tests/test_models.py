"""Tests for diffad.models: the ADM UNet, its feature head, configs and checkpoint loading."""

from __future__ import annotations

import functools
import http.server
import math
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from diffad.models import (
    GUIDED_DIFFUSION_URLS,
    UNetModel,
    count_parameters,
    create_unet,
    default_channel_mult,
    download_guided_diffusion_checkpoint,
    load_guided_diffusion_checkpoint,
    timestep_embedding,
    unet_config,
)
from diffad.models.unet import GroupNorm32, QKVAttention, QKVAttentionLegacy, upsample_nearest_2x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one thread; restored afterwards, since a module-level call would
    leave every later test of the session (retraining included) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> UNetModel:
    torch.manual_seed(0)
    return create_unet("tiny", **overrides)


def randomize_zero_initialised(model: UNetModel) -> UNetModel:
    """Give the zero-initialised convs (residual outputs, attention projections, out.2) random
    weights, as training would, so that every path through the network carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1 and torch.count_nonzero(parameter) == 0:
                parameter.normal_(0.0, 0.05)
    return model


# ----------------------------------------------------------------------------- forward


def test_tiny_forward_shapes_and_zero_initial_output():
    model = tiny(num_classes=None).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([1, 500]))
    assert out.shape == (2, 6, 32, 32) and out.dtype == torch.float32
    # out.2 is zero-initialised, so a fresh network predicts exactly zero.
    assert torch.count_nonzero(out) == 0


def test_return_features_shape_at_quarter_resolution():
    model = tiny(feature_channels=8).eval()
    for size in (32, 64):  # the head reads 1/4 of whatever the input size is
        out, features = model(torch.randn(3, 3, size, size), torch.tensor([0, 10, 999]), return_features=True)
        assert out.shape == (3, 6, size, size)
        assert features.shape == (3, 8, size // 4, size // 4)
        assert features.abs().sum() > 0  # the head is not zero-initialised


def test_class_conditioning_changes_features():
    model = randomize_zero_initialised(tiny(num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    _, features = model(x, torch.tensor([7, 7]), torch.tensor([0, 4]), return_features=True)
    assert not torch.allclose(features[0], features[1])


def test_scalar_timestep_is_broadcast():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    _, a = model(x, 17, return_features=True)
    _, b = model(x, torch.tensor([17, 17]), return_features=True)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "overrides, call, message",
    [
        ({}, dict(y=torch.tensor([0, 1])), "unconditional"),
        ({"num_classes": 3}, dict(), "pass y"),
        ({"num_classes": 3}, dict(y=torch.tensor([0, 3])), r"\[0, 3\)"),
        ({"num_classes": 3}, dict(y=torch.tensor([0.0, 1.0])), "integer"),
        ({"num_classes": 3}, dict(y=torch.tensor([0])), r"shape \(2,\)"),
        ({}, dict(x=torch.randn(2, 3, 30, 32)), "divisible by 4"),
        ({}, dict(x=torch.randn(2, 1, 32, 32)), "in_channels=3"),
        ({}, dict(x=torch.randn(3, 32, 32)), r"\(B, C, H, W\)"),
        ({}, dict(t=torch.tensor([1, 2, 3])), "timesteps"),
        ({"feature_channels": None}, dict(return_features=True), "feature_channels"),
    ],
)
def test_forward_rejects_bad_input(overrides, call, message):
    model = tiny(**overrides)
    x = call.pop("x", torch.randn(2, 3, 32, 32))
    t = call.pop("t", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=message):
        model(x, t, **call)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_channels": 16}, "multiple of 32"),
        ({"channel_mult": (1, 2), "attention_resolutions": (2,)}, "at least 3 levels"),
        ({"attention_resolutions": (16,)}, "not downsample rates"),
        ({"attention_resolutions": "16"}, "sequence of downsample rates"),
        ({"num_head_channels": 48}, "num_head_channels=48"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"channel_mult": "1,x"}, "comma-separated"),
        ({"bogus": 1}, "unknown UNetConfig fields"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        unet_config("tiny", **overrides)


def test_config_names_defaults_and_printing():
    with pytest.raises(ValueError, match="unknown UNet config"):
        unet_config("huge")
    assert unet_config("paper", image_size=128, channel_mult="", attention_resolutions=(4, 8, 16)).channel_mult == (
        1, 1, 2, 3, 4)
    assert unet_config("tiny", channel_mult="1,1,2").channel_mult == (1, 1, 2)
    assert default_channel_mult(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert default_channel_mult(64) == (1, 2, 3, 4)
    paper = unet_config("paper")
    assert paper.learn_sigma and paper.out_channels == 6 and paper.feature_resolution == 64
    assert paper.attention_resolutions == (8, 16, 32)
    text = str(paper)
    assert "num_head_channels = 64" in text and "feature_channels = 272" in text
    config = unet_config("tiny", num_classes=15)
    model = create_unet(config, dropout=0.1)
    assert model.config == config.replace(dropout=0.1)
    assert UNetModel(**model.config.to_kwargs()).config == model.config


def test_cpu_config_is_a_small_model():
    model = create_unet("cpu", feature_channels=112)
    assert 1_000_000 <= count_parameters(model) <= 3_000_000
    _, features = model.eval()(torch.randn(1, 3, 64, 64), 5, return_features=True)
    assert features.shape == (1, 112, 16, 16)


# ----------------------------------------------------------------------------- the paper's model


def expected_adm_parameter_count(image_size, model_channels, num_res_blocks, attention_rates, channel_mult,
                                 num_classes, out_channels, scale_shift=True, resblock_updown=True, in_channels=3):
    """Parameter count of guided-diffusion's UNet, counted from the architecture description."""
    emb = 4 * model_channels
    norm = lambda c: 2 * c  # noqa: E731
    conv3 = lambda a, b: 9 * a * b + b  # noqa: E731
    conv1 = lambda a, b: a * b + b  # noqa: E731

    def res(a, b):
        emb_out = 2 * b if scale_shift else b
        skip = 0 if a == b else conv1(a, b)
        return norm(a) + conv3(a, b) + emb * emb_out + emb_out + norm(b) + conv3(b, b) + skip

    def attn(c):
        return norm(c) + conv1(c, 3 * c) + conv1(c, c)

    total = (model_channels * emb + emb) + (emb * emb + emb) + (num_classes or 0) * emb
    chans = [m * model_channels for m in channel_mult]
    total += conv3(in_channels, chans[0])
    skips, ch, rate = [chans[0]], chans[0], 1
    for level, c in enumerate(chans):
        for _ in range(num_res_blocks):
            total += res(ch, c) + (attn(c) if rate in attention_rates else 0)
            ch = c
            skips.append(c)
        if level < len(chans) - 1:
            total += res(ch, ch) if resblock_updown else conv3(ch, ch)
            skips.append(ch)
            rate *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(len(chans))):
        c = chans[level]
        for i in range(num_res_blocks + 1):
            total += res(ch + skips.pop(), c)
            ch = c
            total += attn(c) if rate in attention_rates else 0
            if level and i == num_res_blocks:
                total += res(c, c) if resblock_updown else conv3(c, c)
                rate //= 2
    return total + norm(ch) + conv3(ch, out_channels)


def test_paper_model_parameter_count_and_feature_head():
    with torch.device("meta"):
        model = create_unet("paper", feature_channels=None)
        with_head = create_unet("paper")
        mvtec = create_unet("paper", num_classes=15)
    expected = expected_adm_parameter_count(256, 256, 2, (8, 16, 32), (1, 1, 2, 2, 4, 4), 1000, 6)
    # 553,838,086 is also what guided-diffusion's own UNetModel counts for these flags (about
    # 554M, the figure quoted for ADM's 256x256 ImageNet model; 2.2 GB as float32).
    assert expected == 553_838_086
    assert count_parameters(model) == expected
    head = (2 * 512) + (512 * 272 + 272)  # GroupNorm(512) + 1x1 conv 512 -> 272
    assert count_parameters(with_head) == expected + head
    assert count_parameters(mvtec) == expected + head - 985 * 1024
    # The authors tap output_blocks[10]: 512 channels at 64x64 for a 256 px input.
    assert with_head.feature_block_index == 10 and with_head.feature_head_in_channels == 512
    assert tuple(with_head.feature_head[2].weight.shape) == (272, 512, 1, 1)
    with torch.device("meta"):
        out, features = mvtec(torch.empty(1, 3, 256, 256), torch.tensor([5]), torch.tensor([3]), return_features=True)
    assert out.shape == (1, 6, 256, 256) and features.shape == (1, 272, 64, 64)


def test_independent_count_matches_small_configs():
    config = unet_config("cpu", num_classes=None)
    expected = expected_adm_parameter_count(64, 32, 1, (8,), (1, 2, 2, 2), None, 6)
    assert count_parameters(create_unet(config)) == expected
    plain = config.replace(resblock_updown=False, use_scale_shift_norm=False, num_res_blocks=2, num_classes=4)
    expected = expected_adm_parameter_count(64, 32, 2, (8,), (1, 2, 2, 2), 4, 6, scale_shift=False,
                                            resblock_updown=False)
    assert count_parameters(create_unet(plain)) == expected


# ----------------------------------------------------------------------------- guided-diffusion compatibility


def _res(prefix, cin, cout, emb, skip=True):
    """Hand-written guided-diffusion ResBlock keys (scale-shift norm: emb_layers gives 2*cout)."""
    keys = {
        f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
        f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
        f"{prefix}.emb_layers.1.weight": (2 * cout, emb), f"{prefix}.emb_layers.1.bias": (2 * cout,),
        f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
        f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,),
    }
    if cin != cout and skip:
        keys[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        keys[f"{prefix}.skip_connection.bias"] = (cout,)
    return keys


def _attn(prefix, c):
    return {
        f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
        f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
        f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,),
    }


def test_state_dict_names_and_shapes_match_guided_diffusion():
    # guided-diffusion flags: image_size 32, num_channels 32, num_res_blocks 1, attention at
    # 16 px (rate 2), channel_mult 1,2, 10 classes, learn_sigma, resblock_updown,
    # use_scale_shift_norm, num_head_channels 32. Keys written out by reading its unet.py.
    e = 128
    expected = {
        "time_embed.0.weight": (e, 32), "time_embed.0.bias": (e,),
        "time_embed.2.weight": (e, e), "time_embed.2.bias": (e,),
        "label_emb.weight": (10, e),
        "input_blocks.0.0.weight": (32, 3, 3, 3), "input_blocks.0.0.bias": (32,),
        **_res("input_blocks.1.0", 32, 32, e),
        **_res("input_blocks.2.0", 32, 32, e),  # down-sampling ResBlock (h_upd/x_upd: no params)
        **_res("input_blocks.3.0", 32, 64, e), **_attn("input_blocks.3.1", 64),
        **_res("middle_block.0", 64, 64, e), **_attn("middle_block.1", 64), **_res("middle_block.2", 64, 64, e),
        **_res("output_blocks.0.0", 128, 64, e), **_attn("output_blocks.0.1", 64),
        **_res("output_blocks.1.0", 96, 64, e), **_attn("output_blocks.1.1", 64),
        **_res("output_blocks.1.2", 64, 64, e),  # up-sampling ResBlock
        **_res("output_blocks.2.0", 96, 32, e),
        **_res("output_blocks.3.0", 64, 32, e),
        "out.0.weight": (32,), "out.0.bias": (32,),
        "out.2.weight": (6, 32, 3, 3), "out.2.bias": (6,),
    }
    model = create_unet("tiny", channel_mult=(1, 2), num_classes=10, feature_channels=None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected


def test_attention_head_layouts():
    torch.manual_seed(0)
    heads, ch, length = 2, 4, 5
    qkv = torch.randn(3, heads * 3 * ch, length)

    def naive(q, k, v):  # (ch, T) each
        weight = torch.softmax(q.T @ k / math.sqrt(ch), dim=-1)  # (T, S)
        return v @ weight.T

    legacy = QKVAttentionLegacy(heads)(qkv)
    new = QKVAttention(heads)(qkv)
    for b in range(3):
        for h in range(heads):
            # legacy: per head a contiguous [q; k; v] block of 3*ch channels
            block = qkv[b, h * 3 * ch:(h + 1) * 3 * ch]
            torch.testing.assert_close(legacy[b, h * ch:(h + 1) * ch], naive(block[:ch], block[ch:2 * ch], block[2 * ch:]))
            # new order: q, k, v thirds, each split into heads
            q, k, v = (qkv[b, i * heads * ch + h * ch:i * heads * ch + (h + 1) * ch] for i in range(3))
            torch.testing.assert_close(new[b, h * ch:(h + 1) * ch], naive(q, k, v))


def test_timestep_embedding_convention():
    t = torch.tensor([0.0, 2.0])
    emb = timestep_embedding(t, 7)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] + [0.0] for s in (0.0, 2.0)]
    torch.testing.assert_close(emb, torch.tensor(expected))


def test_group_norm32_computes_in_float32():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.group_norm(x.float(), 32, eps=1e-5).to(torch.bfloat16)
    torch.testing.assert_close(out, reference)
    with pytest.raises(ValueError, match="divisible by 32"):
        GroupNorm32(48)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm32_on_bfloat16_on_a_cpu_matches_the_float32_path(channels_last):
    """The mixed-type kernel (no casts) against casting to float32 and back: values, gradients, layout."""
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, 64, 8, 8) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=layout)
    grad = torch.randn(x.shape).to(torch.bfloat16).contiguous(memory_format=layout)

    def through_float32(xx):
        return torch.nn.functional.group_norm(xx.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)

    results = []
    for path in (through_float32, norm):
        norm.zero_grad()
        xx = x.clone().requires_grad_()
        out = path(xx)
        out.backward(grad)
        results.append((out, xx.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=layout)
        assert norm.weight.grad.dtype == torch.float32
    (out32, gx32, gw32, gb32), (out, gx, gw, gb) = results
    assert (out == out32).float().mean() > 0.99 and (gx == gx32).float().mean() > 0.99
    torch.testing.assert_close(out, out32, atol=0.02, rtol=0.01)
    torch.testing.assert_close(gx, gx32, atol=0.02, rtol=0.01)
    torch.testing.assert_close(gw, gw32, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gb, gb32)


# ----------------------------------------------------------------------------- gradients


def _backward_tiny_conditional(model: UNetModel) -> None:
    out, features = model.train()(torch.randn(2, 3, 32, 32), torch.tensor([3, 40]), torch.tensor([0, 2]),
                                  return_features=True)
    loss = (out - torch.randn_like(out)).square().mean() + (features - torch.randn_like(features)).square().mean()
    loss.backward()


def test_gradient_reaches_every_parameter_including_the_head():
    fresh = tiny(num_classes=3)
    _backward_tiny_conditional(fresh)
    # Behind the zero-initialised out.2 gradients may be zero at first, but they must exist.
    assert [name for name, p in fresh.named_parameters() if p.grad is None] == []
    for name in ("out.2.weight", "feature_head.2.weight", "feature_head.0.weight", "input_blocks.0.0.weight"):
        assert fresh.get_parameter(name).grad.abs().sum() > 0, name
    # Once the zero-initialised layers hold weights, every parameter gets a nonzero gradient.
    trained_like = randomize_zero_initialised(tiny(num_classes=3))
    _backward_tiny_conditional(trained_like)
    assert [name for name, p in trained_like.named_parameters() if p.grad.abs().sum() == 0] == []


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny()
    checkpointed = create_unet("tiny", use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 9])
    grads = []
    for model in (plain, checkpointed):
        out, features = model.train()(x, t, return_features=True)
        (out.sum() + features.square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


# ----------------------------------------------------------------------------- checkpoint loading


def openai_style_state_dict(model: UNetModel, num_classes: int | None = 1000) -> dict:
    """Our weights re-keyed as an OpenAI file would hold them: no head, another label table."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("feature_head.")}
    state.pop("label_emb.weight", None)
    if num_classes is not None:
        state["label_emb.weight"] = torch.randn(num_classes, 4 * model.model_channels)
    for value in state.values():
        value.add_(0.5)  # make loaded values distinguishable from the target's own init
    return state


def test_load_skips_label_embedding_and_reports_new_head(tmp_path):
    source = tiny(num_classes=None)
    path = tmp_path / "openai.pt"
    saved = openai_style_state_dict(source, num_classes=1000)
    torch.save(saved, path)
    target = tiny(num_classes=15)
    own_label_emb = target.label_emb.weight.detach().clone()
    report = load_guided_diffusion_checkpoint(target, path)
    assert report["skipped"] == ["label_emb.weight"]
    assert sorted(report["new"]) == sorted(k for k in target.state_dict() if k.startswith("feature_head."))
    assert report["loaded"] == len(saved) - 1
    state = target.state_dict()
    for key, value in saved.items():
        if key != "label_emb.weight":
            torch.testing.assert_close(state[key], value)
    torch.testing.assert_close(target.label_emb.weight, own_label_emb)


def test_load_unconditional_file_into_conditional_model_and_back(tmp_path):
    source = tiny(num_classes=None)
    path = tmp_path / "uncond.pt"
    torch.save(openai_style_state_dict(source, num_classes=None), path)
    report = load_guided_diffusion_checkpoint(tiny(num_classes=15), path)
    assert "label_emb.weight" in report["new"] and report["skipped"] == []
    conditional_path = tmp_path / "cond.pt"
    torch.save(openai_style_state_dict(source, num_classes=1000), conditional_path)
    report = load_guided_diffusion_checkpoint(tiny(num_classes=None, feature_channels=None), conditional_path)
    assert report["skipped"] == ["label_emb.weight"] and report["new"] == []


def test_load_rejects_wrong_shape_missing_and_unexpected_keys(tmp_path):
    source = tiny(num_classes=None)
    target = tiny(num_classes=15)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    bad_shape = openai_style_state_dict(source)
    bad_shape["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "bad_shape.pt"
    torch.save(bad_shape, path)
    with pytest.raises(ValueError, match=r"input_blocks\.1\.0\.in_layers\.2\.weight") as info:
        load_guided_diffusion_checkpoint(target, path)
    assert "bad_shape.pt" in str(info.value)

    missing = openai_style_state_dict(source)
    del missing["middle_block.1.qkv.weight"]
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"missing from the file: middle_block\.1\.qkv\.weight"):
        load_guided_diffusion_checkpoint(target, path)

    extra = openai_style_state_dict(source)
    extra["input_blocks.99.0.weight"] = torch.zeros(1)
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"not in the model: input_blocks\.99\.0\.weight"):
        load_guided_diffusion_checkpoint(target, path)

    for key, value in target.state_dict().items():  # nothing was copied by the failed loads
        torch.testing.assert_close(value, before[key])


def test_load_rejects_files_that_are_not_checkpoints(tmp_path):
    model = tiny()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch checkpoint\n" * 10)
    with pytest.raises(ValueError, match="garbage.pt is not a readable torch checkpoint"):
        load_guided_diffusion_checkpoint(model, garbage)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_guided_diffusion_checkpoint(model, not_a_state_dict)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_guided_diffusion_checkpoint(model, tmp_path / "absent.pt")


def test_load_accepts_a_wrapped_state_dict(tmp_path):
    source = tiny()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict(), "step": torch.tensor(3)}, path)
    report = load_guided_diffusion_checkpoint(tiny(), path)
    assert report == {"loaded": len(source.state_dict()), "skipped": [], "new": []}


# ----------------------------------------------------------------------------- download


def test_download_calls_download_url_with_the_named_url(tmp_path, monkeypatch):
    calls = []

    def fake_download_url(url, dest, **kwargs):
        calls.append((url, Path(dest)))
        Path(dest).write_bytes(b"x")
        return Path(dest)

    fake = types.ModuleType("diffad.download")
    fake.download_url = fake_download_url
    fake.file_hash = lambda path: "ab" * 32
    monkeypatch.setitem(sys.modules, "diffad.download", fake)
    path = download_guided_diffusion_checkpoint(tmp_path / "ckpt", "256x256_diffusion_uncond")
    assert path == tmp_path / "ckpt" / "256x256_diffusion_uncond.pt" and path.exists()
    assert '"sha256": "' + "ab" * 32 in path.with_name(path.name + ".json").read_text()  # recorded
    assert calls == [(GUIDED_DIFFUSION_URLS["256x256_diffusion_uncond"], path)]
    with pytest.raises(ValueError, match="unknown guided-diffusion checkpoint"):
        download_guided_diffusion_checkpoint(tmp_path, "1024x1024")


def test_download_from_a_loopback_server_then_load(tmp_path, monkeypatch):
    pytest.importorskip("diffad.download")
    served = tmp_path / "served"
    served.mkdir()
    source = tiny(num_classes=None)
    torch.save(openai_style_state_dict(source, num_classes=1000), served / "file.pt")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file.pt"
        monkeypatch.setitem(GUIDED_DIFFUSION_URLS, "256x256_diffusion", url)
        path = download_guided_diffusion_checkpoint(tmp_path / "dest")
    finally:
        server.shutdown()
        server.server_close()
    assert path.read_bytes() == (served / "file.pt").read_bytes()
    report = load_guided_diffusion_checkpoint(tiny(num_classes=15), path)
    assert report["skipped"] == ["label_emb.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 32, 16, 16), (2, 3, 5, 7)])
def test_upsampling_equals_interpolate_in_values_and_gradients_to_the_bit(dtype, shape):
    """The UNet's fast 2x upsampling is F.interpolate's nearest mode, forward and backward, so a
    trained model's weights do not move."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], generator=generator).to(dtype)
    expected = F.interpolate(x, scale_factor=2, mode="nearest")
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    got = upsample_nearest_2x(x)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.equal(upsample_nearest_2x(channels_last), F.interpolate(channels_last, scale_factor=2, mode="nearest"))
    with pytest.raises(ValueError, match="N, C, H, W"):
        upsample_nearest_2x(x.detach()[0])
