"""diffad.studies.book: the model cache, the no-training guard and the scored-maps cache the chapters share."""

import copy
import os

import pytest
import torch

from diffad.studies import book
from diffad.studies.ablations import rescored
from diffad.evaluate import CategoryData
from diffad.presets import PRESETS, PresetError, get_preset


@pytest.fixture(autouse=True)
def no_preset_from_the_environment(monkeypatch):
    """These tests choose their presets themselves: a DIFFAD_PRESET or DIFFAD_SET exported in the
    developer's shell must not switch them (the tests below set them through monkeypatch)."""
    monkeypatch.delenv("DIFFAD_PRESET", raising=False)
    monkeypatch.delenv("DIFFAD_SET", raising=False)


@pytest.fixture()
def ctx(tiny_builtin, tiny_preset, tmp_path):
    return book.setup(tiny_preset, data_root=tiny_builtin, cache=tmp_path / "cache", device="cpu")


def test_setup_names_the_preset_data_and_cache(ctx, tiny_builtin, tmp_path):
    assert ctx.categories == ["brick", "nut"]
    assert ctx.data_root == tiny_builtin and ctx.cache == (tmp_path / "cache").resolve()
    assert "2 categories: brick, nut" in str(ctx)


def test_paper_preset_without_mvtec_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAD_MVTEC", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DIFFAD_MVTEC"):
        book.setup("paper", cache=tmp_path)


def test_no_training_when_not_allowed(ctx):
    with pytest.raises(RuntimeError, match="none ships with diffad") as error:
        book.trained_model(ctx, "brick", progress=False, allow_training=False)
    assert "python -m diffad train" in str(error.value)
    assert not book.model_folder(ctx, ["brick"]).exists()


def test_trained_once_then_served_from_the_cache(ctx):
    first = book.trained_model(ctx, "brick", progress=False)
    again = book.trained_model(ctx, "brick", progress=False, allow_training=False)  # cached now: no error
    for a, b in zip(first.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_shipped_cpu_checkpoints_are_listed():
    from diffad.studies.ablations import unified_overrides
    from diffad.data import BUILTIN_CATEGORIES, DEVELOPMENT_CATEGORIES

    cpu = get_preset("cpu")
    assert set(BUILTIN_CATEGORIES) | set(DEVELOPMENT_CATEGORIES) <= book.shipped_categories(cpu)
    # chapter 11b's unified model of every built-in category, in the order list_categories gives
    every = sorted(BUILTIN_CATEGORIES)
    assert book.shipped_checkpoint(cpu.replace(**unified_overrides(cpu)), every) is not None


def test_scored_each_gives_each_categorys_cached_maps(ctx, tiny_model, monkeypatch):
    from diffad import io

    datasets = {c: CategoryData.load(ctx.data_root, c, tiny_model.preset) for c in ("brick", "nut")}
    models = {c: tiny_model for c in datasets}
    order = []
    real_build_each = io.build_each
    monkeypatch.setattr(book, "build_each", lambda paths, *rest: order.append(paths) or real_build_each(paths, *rest))
    raw = book.scored_each(ctx, models, datasets)
    assert list(raw) == ["brick", "nut"] and len(order[0]) == 2  # both scored through build_each
    for c in datasets:
        assert torch.equal(raw[c][0].kl, book.scored(ctx, tiny_model, datasets[c])[0].kl)
    assert len(list((ctx.cache / "scores").glob("*.pt"))) == 2


def test_scored_maps_are_cached_and_keyed_on_weights_and_settings(ctx, tiny_model):
    data = CategoryData.load(ctx.data_root, "brick", tiny_model.preset)
    raw_test, raw_val = book.scored(ctx, tiny_model, data)
    files = list((ctx.cache / "scores").glob("*.pt"))
    assert len(files) == 1 and raw_test.kl.shape[0] == len(data.test_images)
    assert torch.equal(book.scored(ctx, tiny_model, data)[0].kl, raw_test.kl)  # read back, not rescored
    key = book.scores_key(tiny_model, data)
    # scoring-only fields applied after the raw maps share the cache entry
    assert book.scores_key(rescored(tiny_model, alpha=0.9, smoothing_sigma=0.0), data) == key
    assert book.scores_key(rescored(tiny_model, test_timesteps=(1, 2)), data) != key
    assert book.scores_key(tiny_model, data, seed=1) != key
    retrained = copy.deepcopy(tiny_model)  # other weights, same settings: must not read stale maps
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(1e-3)
    assert book.scores_key(retrained, data) != key


def record_reused_maps(monkeypatch, argument: str) -> list:
    """Make book.score_category record its ``argument`` (the maps it was handed to reuse) per call."""
    from diffad import evaluate

    passed = []
    score = evaluate.score_category
    monkeypatch.setattr(book, "score_category", lambda *a, **k: passed.append(k.get(argument)) or score(*a, **k))
    return passed


def assert_same_maps(got, expected) -> None:
    """Test and validation maps equal to the bit."""
    for maps, reference in zip(got, expected):
        assert maps.timesteps == reference.timesteps
        for kind in ("kl", "rgb", "feature"):
            assert torch.equal(maps.get(kind), reference.get(kind))


def test_a_wider_scoring_scores_only_the_timesteps_a_cached_one_lacks(ctx, tiny_model, monkeypatch):
    from diffad import evaluate

    data = CategoryData.load(ctx.data_root, "brick", tiny_model.preset)
    narrow = rescored(tiny_model, test_timesteps=(1, 4))
    wide = rescored(tiny_model, test_timesteps=(1, 4, 9))
    from_scratch = evaluate.score_category(wide, data)
    narrow_maps = book.scored(ctx, narrow, data)
    passed = record_reused_maps(monkeypatch, "known")
    wide_maps = book.scored(ctx, wide, data)
    assert len(passed) == 1 and all(torch.equal(k.kl, n.kl) for k, n in zip(passed[0], narrow_maps))
    assert wide_maps[0].timesteps == (1, 4, 9)
    assert_same_maps(wide_maps, from_scratch)
    # a scoring that is not a prefix (another first timestep) is scored from scratch
    passed.clear()
    book.scored(ctx, rescored(tiny_model, test_timesteps=(2, 4, 9)), data)
    assert passed == [None]


def test_an_authors_mode_scoring_reuses_the_cached_consistent_one(ctx, tiny_model, monkeypatch):
    from diffad import evaluate

    data = CategoryData.load(ctx.data_root, "brick", tiny_model.preset)
    setting = dict(timestep_respacing="250", test_timesteps=(5, 50))
    authors = rescored(tiny_model, timestep_mode="authors", **setting)
    from_scratch = evaluate.score_category(authors, data)
    consistent = book.scored(ctx, rescored(tiny_model, timestep_mode="consistent", **setting), data)
    passed = record_reused_maps(monkeypatch, "same_pass")
    got = book.scored(ctx, authors, data)
    assert len(passed) == 1 and all(torch.equal(s.kl, c.kl) for s, c in zip(passed[0], consistent))
    assert_same_maps(got, from_scratch)
    passed.clear()  # the consistent mode itself has nothing to reuse
    book.scored(ctx, rescored(tiny_model, timestep_mode="consistent", timestep_respacing="250",
                              test_timesteps=(5, 60)), data)
    assert passed == [None]


def test_reproduce_reads_the_books_scored_maps(ctx, tiny_model, monkeypatch):
    from diffad import evaluate

    calls = []
    scorer = book.scorer(ctx)
    rows = evaluate.reproduce(ctx.data_root, ctx.cache / "table", ctx.preset, categories=["brick"], baselines=False,
                              figures=False, progress=False, intervals=0, model_loader=lambda c: tiny_model,
                              scorer=lambda *a: calls.append(a) or scorer(*a))
    assert len(calls) == 1 and len(list((ctx.cache / "scores").glob("*.pt"))) == 1
    monkeypatch.setattr(evaluate, "score_raw", lambda *a, **k: pytest.fail("scored again"))
    data = CategoryData.load(ctx.data_root, "brick", tiny_model.preset)
    again = evaluate.diffusion_rows(data, *book.scored(ctx, tiny_model, data), tiny_model.preset)[0]
    assert [r["pro"] for r in again] == [r["pro"] for r in rows]


def test_result_cache_computes_once_per_data_preset_and_code(ctx, monkeypatch):
    data = book.category_data(ctx, "brick")
    calls = []

    def compute():
        calls.append(1)
        return [{"category": "brick", "pro": 0.5 + len(calls)}]

    cache = book.result_cache(ctx)
    first = cache("study", (data, "lite0", ctx.preset), compute)
    assert cache("study", (data, "lite0", ctx.preset), compute) == first and len(calls) == 1
    assert list((ctx.cache / "results").glob("study-*.pt"))  # kept for the next chapter
    # anything that could change the result is another entry: an argument, a preset field, an
    # image, the library's code
    cache("study", (data, "lite1", ctx.preset), compute)
    cache("study", (data, "lite0", ctx.preset.replace(top_k=7)), compute)
    changed = copy.copy(data)
    changed.test_images = data.test_images.clone()
    changed.test_images[0, 0, 0, 0] += 0.5
    cache("study", (changed, "lite0", ctx.preset), compute)
    monkeypatch.setattr(book, "_LIBRARY_DIGEST", ["other code"])
    cache("study", (data, "lite0", ctx.preset), compute)
    assert len(calls) == 5
    with pytest.raises(TypeError, match="cannot key a cached result by a object"):
        cache("study", (object(),), compute)


def test_drive_cache_falls_back_to_a_local_cache_off_colab(tmp_path, monkeypatch, capsys):
    # setup() exports the chosen cache as DIFFAD_CACHE; setting it through monkeypatch first makes
    # the teardown restore the variable as it was, so later tests and nbval's kernels (which
    # inherit this process's environment) do not run in this test's folder
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "unused"))
    monkeypatch.delenv("DIFFAD_CACHE")
    from diffad.studies import book as chapter_runtime

    assert chapter_runtime.drive_cache() is None
    assert "Google Drive not mounted" in capsys.readouterr().out
    ctx = chapter_runtime.setup("cpu", data_root=tmp_path, cache=tmp_path / "local", drive=True)
    assert ctx.cache == (tmp_path / "local").resolve()
    assert os.environ["DIFFAD_CACHE"] == str(tmp_path / "local")  # fit's downloads go there too


def test_a_free_drive_holds_a_paper_run_with_compact_checkpoints(tmp_path, monkeypatch, capsys, tiny_builtin):
    """A free 15 GB Drive with 12 GB free holds one paper run in compact checkpoints (11.2 GB at the peak),
    not in exact ones (17.9 GB); with less, or exact checkpoints asked for, the cache stays local."""
    import collections
    import shutil

    for variable in ("DIFFAD_CACHE", "DIFFAD_SCRATCH"):  # set, then deleted: restored after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    drive = tmp_path / "drive"
    drive.mkdir()
    monkeypatch.setattr(book, "drive_cache", lambda: drive)
    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 12e9}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(15e9, 15e9 - free["bytes"], free["bytes"]))
    ctx = book.setup("paper", data_root=tiny_builtin, drive=True)
    assert ctx.cache == drive.resolve() and os.environ["DIFFAD_SCRATCH"] == book.COLAB_SCRATCH
    monkeypatch.delenv("DIFFAD_CACHE")
    exact = book.setup("paper", data_root=tiny_builtin, cache=tmp_path / "local", drive=True,
                       checkpoint_format="exact")
    assert exact.cache == (tmp_path / "local").resolve()
    assert "Google Drive has 12.0 GB free and a 'paper' model's training needs 17.9 GB" in capsys.readouterr().out
    free["bytes"] = 10e9
    small = book.setup("paper", data_root=tiny_builtin, cache=tmp_path / "local", drive=True)
    assert small.cache == (tmp_path / "local").resolve()
    assert "10.0 GB free and a 'paper' model's training needs 11.2 GB at its peak (compact" in capsys.readouterr().out
    # the cpu preset's runs fit: the cache goes to Drive
    assert book.setup("cpu", data_root=tiny_builtin, drive=True).cache == drive.resolve()


def test_variant_models_are_found_by_their_training_fields(ctx, monkeypatch, tmp_path):
    from diffad import shipped as shipped_models

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(shipped_models, "SHIPPED", shipped)
    monkeypatch.setattr(shipped_models, "MANIFEST", shipped_models.write_manifest(shipped))
    assert book.variant_model(ctx, "brick", grad_clip=None) is None  # neither cached nor shipped
    trained = book.variant_model(ctx, "brick", allow_training=True, grad_clip=None)
    assert trained.preset.grad_clip is None
    # shipped under any name after the run's: found by the fields it records, not by its name
    trained.save(shipped / f"{ctx.preset.name}-brick-anything.pt")
    shipped_models.write_manifest(shipped)
    other = book.Context(ctx.preset, ctx.device, ctx.data_root, ctx.categories, tmp_path / "fresh-cache")
    found = book.variant_model(other, "brick", grad_clip=None)
    assert found is not None and found.preset.grad_clip is None
    assert book.shipped_checkpoint(ctx.preset, ["brick"]) is None  # the preset's own model is not shipped
    assert book.variant_model(other, "brick", grad_clip=0.5) is None


@pytest.mark.parametrize("categories, fields", [
    (["brick"], {}), (["nut"], {}),
    (["brick"], {"grad_clip": None}), (["nut"], {"ema_warmup": False}), (["nut"], {"image_resize": "authors"}),
    (["brick"], "seed 1"), (["brick"], "seed 2"), (["nut"], "seed 1"), (["nut"], "seed 2"),
    (["brick", "capsule", "cup", "grass", "gravel", "nut", "retina"], "matched"),
])
def test_the_variants_the_chapters_read_are_shipped(categories, fields):
    """Chapter 13's authors' choices (with their 200-step base, the variant studies' schedule),
    chapter 10b's seeds (the preset's own 600 steps) and chapter 11b's compute-matched unified model
    ship, each under the fingerprint of the training fields it records."""
    from diffad.studies.ablations import matched_unified_overrides, variant_study_preset
    from diffad.presets import training_fingerprint

    cpu = get_preset("cpu")
    if fields == "matched":
        fields = matched_unified_overrides(cpu, categories)
    elif isinstance(fields, str):  # "seed N": the preset's own schedule, another seed
        fields = {"seed": int(fields.split()[1])}
    else:
        cpu = variant_study_preset(cpu)
    wanted = cpu.replace(**fields).for_categories(categories)
    path = book.shipped_checkpoint(wanted, categories)
    assert path is not None, f"no shipped cpu model for {categories} with {fields}"
    assert path.stem.endswith(training_fingerprint(wanted))


def test_variant_study_context_keeps_the_data_and_shortens_only_the_cpu_schedule(tiny_builtin, tmp_path):
    cpu = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path / "cache", device="cpu")
    study = book.variant_study(cpu)
    assert (study.preset.train_steps, study.preset.lr_anneal_steps) == (200, 200)
    assert study.preset.replace(train_steps=600, lr_anneal_steps=600) == cpu.preset
    assert (study.data_root, study.cache, study.categories) == (cpu.data_root, cpu.cache, cpu.categories)
    # its base model is the shipped 200-step one, not the preset's own 600-step model
    assert book.shipped_checkpoint(study.preset, ["brick"]).name == "cpu-brick-37425019.pt"
    assert book.shipped_checkpoint(cpu.preset, ["brick"]).name == "cpu-brick.pt"
    paper = book.setup("paper", data_root=tiny_builtin, cache=tmp_path / "cache", device="cpu")
    assert book.variant_study(paper).preset == paper.preset


# ------------------------------------------------------------- the preset from the environment

@pytest.mark.parametrize("text, items", [
    ("", []),
    ("  train_steps=20 \n\t lr=1e-3 ", ["train_steps=20", "lr=1e-3"]),
    ('unet_overrides={"model_channels": 32, "num_res_blocks": 1} train_steps=5',
     ['unet_overrides={"model_channels": 32, "num_res_blocks": 1}', "train_steps=5"]),
    ("test_timesteps=(5, 50, [1, {2: 3}]) alpha=0.5", ["test_timesteps=(5, 50, [1, {2: 3}])", "alpha=0.5"]),
    # quotes stay in the item; brackets and spaces inside quotes do not count; \" escapes
    ("init_checkpoint='my dir/w (1).pt' seed=1", ["init_checkpoint='my dir/w (1).pt'", "seed=1"]),
    ('init_checkpoint="a \\" b" seed=1', ['init_checkpoint="a \\" b"', "seed=1"]),
])
def test_split_settings_splits_at_whitespace_outside_brackets_and_quotes(text, items):
    assert book.split_settings(text) == items


@pytest.mark.parametrize("text", ['unet_overrides={"a": 1', "test_timesteps=(5, 10]", "a=1)", "x='open"])
def test_split_settings_refuses_unbalanced_brackets_and_quotes(text):
    with pytest.raises(PresetError, match="^DIFFAD_SET: ") as error:
        book.split_settings(text)
    assert "\n" not in str(error.value)


def test_diffad_preset_switches_the_preset(monkeypatch, tiny_builtin, tmp_path):
    monkeypatch.setenv("DIFFAD_PRESET", "paper")
    ctx = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, device="cpu")
    assert ctx.preset == get_preset("paper")
    assert ctx.environment == {"DIFFAD_PRESET": "paper"}
    assert str(ctx).endswith("\nfrom the environment: DIFFAD_PRESET=paper")
    # blank is unset; a preset passed as an object is replaced too
    monkeypatch.setenv("DIFFAD_PRESET", " ")
    assert book.setup("cpu", data_root=tiny_builtin, cache=tmp_path).preset == get_preset("cpu")
    monkeypatch.setenv("DIFFAD_PRESET", "authors")
    assert book.setup(get_preset("cpu"), data_root=tiny_builtin, cache=tmp_path).preset == get_preset("authors")


def test_diffad_set_applies_typed_overrides_and_prints_them(monkeypatch, tiny_builtin, tmp_path):
    monkeypatch.setenv("DIFFAD_SET", 'train_steps=20 unet_overrides={"model_channels": 32, "num_res_blocks": 1}'
                                     " test_timesteps=(5, 10) precision=fp32 grad_clip=None"
                                     " standardize_features=false")
    ctx = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, device="cpu")
    wanted = dict(train_steps=20, unet_overrides={"model_channels": 32, "num_res_blocks": 1},
                  test_timesteps=(5, 10), precision="fp32", grad_clip=None, standardize_features=False)
    assert ctx.preset == get_preset("cpu", **wanted)
    assert type(ctx.preset.test_timesteps) is tuple and type(ctx.preset.train_steps) is int
    assert ctx.environment == {"DIFFAD_SET": wanted}
    assert ("from the environment: DIFFAD_SET: train_steps=20, unet_overrides={'model_channels': 32, "
            "'num_res_blocks': 1}, test_timesteps=(5, 10)") in str(ctx)
    # the same values as the command line's --set
    from diffad.cli import parse_overrides

    assert parse_overrides(book.split_settings(os.environ["DIFFAD_SET"])) == wanted


def test_the_environment_wins_over_the_chapter(monkeypatch, tiny_builtin, tmp_path):
    """DIFFAD_PRESET replaces the argument; the chapter's keyword fields apply to the preset it
    chose; DIFFAD_SET applies on top of both."""
    monkeypatch.setenv("DIFFAD_PRESET", "paper")
    monkeypatch.setenv("DIFFAD_SET", "train_steps=7 lr_anneal_steps=7")
    ctx = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, class_cond=False, train_steps=1200)
    assert ctx.preset == get_preset("paper", class_cond=False, train_steps=7, lr_anneal_steps=7)
    assert "DIFFAD_PRESET=paper; DIFFAD_SET: train_steps=7, lr_anneal_steps=7" in str(ctx)
    # environment=False: the chapter's own choice, whatever the reader exported
    ctx = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, environment=False, train_steps=1200)
    assert ctx.preset == get_preset("cpu", train_steps=1200) and ctx.environment == {}
    assert "from the environment" not in str(ctx)


@pytest.mark.parametrize("variable, text, names", [
    ("DIFFAD_SET", "train_steps=many", ["DIFFAD_SET", "'train_steps'", "'many'"]),
    ("DIFFAD_SET", "train_steps=0", ["DIFFAD_SET", "'train_steps'"]),
    ("DIFFAD_SET", 'unet_overrides={"a": 1', ["DIFFAD_SET", "'}'"]),
    ("DIFFAD_SET", "precision=fp64", ["DIFFAD_SET", "'precision'", "fp64"]),
    ("DIFFAD_SET", "trian_steps=5", ["DIFFAD_SET", "trian_steps", "train_steps"]),  # unknown, with the hint
    ("DIFFAD_SET", "train_steps = 5", ["DIFFAD_SET", "name=value", "'train_steps'"]),
    ("DIFFAD_SET", "name=paper", ["DIFFAD_SET", "'name'", "DIFFAD_PRESET"]),
    ("DIFFAD_PRESET", "papper", ["DIFFAD_PRESET", "'papper'", "authors", "cpu", "paper"]),
])
def test_a_bad_environment_is_one_line_naming_the_variable_and_field(monkeypatch, tmp_path, variable, text,
                                                                     names):
    monkeypatch.setenv(variable, text)
    with pytest.raises(PresetError) as error:
        book.setup("cpu", data_root=tmp_path, cache=tmp_path)
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_every_preset_is_either_an_mvtec_preset_or_the_builtin_cpu_one():
    """A new preset must say which data it reads: add it to book.MVTEC_PRESETS or to this test."""
    assert set(book.MVTEC_PRESETS) | {"cpu"} == set(PRESETS)
    assert "cpu" not in book.MVTEC_PRESETS


@pytest.mark.parametrize("name", ["paper", "authors"])
def test_mvtec_presets_read_diffad_mvtec(name, monkeypatch, tiny_builtin, tmp_path):
    def no_builtin(*args, **kwargs):
        raise AssertionError(f"{name} wrote the built-in dataset instead of reading DIFFAD_MVTEC")

    monkeypatch.setattr(book, "make_builtin_dataset", no_builtin)
    monkeypatch.setenv("DIFFAD_MVTEC", str(tiny_builtin))
    ctx = book.setup(name, cache=tmp_path / "cache", device="cpu")
    assert (ctx.preset.name, ctx.data_root, ctx.categories) == (name, tiny_builtin, ["brick", "nut"])
    monkeypatch.setenv("DIFFAD_MVTEC", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="DIFFAD_MVTEC"):
        book.setup(name, cache=tmp_path / "cache")
    # chosen through the environment, the same
    monkeypatch.setenv("DIFFAD_MVTEC", str(tiny_builtin))
    monkeypatch.setenv("DIFFAD_PRESET", name)
    assert book.setup("cpu", cache=tmp_path / "cache").data_root == tiny_builtin


def test_the_cpu_preset_reads_the_builtin_dataset_whatever_diffad_mvtec_says(monkeypatch, tiny_builtin, tmp_path):
    written = []

    def builtin(root, **kwargs):
        written.append((root, kwargs))
        return tiny_builtin

    monkeypatch.setattr(book, "make_builtin_dataset", builtin)
    monkeypatch.setenv("DIFFAD_MVTEC", str(tmp_path / "nowhere"))
    ctx = book.setup("cpu", cache=tmp_path / "cache", device="cpu")
    assert ctx.data_root == tiny_builtin
    assert written == [((tmp_path / "cache").resolve() / "builtin", {"seed": 0, "image_size": 256})]


# ---------------------------------------------------------------- a chapter's choices from its data

def test_pick_category_prefers_the_defaults_then_the_kind_then_the_first():
    assert book.pick_category(["brick", "grass", "nut"], book.DEFAULT_TEXTURES) == "brick"
    assert book.pick_category(["bottle", "carpet", "metal_nut"], book.DEFAULT_TEXTURES) == "carpet"
    assert book.pick_category(["bottle", "wood"], book.DEFAULT_TEXTURES, ("carpet", "wood")) == "wood"
    assert book.pick_category(["bottle", "screw"], book.DEFAULT_TEXTURES, ("wood",)) == "bottle"
    with pytest.raises(ValueError, match="no category"):
        book.pick_category([], book.DEFAULT_TEXTURES)


@pytest.fixture(scope="module")
def mvtec_shaped(tmp_path_factory):
    from diffad.data import make_mvtec_shaped_dataset

    return make_mvtec_shaped_dataset(tmp_path_factory.mktemp("shaped"), categories=["carpet", "metal_nut", "bottle",
                                                                                   "toothbrush"], image_size=32,
                                     n_train=3)


def test_the_default_texture_and_object_exist_in_either_data(ctx, mvtec_shaped, tmp_path):
    assert (ctx.texture_category, ctx.object_category) == ("brick", "nut")
    shaped = book.setup("paper", data_root=mvtec_shaped, cache=tmp_path, device="cpu")
    assert (shaped.texture_category, shaped.object_category) == ("carpet", "metal_nut")


def test_defect_kinds_keeps_the_wanted_ones_the_data_has_then_fills_up(mvtec_shaped, tmp_path):
    from diffad.data import MVTecAD

    shaped = book.setup("paper", data_root=mvtec_shaped, cache=tmp_path, device="cpu")
    carpet = CategoryData.load(mvtec_shaped, "carpet", shaped.preset.replace(image_size=32))
    assert book.defect_kinds(carpet, ("stain", "hole", "scratch")) == ("hole", "color", "cut")
    assert book.defect_kinds(carpet) == ("color", "cut", "hole", "metal_contamination", "thread")
    assert book.defect_kinds(carpet, ("hole",), n=2) == ("hole", "color")
    toothbrush = MVTecAD(mvtec_shaped, "toothbrush", split="test", image_size=32)
    assert book.defect_kinds(toothbrush, ("scratch", "stain")) == ("defective",)  # only what it has


def test_the_builtin_data_keeps_the_chapters_own_kinds(ctx):
    brick = book.category_data(ctx, "brick")
    assert book.defect_kinds(brick, ("stain", "hole", "scratch")) == ("stain", "hole", "scratch")


def test_affordable_categories(ctx, mvtec_shaped, tmp_path, capsys):
    # the built-in data: every category (its models ship)
    assert book.affordable_categories(ctx) == ctx.categories
    # MVTec-AD on a CPU (no estimate): three, the texture and the object first, said so
    shaped = book.setup("paper", data_root=mvtec_shaped, cache=tmp_path, device="cpu")
    assert book.affordable_categories(shaped) == ["bottle", "carpet", "metal_nut"]
    assert "training 3 of 4 categories" in capsys.readouterr().out
    assert book.affordable_categories(shaped, everything=True) == shaped.categories
    # on a GPU, whatever fits the budget runs whole
    for hours, expected in ((0.2, shaped.categories), (0.3, ["bottle", "carpet", "metal_nut"])):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(book, "hours_per_model", lambda ctx, categories=1: hours)
            assert book.affordable_categories(shaped) == expected
    assert "about 0.9 GPU-hours; all 4: about 1.2 GPU-hours (set ALL_CATEGORIES = True)" in capsys.readouterr().out


def test_reachable_backbones_skips_hub_weights_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached either
    assert book.reachable_backbones(["tf_efficientnet_lite0", "resnet18"]) == ["tf_efficientnet_lite0"]
    assert "skipped (weights from the Hugging Face hub, out of reach here): resnet18" in capsys.readouterr().out


def test_chapters_train_on_a_cpu_only_where_the_reader_sized_the_run(ctx, monkeypatch, tiny_builtin, tmp_path):
    assert not ctx.may_train and not ctx.progress
    monkeypatch.setenv("DIFFAD_SET", "train_steps=3")
    sized = book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, device="cpu")
    assert sized.may_train
    monkeypatch.setenv("DIFFAD_PRESET", "paper")
    assert book.setup("cpu", data_root=tiny_builtin, cache=tmp_path, device="cpu").progress


def test_mvtec_shaped_dataset_has_mvtec_names_and_layout(mvtec_shaped):
    from diffad.data import MVTEC_CATEGORIES, MVTEC_DEFECT_KINDS, MVTecAD, list_categories

    assert set(MVTEC_DEFECT_KINDS) == set(MVTEC_CATEGORIES)
    assert list_categories(mvtec_shaped) == ["bottle", "carpet", "metal_nut", "toothbrush"]
    for kind in MVTEC_DEFECT_KINDS["metal_nut"]:
        assert (mvtec_shaped / "metal_nut" / "ground_truth" / kind / "000_mask.png").is_file()
    test = MVTecAD(mvtec_shaped, "metal_nut", split="test", image_size=32)
    defective = [test[i] for i, s in enumerate(test.samples) if s.label]
    assert len(defective) == 4 and all(item["mask"].sum() > 0 for item in defective)
    assert all(test[i]["mask"].sum() == 0 for i, s in enumerate(test.samples) if not s.label)
    with pytest.raises(ValueError, match="not MVTec-AD categories"):
        from diffad.data import make_mvtec_shaped_dataset

        make_mvtec_shaped_dataset(mvtec_shaped, categories=["brick"])


def test_the_unified_model_trains_on_mvtec_only_when_asked(tiny_builtin, tiny_preset, tmp_path, capsys):
    # a tiny preset under an MVTec-AD preset's name: what a chapter does with authors, at test size
    ctx = book.setup(tiny_preset.replace(name="authors"), data_root=tiny_builtin, cache=tmp_path, device="cpu")
    unified_ctx, unified = book.unified_model(ctx, ["brick", "nut"])
    assert unified is None and unified_ctx.preset.train_steps == 2 * tiny_preset.train_steps
    assert "TRAIN_UNIFIED = True trains it" in capsys.readouterr().out
    _, unified = book.unified_model(ctx, ["brick", "nut"], train=True)
    assert unified.categories == ["brick", "nut"] and unified.preset.class_cond
    # a preset that reads the built-in data trains it (or finds it shipped) as before
    builtin_ctx = book.setup(tiny_preset.replace(name="mine"), data_root=tiny_builtin, cache=tmp_path, device="cpu")
    assert book.unified_model(builtin_ctx, ["brick", "nut"])[1].preset.train_steps == 2 * tiny_preset.train_steps
