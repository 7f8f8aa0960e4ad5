"""The cross-check data: the built-in scenes with defects from a second, independent painter."""

import numpy as np
import pytest
from PIL import Image

from diffad.data import BUILTIN_CATEGORIES, BUILTIN_OBJECTS, MVTecAD, make_builtin_dataset
from diffad.data.builtin import category_rng as _rng
from diffad.data.crosscheck import CROSSCHECK_KINDS, make_crosscheck_dataset, paint


@pytest.mark.parametrize("category", BUILTIN_CATEGORIES)
@pytest.mark.parametrize("kind", list(CROSSCHECK_KINDS))
def test_the_mask_is_where_the_image_changed(category, kind):
    """Inside the mask the painted image differs from the normal scene; outside it hardly does."""
    image, mask, scene = paint(category, kind, _rng(5, category, 300, 0), 128)
    change = np.abs(image - scene.image).max(axis=-1)
    assert mask.sum() >= 4
    assert np.median(change[mask]) > 0.02, f"{kind} on {category}: the mask covers unchanged pixels"
    assert np.quantile(change[~mask], 0.999) < np.median(change[mask]), f"{kind}: changes outside the mask"
    if scene.is_object and kind != "misplaced":  # only a moved piece may leave the object
        assert (scene.support[mask] > 0).all()


def test_sizes_span_small_to_large():
    area = {kind: [paint("brick", kind, _rng(1, "brick", 300, i), 128)[1].mean() for i in range(6)]
            for kind in CROSSCHECK_KINDS}
    assert min(area["contamination"]) > 0.005 and max(area["contamination"]) < 0.2
    assert min(area["part_colour"]) > 0.15  # a whole region, not a spot
    assert max(area["cut"]) < 0.02 and max(area["fracture"]) < 0.02  # thin lines


def test_the_dataset_reuses_training_images_and_draws_new_tests(tmp_path):
    builtin = make_builtin_dataset(tmp_path / "builtin", seed=0, image_size=64, n_train=4, n_test_good=2,
                                   n_test_per_defect=1, categories=["nut"])
    root = make_crosscheck_dataset(tmp_path / "cc", seed=3, image_size=64, n_train=4, n_test_good=2,
                                   n_test_per_defect=2, categories=["nut"])
    for name in ("000.png", "003.png"):  # the same training images as the built-in data: models apply
        a = np.asarray(Image.open(builtin / "nut/train/good" / name))
        assert np.array_equal(a, np.asarray(Image.open(root / "nut/train/good" / name)))
    good = np.asarray(Image.open(builtin / "nut/test/good/000.png"))
    assert not np.array_equal(good, np.asarray(Image.open(root / "nut/test/good/000.png")))
    test = MVTecAD(root, "nut", split="test", image_size=64)
    assert sorted({test[i]["defect_type"] for i in range(len(test))}) == sorted([*CROSSCHECK_KINDS, "good"])
    assert len(test) == 2 + 2 * len(CROSSCHECK_KINDS)
    assert all(test[i]["mask"].sum() > 0 for i in range(len(test)) if test[i]["label"] == 1)

    first = (root / "nut/test/pits/001.png").read_bytes()
    again = make_crosscheck_dataset(tmp_path / "cc2", seed=3, image_size=64, n_train=4, n_test_good=2,
                                    n_test_per_defect=2, categories=["nut"])
    assert (again / "nut/test/pits/001.png").read_bytes() == first  # deterministic
    other = make_crosscheck_dataset(tmp_path / "cc3", seed=4, image_size=64, n_train=4, n_test_good=2,
                                    n_test_per_defect=2, categories=["nut"])
    assert (other / "nut/test/pits/001.png").read_bytes() != first


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="must differ from train_seed"):
        make_crosscheck_dataset(tmp_path, seed=0, train_seed=0)
    with pytest.raises(ValueError, match="unknown built-in categories"):
        make_crosscheck_dataset(tmp_path, categories=["screw"])
    with pytest.raises(ValueError, match="unknown cross-check defect kind"):
        paint(BUILTIN_OBJECTS[0], "scratch", _rng(0, "nut", 300, 0), 64)
    (tmp_path / "mine" / "nut").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by make_crosscheck_dataset"):
        make_crosscheck_dataset(tmp_path / "mine", image_size=64, n_train=2, categories=["nut"])


def whole_image_gaussian_line(size, points, widths):
    """The painter's line weight computed over every pixel for every segment (the reference)."""
    from diffad.data.scenes import grid

    ys, xs = grid(size)
    weight = np.zeros((size, size), np.float32)
    for (ay, ax), (by, bx), width in zip(points[:-1], points[1:], widths):
        vy, vx = by - ay, bx - ax
        t = np.clip(((ys - ay) * vy + (xs - ax) * vx) / max(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
        distance = np.hypot(ys - ay - t * vy, xs - ax - t * vx)
        sigma = max(width, 1.0) / 2 / np.sqrt(2 * np.log(2))
        np.maximum(weight, np.exp(-0.5 * (distance / sigma) ** 2), out=weight)
    return weight


@pytest.mark.parametrize("seed", range(6))
def test_line_weight_inside_each_segments_box_equals_the_whole_image_computation(seed):
    from diffad.data.crosscheck import _gaussian_line

    rng = np.random.default_rng(seed)
    size = int(rng.choice([32, 64, 96]))
    points = rng.uniform(-0.3 * size, 1.3 * size, (int(rng.integers(2, 12)), 2))  # some segments leave the image
    widths = rng.uniform(0.5, 6.0, len(points) - 1) * size / 64
    fast = _gaussian_line(size, points, widths)
    assert np.array_equal(fast, whole_image_gaussian_line(size, points, widths))
    assert fast.max() > 0
