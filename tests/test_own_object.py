"""Your own object (issue #28): a plain folder of good photos in, overlays, scores and verdicts out.

The quick tests check the threshold against brute-force counts, every bad input's one error (and that
nothing is written), EXIF orientation, the reader's items, the overlay, and PaDiM end to end through
the command line in this process; the slow one runs ``train --images`` and ``predict`` with the
diffusion model as a fresh shell would, on a folder of JPEGs with labelled, masked test images.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffad import cli, detector
from diffad.data import MVTecAD
from diffad.data.folder import MIN_IMAGES, ImageFolder, read_image
from diffad.data.photos import PHOTO_DEFECTS, make_photo_folder
from diffad.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "image_size=32", "--set", "batch_size=4", "--set", "train_steps=2", "--set", "lr_anneal_steps=2",
        "--set", "checkpoint_every=2", "--set", "score_batch_size=8", "--set", "backbone_input_size=64"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small photo folder: 12 good JPEGs (4 sizes, one stored sideways), a labelled test folder with masks."""
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "rocket", n_normal=12, n_test_good=4, n_per_defect=1)


def _jpegs(folder: Path, n: int, size=(40, 40), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
    return folder


# ----------------------------------------------------------------------------- thresholds


def _brute_force_threshold(scores, fpr):
    """The smallest score t with #(scores > t) <= floor(fpr * n), by counting at every candidate."""
    allowed = int(np.floor(fpr * len(scores) + 1e-9))
    return min(t for t in scores if sum(s > t for s in scores) <= allowed)


@pytest.mark.parametrize("n", [1, 7, 10, 99, 100, 101, 250])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.29, 0.5])
def test_threshold_at_fpr_is_the_brute_force_count(n, fpr):
    rng = np.random.default_rng(n * 1000 + int(fpr * 100))
    scores = np.round(rng.normal(size=n), 1)  # rounded: ties
    result = detector.threshold_at_fpr(scores, fpr)
    assert result.value == _brute_force_threshold(list(scores), fpr)
    assert result.flagged == int((scores > result.value).sum()) <= result.allowed == int(np.floor(fpr * n + 1e-9))
    assert result.n_normal == n and result.source == "normal"
    assert (result.warning is not None) == (n * fpr < 1 - 1e-9)


def test_threshold_warns_with_the_number_of_images_needed():
    result = detector.threshold_at_fpr(np.arange(10.0), 0.01)
    assert result.value == 9.0 and result.flagged == 0
    assert "10 good images" in result.warning and "100 or more" in result.warning
    assert detector.threshold_at_fpr(np.arange(100.0), 0.01).warning is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        detector.threshold_at_fpr([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="no scores"):
        detector.threshold_at_fpr([], 0.1)


def test_threshold_from_labels_is_the_best_youden_j_by_brute_force():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(20), np.ones(15)]
    scores = np.round(rng.normal(size=35) + labels, 1)
    best = max(((np.mean(scores[labels == 1] > t) - np.mean(scores[labels == 0] > t), t) for t in scores))
    assert detector.threshold_from_labels(scores, labels) == best[1]


# ----------------------------------------------------------------------------- the folder and bad input


def test_the_folder_yields_what_mvtec_yields(photos):
    folder = ImageFolder(photos / "normal", test=photos / "test", report=None)
    assert folder.name == "rocket" and len(folder.paths) == 12 and folder.labelled and folder.has_masks
    preset = get_preset("cpu", val_fraction=0.25)
    train, val = folder.dataset("rocket", "train", preset), folder.dataset("rocket", "val", preset)
    held = MVTecAD.val_indices(12, 0.25, preset.seed)
    assert [s.path for s in val.samples] == [folder.paths[i] for i in held] and len(train) == 12 - len(held)
    item = folder.dataset("rocket", "test", preset)[len(folder.test_samples) - 1]
    assert set(item) == {"image", "mask", "label", "defect_type", "path"}
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["label"] == 1 and item["defect_type"] == sorted(PHOTO_DEFECTS)[-1] and item["mask"].sum() > 0
    assert "4 sizes" in folder.size_note(64) and "resized to 64x64" in folder.size_note(64)


def test_exif_orientation_is_honoured(tmp_path):
    upright = np.zeros((30, 50, 3), np.uint8)
    upright[:, :10] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; a viewer turns it 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    picture = np.asarray(read_image(tmp_path / "phone.jpg"))
    assert picture.shape == (30, 50, 3) and picture[:, :8].mean() > 200 and picture[:, 20:].mean() < 50


def test_non_images_are_skipped_with_a_message(tmp_path):
    folder = _jpegs(tmp_path / "good", MIN_IMAGES)
    (folder / "notes.txt").write_text("taken on Monday")
    notes = []
    assert len(ImageFolder(folder, report=notes.append).paths) == MIN_IMAGES
    assert "skipped 1 file" in notes[0] and "notes.txt" in notes[0]


@pytest.mark.parametrize("case, message", [
    ("too_few", f"holds 5 images; training needs at least {MIN_IMAGES} photos"),
    ("empty", "no images in"),
    ("missing", "is not a folder"),
    ("masks", "looks like a folder of masks"),
    ("corrupt", "cannot read image .*03.jpg"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, case, message, capsys):
    images = tmp_path / "images"
    if case == "too_few":
        _jpegs(images, 5)
    elif case == "empty":
        images.mkdir()
    elif case == "masks":
        images.mkdir()
        for i in range(MIN_IMAGES):
            mask = np.zeros((20, 20), np.uint8)
            mask[5:9, 5:9] = 255
            Image.fromarray(mask).save(images / f"{i:02d}.png")
    elif case == "corrupt":
        _jpegs(images, MIN_IMAGES)
        (images / "03.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    assert cli.main(["train", "--images", str(images), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        detector.train(images, out)
    assert not out.exists()


def test_a_run_folder_of_another_kind_or_version_is_refused(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.pt").write_bytes(b"")
    with pytest.raises(detector.RunError, match="not a folder written by `python -m diffad train --images`"):
        detector.Detector.load(tmp_path / "other")
    old = tmp_path / "old"
    old.mkdir()
    (old / "detector.json").write_text(json.dumps({"format": "diffad-detector", "version": 0, "diffad": "0.0.1"}))
    with pytest.raises(detector.RunError, match="another version of diffad"):
        detector.Detector.load(old)
    assert cli.main(["predict", str(old), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "another version" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "unfinished" / "model").mkdir(parents=True)
    with pytest.raises(detector.RunError, match="did not finish"):
        detector.Detector.load(tmp_path / "unfinished")
    with pytest.raises(ValueError, match="holds other files"):
        detector.train(_jpegs(tmp_path / "images", MIN_IMAGES), tmp_path / "images")


def test_the_overlay_shows_heat_and_an_outline():
    from diffad.overlays import overlay_image

    picture = np.full((40, 60, 3), 128, np.uint8)
    amap = np.zeros((8, 8), np.float32)
    amap[2:5, 2:5] = 3.0
    out = overlay_image(picture, amap, threshold=1.5, heat_range=(0.0, 3.0))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert (out == [0, 255, 0]).all(axis=2).any()  # the outline
    assert (out[35:, 50:] == 128).all()  # a cold corner shows the photo
    plain = overlay_image(picture, amap, threshold=1.5, heat_range=(0.0, 3.0), outline=False)
    assert not (plain == [0, 255, 0]).all(axis=2).any()


# ----------------------------------------------------------------------------- end to end


def test_padim_from_the_shell_trains_reports_auroc_and_pro_and_predicts(photos, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert cli.main(["train", "--images", str(photos / "normal"), "--test", str(photos / "test"), "--out", str(run),
                     "--method", "padim", "--fpr", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "PRO" in printed and "pixel AUROC" in printed
    record = json.loads((run / "detector.json").read_text())
    assert record["method"] == "padim" and record["threshold"]["n_normal"] == 3
    assert set(record["evaluation"]) >= {"image_auroc", "pixel_auroc", "pro", "false_alarms", "misses"}
    assert cli.main(["predict", str(run), str(photos / "test" / "good"), str(photos / "test" / "crack"),
                     "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 5 and {r["verdict"] for r in rows} <= {"good", "defect"}
    assert all(float(r["threshold"]) == pytest.approx(record["threshold"]["value"]) for r in rows)
    for row in rows:
        assert (out / row["overlay"]).is_file() and np.load(out / row["map"]).shape == (64, 64)
    # the same path in Python: the same scores
    model = detector.Detector.load(run)
    again = model.predict([photos / "test" / "good", photos / "test" / "crack"])
    assert np.allclose(again.scores, [float(r["score"]) for r in rows], rtol=1e-5)
    one = model.predict(Image.open(photos / "test" / "crack" / "000.jpg"))
    assert one.scores[0] == pytest.approx(again.scores[-1], rel=1e-5) and len(one.verdicts) == 1


@pytest.mark.slow
def test_train_images_and_predict_with_the_diffusion_model_from_a_fresh_shell(photos, tmp_path):
    """About 40 s on 2 cores: two shells (imports, the backbone) and a 2-step training at 32 px."""
    run, out = tmp_path / "run", tmp_path / "out"
    train = subprocess.run([sys.executable, "-m", "diffad", "train", "--images", str(photos / "normal"), "--test",
                            str(photos / "test"), "--out", str(run), *TINY], capture_output=True, text=True, cwd=ROOT)
    assert train.returncode == 0, train.stderr
    assert "resized to 32x32" in train.stdout and "about" in train.stdout  # the note and the time estimate
    assert "image AUROC" in train.stdout and "PRO" in train.stdout and "warning:" in train.stdout
    record = json.loads((run / "detector.json").read_text())
    assert record["method"] == "diffusion" and record["normalizer"] and (run / "model" / "model.pt").is_file()
    images = sorted((photos / "test").glob("*/*.jpg"))
    predict = subprocess.run([sys.executable, "-m", "diffad", "predict", str(run), *map(str, images), "--out",
                              str(out)], capture_output=True, text=True, cwd=ROOT)
    assert predict.returncode == 0, predict.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["path"] for r in rows] == list(map(str, images))
    assert all((out / r["overlay"]).is_file() and (out / r["map"]).is_file() for r in rows)
    model = detector.Detector.load(run)
    first = model.predict(images[:1])  # one image alone scores as it did among the others
    assert first.scores[0] == pytest.approx(float(rows[0]["score"]), rel=1e-4)
    assert isinstance(model.predict(torch.rand(2, 3, 50, 50)).maps, np.ndarray)
