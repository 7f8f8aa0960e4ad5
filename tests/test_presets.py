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


def test_category_overrides_apply_to_that_category_alone():
    p = get_preset("cpu", category_overrides={"grass": {"train_steps": 600, "lr_anneal_steps": 600}})
    assert p.for_categories("grass").train_steps == 600
    assert p.for_categories(["brick"]).train_steps == p.train_steps  # other categories keep the preset's
    assert p.for_categories(["grass", "brick"]) is p  # a unified model takes the preset's own values
    assert Preset.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match=r"category_overrides\['grass'\] sets unknown or fixed field\(s\) \['trian_steps'\]"):
        get_preset("cpu", category_overrides={"grass": {"trian_steps": 1}}).for_categories("grass")
    with pytest.raises(ValueError, match="fixed"):
        get_preset("cpu", category_overrides={"grass": {"name": "x"}}).for_categories("grass")


def test_cpu_preset_trains_every_category_as_long_and_keeps_the_shipped_texture_models():
    from diffad.presets import training_differences, training_fingerprint

    cpu = get_preset("cpu")
    assert cpu.train_steps == cpu.lr_anneal_steps == 600 and not cpu.category_overrides
    for category in ("brick", "grass", "nut"):
        assert cpu.for_categories(category) is cpu
    # the grass and gravel models of the former overrides (600 steps) are the preset's own now
    former = cpu.replace(train_steps=200, lr_anneal_steps=200,
                         category_overrides={"grass": {"train_steps": 600, "lr_anneal_steps": 600}})
    assert not training_differences(former.for_categories("grass"), cpu)
    assert training_differences(former.for_categories("brick"), cpu) == ["train_steps", "lr_anneal_steps"]
    # scoring fields and the overrides table itself never change the fingerprint
    assert training_fingerprint(cpu.replace(alpha=0.1, category_overrides={"x": {}})) == training_fingerprint(cpu)


def test_every_cpu_departure_from_the_paper_has_a_recorded_reason():
    from diffad.presets import CPU, CPU_DEPARTURES, PAPER, departures

    rows = departures(CPU, PAPER, CPU_DEPARTURES)
    assert rows and all(r["why"] and r["kind"] in ("scale", "dev", "follows") for r in rows), \
        [r["field"] for r in rows if not r["why"]]
    assert {r["field"] for r in rows} == set(CPU_DEPARTURES)  # no stale reason either
    changed = departures(CPU.replace(alpha=0.5), CPU)
    assert [(r["field"], r["reference"], r["preset"], r["why"]) for r in changed] == [("alpha", CPU.alpha, 0.5, "")]
