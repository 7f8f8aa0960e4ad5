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
    assert rows and all(r["why"] and r["kind"] in ("scale", "dev", "follows", "test") for r in rows), \
        [r["field"] for r in rows if not r["why"]]
    assert {r["field"] for r in rows} == set(CPU_DEPARTURES)  # no stale reason either
    # a setting chosen on a reported test split says so in its line
    assert all("test" in r["why"] for r in rows if r["kind"] == "test")
    changed = departures(CPU.replace(alpha=0.5), CPU)
    assert [(r["field"], r["reference"], r["preset"], r["why"]) for r in changed] == [("alpha", CPU.alpha, 0.5, "")]


# ---------------------------------------------------------------- validated at the boundary


def test_every_field_has_a_rule():
    from diffad.presets import FIELD_RULES, field_names

    assert set(FIELD_RULES) == set(field_names())


@pytest.mark.parametrize("field, value, allowed", [
    # the cases of issue 27
    ("alpha", -1, "a number in [0, 1]"),
    ("alpha", 2, "a number in [0, 1]"),
    ("image_size", 0, "an integer >= 1"),
    ("batch_size", 0, "an integer >= 1"),
    ("top_k", -5, "an integer >= 1"),
    ("smoothing_sigma", -1, "a number >= 0"),
    ("train_steps", "abc", "an integer >= 1"),
    # int: not a float, not a bool, not a string
    ("train_steps", 1.5, "an integer >= 1"),
    ("score_batch_size", True, "an integer >= 1"),
    ("seed", -1, "an integer >= 0"),
    ("lr_anneal_steps", -1, "an integer >= 0"),
    ("checkpoint_every", 0, "an integer >= 1"),
    # float
    ("lr", 0, "a number > 0"),
    ("lr", float("nan"), "a number > 0"),
    ("val_fraction", 1.0, "a number in [0, 1)"),
    ("ema_rate", 1, "a number in [0, 1)"),
    ("alpha", "0.5", "a number in [0, 1]"),
    ("alpha", True, "a number in [0, 1]"),
    ("weight_decay", -0.1, "a number >= 0"),
    ("denoise_step_size", 0.0, "a number > 0"),
    # choice
    ("precision", "fp8", "one of 'auto', 'fp32', 'fp16', 'bf16'"),
    ("normalization", "zscore", "one of 'per_image', 'validation', 'none'"),
    ("image_resize", "lanczos", "one of 'bilinear', 'authors'"),
    ("noise_schedule", "quadratic", "one of 'linear', 'cosine'"),
    ("ema_device", "gpu", "one of 'auto', 'device', 'cpu'"),
    ("checkpoint_format", "small", "one of 'auto', 'exact', 'compact'"),
    ("model_dtype", "bfloat16", "one of 'auto', 'float32', 'float16'"),
    ("mask_rule", 255, "one of 'any', 'authors'"),
    ("timestep_respacing", "abc", "'' (no respacing), section counts such as '250' or '10,20', or 'ddimN'"),
    ("timestep_respacing", 250, "'' (no respacing), section counts such as '250' or '10,20', or 'ddimN'"),
    # tuple
    ("test_timesteps", (), "a non-empty tuple of integers >= 0"),
    ("test_timesteps", [5, 10], "a non-empty tuple of integers >= 0"),
    ("test_timesteps", (5, -1), "a non-empty tuple of integers >= 0"),
    ("test_timesteps", (5.0,), "a non-empty tuple of integers >= 0"),
    ("backbone_layers", (1, "2"), "None or a non-empty tuple of integers >= 0"),
    # dict
    ("unet_overrides", [("model_channels", 64)], "a dict with string keys"),
    ("category_overrides", None, "a dict with string keys"),
    # bool and optional
    ("class_cond", 1, "True or False"),
    ("gradient_checkpointing", "yes", "None, True or False"),
    ("grad_clip", 0, "None or a number > 0"),
    ("max_train_timestep", 0, "None or an integer >= 1"),
    ("image_normalization", "zscore", "None or one of 'per_image', 'validation', 'none'"),
    ("init_checkpoint", "", "None or a non-empty string"),
    ("unet", None, "a non-empty string"),
])
def test_a_bad_value_names_the_field_the_value_and_what_is_allowed(field, value, allowed):
    import re

    from diffad.presets import PresetError

    message = f"Preset field {field!r} must be {allowed}, got {value!r}"
    with pytest.raises(PresetError, match=f"^{re.escape(message)}$"):
        get_preset("cpu", **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):  # a PresetError is a ValueError
        Preset(name="mine", **{field: value})


def test_every_allowed_choice_and_every_kind_of_good_value_is_accepted():
    from diffad.presets import FIELD_RULES

    for name, rule in FIELD_RULES.items():
        for choice in rule.choices:
            assert getattr(get_preset("cpu", **{name: choice}), name) == choice
    good = dict(alpha=1, smoothing_sigma=4, val_fraction=0, ema_rate=0.0, grad_clip=None, lr=2e-3,
                test_timesteps=(0,), backbone_layers=(1, 2), unet_overrides={"model_channels": 64},
                timestep_respacing="ddim25", init_checkpoint="256x256_diffusion", gradient_checkpointing=True,
                max_train_timestep=None, category_overrides={"grass": {"train_steps": 600, "alpha": 0.5}})
    p = get_preset("cpu", **good)
    assert {k: getattr(p, k) for k in good} == good
    assert type(p.alpha) is int  # an int where a float is meant is kept as given (fingerprints unchanged)
    for spec in ("", "250", "10,20", "ddim10"):
        assert get_preset("paper", timestep_respacing=spec).timestep_respacing == spec


def test_category_overrides_are_checked_when_the_preset_is_made():
    from diffad.presets import PresetError

    with pytest.raises(PresetError, match=r"^category_overrides\['grass'\]: Preset field 'alpha' must be a number "
                                          r"in \[0, 1\], got 3$"):
        get_preset("cpu", category_overrides={"grass": {"alpha": 3}})
    with pytest.raises(PresetError, match="must map each category to a dict of field overrides, got 'grass': 600"):
        get_preset("cpu", category_overrides={"grass": 600})


def test_unknown_fields_get_the_close_names():
    from diffad.presets import PresetError

    with pytest.raises(PresetError, match=r"unknown preset field\(s\) \['alpah'\]; did you mean 'alpha'\?"):
        PAPER.replace(alpah=0.3)
    with pytest.raises(PresetError, match=r"unknown preset field\(s\) \['zzz'\]; fields are name, image_size, "):
        PAPER.replace(zzz=1)


@pytest.mark.parametrize("field, text, value", [
    ("train_steps", "10_000", 10_000),
    ("alpha", "1", 1),
    ("lr", "1e-3", 1e-3),
    ("unet", "'tiny'", "tiny"),
    ("unet", "tiny", "tiny"),
    ("precision", "fp32", "fp32"),
    ("timestep_respacing", "250", "250"),
    ("timestep_respacing", "''", ""),
    ("init_checkpoint", "None", None),
    ("grad_clip", "None", None),
    ("class_cond", "true", True),
    ("class_cond", "False", False),
    ("test_timesteps", "5,10,20", (5, 10, 20)),
    ("test_timesteps", "[5, 10]", (5, 10)),
    ("test_timesteps", "7", (7,)),
    ("unet_overrides", "{'model_channels': 64}", {"model_channels": 64}),
])
def test_set_values_are_read_by_the_field_type(field, text, value):
    from diffad.presets import parse_field

    parsed = parse_field(field, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("field, text, message", [
    ("train_steps", "abc", "Preset field 'train_steps' must be an integer >= 1, got 'abc'"),
    ("train_steps", "1.5", "Preset field 'train_steps' must be an integer >= 1, got 1.5"),
    ("alpha", "-1", "Preset field 'alpha' must be a number in [0, 1], got -1"),
    ("alpha", "high", "Preset field 'alpha' must be a number in [0, 1], got 'high'"),
    ("precision", "fp8", "Preset field 'precision' must be one of 'auto', 'fp32', 'fp16', 'bf16', got 'fp8'"),
    ("test_timesteps", "5,x", "Preset field 'test_timesteps' must be a non-empty tuple of integers >= 0, got '5,x'"),
    ("unet_overrides", "64", "Preset field 'unet_overrides' must be a dict with string keys, got 64"),
    ("grad_clip", "0", "Preset field 'grad_clip' must be None or a number > 0, got 0"),
    ("class_cond", "maybe", "Preset field 'class_cond' must be True or False, got 'maybe'"),
    ("category_overrides", "{'grass': {'train_steps': 0}}",
     "category_overrides['grass']: Preset field 'train_steps' must be an integer >= 1, got 0"),
])
def test_set_refuses_a_value_of_the_wrong_type_naming_the_field(field, text, message):
    import re

    from diffad.presets import PresetError, parse_field

    with pytest.raises(PresetError, match=f"^{re.escape(message)}$"):
        parse_field(field, text)


def test_set_refuses_an_unknown_field_naming_the_close_ones():
    from diffad.presets import PresetError, parse_field

    with pytest.raises(PresetError, match=r"unknown preset field\(s\) \['trian_steps'\]; did you mean 'train_steps'"):
        parse_field("trian_steps", "3")


def test_every_preset_and_every_shipped_checkpoint_preset_still_constructs():
    from pathlib import Path

    import diffad
    from diffad.io import load_torch_file
    from diffad.presets import PRESETS

    for preset in PRESETS.values():
        assert Preset.from_dict(preset.to_dict()) == preset
    shipped = sorted((Path(diffad.__file__).parent / "resources" / "checkpoints").glob("*.pt"))
    assert shipped
    for path in shipped:
        preset = Preset.from_dict(load_torch_file(path)["preset"])
        assert preset.name == "cpu", path


def test_the_choice_sets_are_those_their_consumers_use():
    from diffad import device, presets, scoring
    from diffad.data import mvtec
    from diffad.diffusion import get_named_beta_schedule

    assert presets.PRECISIONS == device.PRECISION_CHOICES  # device imports nothing from diffad: a copy
    assert scoring.NORMALIZATIONS is presets.NORMALIZATIONS and scoring.TIMESTEP_MODES is presets.TIMESTEP_MODES
    assert scoring.KL_STANDARDIZATIONS is presets.KL_STANDARDIZATIONS
    assert mvtec.MASK_RULES is presets.MASK_RULES and mvtec.IMAGE_RESIZES is presets.IMAGE_RESIZES
    for schedule in presets.NOISE_SCHEDULES:
        assert len(get_named_beta_schedule(schedule, 100)) == 100
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 100)
