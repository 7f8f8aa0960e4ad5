"""diffad.book: the model cache, the no-training guard and the scored-maps cache the chapters share."""

import copy
import os

import pytest
import torch

from diffad import book
from diffad.ablations import rescored
from diffad.evaluate import CategoryData
from diffad.presets import get_preset


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
    from diffad.ablations import unified_overrides
    from diffad.data import BUILTIN_CATEGORIES, DEVELOPMENT_CATEGORIES

    cpu = get_preset("cpu")
    assert set(BUILTIN_CATEGORIES) | set(DEVELOPMENT_CATEGORIES) <= book.shipped_categories(cpu)
    # chapter 11's unified model of every built-in category, in the order list_categories gives
    every = sorted(BUILTIN_CATEGORIES)
    assert book.shipped_checkpoint(cpu.replace(**unified_overrides(cpu)), every) is not None


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


def test_drive_cache_falls_back_to_a_local_cache_off_colab(tmp_path, monkeypatch, capsys):
    # setup() exports the chosen cache as DIFFAD_CACHE; setting it through monkeypatch first makes
    # the teardown restore the variable as it was, so later tests and nbval's kernels (which
    # inherit this process's environment) do not run in this test's folder
    monkeypatch.setenv("DIFFAD_CACHE", str(tmp_path / "unused"))
    monkeypatch.delenv("DIFFAD_CACHE")
    from diffad import book as chapter_runtime

    assert chapter_runtime.drive_cache() is None
    assert "Google Drive not mounted" in capsys.readouterr().out
    ctx = chapter_runtime.setup("cpu", data_root=tmp_path, cache=tmp_path / "local", drive=True)
    assert ctx.cache == (tmp_path / "local").resolve()
    assert os.environ["DIFFAD_CACHE"] == str(tmp_path / "local")  # fit's downloads go there too


def test_variant_models_are_found_by_their_training_fields(ctx, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(book, "SHIPPED", shipped)
    assert book.variant_model(ctx, "brick", grad_clip=None) is None  # neither cached nor shipped
    trained = book.variant_model(ctx, "brick", allow_training=True, grad_clip=None)
    assert trained.preset.grad_clip is None
    # shipped under any name after the run's: found by the fields it records, not by its name
    trained.save(shipped / f"{ctx.preset.name}-brick-anything.pt")
    other = book.Context(ctx.preset, ctx.device, ctx.data_root, ctx.categories, tmp_path / "fresh-cache")
    found = book.variant_model(other, "brick", grad_clip=None)
    assert found is not None and found.preset.grad_clip is None
    assert book.shipped_checkpoint(ctx.preset, ["brick"]) is None  # the preset's own model is not shipped
    assert book.variant_model(other, "brick", grad_clip=0.5) is None


@pytest.mark.parametrize("categories, fields", [
    (["brick"], {}), (["nut"], {}),
    (["brick"], {"grad_clip": None}), (["nut"], {"ema_warmup": False}), (["nut"], {"image_resize": "authors"}),
    (["brick"], "seed 1"), (["brick"], "seed 2"), (["nut"], "seed 1"), (["nut"], "seed 2"),
    (["brick", "capsule", "nut"], "matched"),
])
def test_the_variants_the_chapters_read_are_shipped(categories, fields):
    """Chapter 13's authors' choices (with their 200-step base, the variant studies' schedule),
    chapter 10's seeds (the preset's own 600 steps) and chapter 11's compute-matched unified model
    ship, each under the fingerprint of the training fields it records."""
    from diffad.ablations import matched_unified_overrides, variant_study_preset
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
