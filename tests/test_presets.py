import pytest

from diffad.presets import PAPER, Preset, get_preset


def test_paper_preset_matches_method():
    p = get_preset("paper")
    assert (p.image_size, p.batch_size, p.train_steps, p.lr, p.ema_rate) == (256, 2, 10_000, 1e-4, 0.997)
    assert p.test_timesteps == (5, 50, 100) and p.timestep_respacing == "250"
    assert p.alpha == 0.5 and p.feature_loss_weight == 1.0 and p.top_k == 64
    assert p.unet == "paper" and p.class_cond


def test_override_and_round_trip():
    p = get_preset("cpu", train_steps=7, test_timesteps=(1, 2))
    assert p.train_steps == 7 and get_preset("cpu").train_steps != 7
    assert Preset.from_dict(p.to_dict()) == p
    assert "train_steps" in str(p) and "7" in str(p)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        get_preset("gpu")
    with pytest.raises(ValueError, match="unknown preset field"):
        get_preset("cpu", trian_steps=3)
    with pytest.raises(ValueError, match="unknown preset field"):
        PAPER.replace(alpah=0.3)
