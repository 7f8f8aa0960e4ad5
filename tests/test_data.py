"""Tests of diffad.data: the MVTec-layout reader, the MVTec download, the built-in dataset."""

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from download_server import LoopbackServer, clear_proxy_environment
from PIL import Image
from torch.utils.data import Subset

from diffad.data import (
    BUILTIN_CATEGORIES,
    DEFECT_KINDS,
    LOW_CONTRAST_KINDS,
    MVTEC_CATEGORIES,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    MVTecAD,
    download_mvtec,
    from_diffusion_range,
    list_categories,
    load_all,
    make_builtin_dataset,
    to_diffusion_range,
)

W, H = 40, 30  # fake images are 40 wide, 30 high
RED = (200, 10, 30)


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mask_array():
    mask = np.zeros((H, W), np.uint8)
    mask[5:15, 10:30] = 255
    mask[20, 2] = 1  # any nonzero value is defect
    return mask


def make_fake_mvtec(root: Path, category: str = "widget", n_train: int = 10) -> Path:
    """A tiny MVTec-layout category with RGB, grayscale and RGBA images and masks."""
    base = root / category
    for i in range(n_train):
        _save(np.full((H, W, 3), (i * 20, 100, 50), np.uint8), base / "train" / "good" / f"{i:03d}.png")
    _save(np.full((H, W, 3), RED, np.uint8), base / "test" / "good" / "000.png")
    _save(np.full((H, W), 128, np.uint8), base / "test" / "good" / "001.png")  # grayscale
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 255  # pure red, fully transparent: alpha must be dropped, not composited
    _save(rgba, base / "test" / "dent" / "000.png")
    _save(_mask_array(), base / "ground_truth" / "dent" / "000_mask.png")
    _save(np.full((H, W, 3), 60, np.uint8), base / "test" / "scuff" / "007.png")
    rgb_mask = np.zeros((H, W, 3), np.uint8)
    rgb_mask[0:3, 0:4, 2] = 9  # an RGB mask: nonzero in any channel is defect
    _save(rgb_mask, base / "ground_truth" / "scuff" / "007_mask.png")
    return root


@pytest.fixture
def fake_root(tmp_path):
    return make_fake_mvtec(tmp_path / "mvtec")


# ----------------------------------------------------------------------------- reader


def test_category_lists():
    assert len(MVTEC_CATEGORIES) == 15
    assert set(TEXTURE_CATEGORIES) | set(OBJECT_CATEGORIES) == set(MVTEC_CATEGORIES)
    assert not set(TEXTURE_CATEGORIES) & set(OBJECT_CATEGORIES)
    assert {"bottle", "metal_nut", "zipper", "carpet", "wood"} <= set(MVTEC_CATEGORIES)


def test_list_categories(fake_root):
    (fake_root / "not_a_category").mkdir()
    (fake_root / "readme.txt").write_text("x")
    assert list_categories(fake_root) == ["widget"]


def test_test_items_original_size(fake_root):
    ds = MVTecAD(fake_root, "widget", split="test", image_size=None)
    assert len(ds) == 4
    assert [s.defect_type for s in ds.samples] == ["good", "good", "dent", "scuff"]
    assert ds.labels == [0, 0, 1, 1]
    assert ds.defect_types == ["dent", "scuff"]

    good = ds[0]
    assert set(good) == {"image", "mask", "label", "defect_type", "path"}
    assert good["image"].dtype == torch.float32 and good["image"].shape == (3, H, W)
    assert torch.allclose(good["image"][:, 0, 0], torch.tensor(RED) / 255.0)
    assert good["mask"].dtype == torch.float32 and good["mask"].shape == (1, H, W)
    assert good["mask"].sum() == 0 and good["label"] == 0 and good["defect_type"] == "good"
    assert good["path"].endswith("test/good/000.png")

    grey = ds[1]["image"]
    assert grey.shape == (3, H, W) and torch.allclose(grey, torch.full_like(grey, 128 / 255))

    dent = ds[2]
    assert torch.allclose(dent["image"][:, 3, 3], torch.tensor([1.0, 0.0, 0.0]))  # alpha dropped
    assert dent["label"] == 1 and dent["defect_type"] == "dent"
    assert torch.equal(dent["mask"][0], torch.from_numpy((_mask_array() != 0).astype(np.float32)))

    scuff_mask = ds[3]["mask"][0]
    assert scuff_mask.sum() == 12 and scuff_mask[0:3, 0:4].sum() == 12


def test_resize_keeps_ranges_and_binary_masks(fake_root):
    ds = MVTecAD(fake_root, "widget", split="test", image_size=16)
    for item in ds:
        assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    # The 20x10 block covers half the width and a third of the height: about 1/6 of 16x16.
    assert abs(ds[2]["mask"].mean().item() - 200 / 1200) < 0.05
    rect = MVTecAD(fake_root, "widget", split="test", image_size=(20, 24))
    assert rect[2]["image"].shape == (3, 20, 24) and rect[2]["mask"].shape == (1, 20, 24)


def test_stack_and_load_all(fake_root):
    ds = MVTecAD(fake_root, "widget", split="test", image_size=8)
    images, masks, labels = ds.stack()
    assert images.shape == (4, 3, 8, 8) and masks.shape == (4, 1, 8, 8)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1]
    sub_images, _, sub_labels = load_all(Subset(ds, [1, 3]))
    assert torch.equal(sub_images, images[[1, 3]]) and sub_labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="empty"):
        load_all(Subset(ds, []))


def test_stack_of_mixed_sizes_asks_for_image_size(fake_root):
    _save(np.zeros((10, 12, 3), np.uint8), fake_root / "widget" / "test" / "good" / "002.png")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        MVTecAD(fake_root, "widget", split="test", image_size=None).stack()


def test_train_val_split(fake_root):
    train = MVTecAD(fake_root, "widget", "train", image_size=8, val_fraction=0.3, seed=3)
    val = MVTecAD(fake_root, "widget", "val", image_size=8, val_fraction=0.3, seed=3)
    every = MVTecAD(fake_root, "widget", "train", image_size=8, val_fraction=0.0)
    train_paths, val_paths = {s.path for s in train.samples}, {s.path for s in val.samples}
    assert len(val_paths) == 3 and len(train_paths) == 7
    assert not train_paths & val_paths
    assert train_paths | val_paths == {s.path for s in every.samples}
    assert len(every) == 10
    again = MVTecAD(fake_root, "widget", "val", val_fraction=0.3, seed=3)
    assert [s.path for s in again.samples] == [s.path for s in val.samples]
    assert all(item["label"] == 0 and item["mask"].sum() == 0 for item in val)


def test_val_indices_rules():
    assert MVTecAD.val_indices(100, 0.1, 0) == MVTecAD.val_indices(100, 0.1, 0)
    assert len(MVTecAD.val_indices(100, 0.1, 0)) == 10
    assert MVTecAD.val_indices(100, 0.1, 0) != MVTecAD.val_indices(100, 0.1, 1)
    assert len(MVTecAD.val_indices(2, 0.01, 0)) == 1  # at least one
    assert len(MVTecAD.val_indices(3, 0.99, 0)) == 2  # at most n - 1
    assert MVTecAD.val_indices(1, 0.5, 0) == [] and MVTecAD.val_indices(50, 0.0, 0) == []


def test_missing_root_suggests_download_and_builtin(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*download_mvtec.*make_builtin_dataset"):
        MVTecAD(missing, "bottle")
    with pytest.raises(FileNotFoundError, match="download_mvtec"):
        list_categories(missing)


def test_absent_category_lists_present_ones(fake_root):
    with pytest.raises(FileNotFoundError, match=r"'gadget' not found under .*present: widget"):
        MVTecAD(fake_root, "gadget")
    with pytest.raises(FileNotFoundError, match=r"'bottle'.*download_mvtec\(.*categories=\['bottle'\]"):
        MVTecAD(fake_root, "bottle")


def test_invalid_arguments(fake_root):
    with pytest.raises(ValueError, match="split must be one of"):
        MVTecAD(fake_root, "widget", split="validation")
    with pytest.raises(ValueError, match="val_fraction"):
        MVTecAD(fake_root, "widget", val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        MVTecAD(fake_root, "widget", image_size=0)
    with pytest.raises(ValueError, match="image_size"):
        MVTecAD(fake_root, "widget", image_size=(3, "a"))
    with pytest.raises(ValueError, match="split='val' is empty"):
        MVTecAD(fake_root, "widget", split="val", val_fraction=0.0)


def test_missing_mask_names_expected_path(fake_root):
    (fake_root / "widget" / "ground_truth" / "dent" / "000_mask.png").unlink()
    expected = fake_root / "widget" / "ground_truth" / "dent" / "000_mask.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        MVTecAD(fake_root, "widget", split="test")


def test_missing_train_folder_is_named(fake_root):
    (fake_root / "lonely" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(fake_root / "lonely" / "train" / "good"))):
        MVTecAD(fake_root, "lonely", split="train")
    with pytest.raises(FileNotFoundError, match="no test images"):
        MVTecAD(fake_root, "lonely", split="test")


def test_corrupt_image_raises_at_index_time_with_path(fake_root):
    bad = fake_root / "widget" / "test" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = MVTecAD(fake_root, "widget", split="test")  # construction only lists files
    index = [s.path for s in ds.samples].index(bad)
    with pytest.raises(ValueError, match="cannot read image " + re.escape(str(bad))):
        ds[index]


def test_mask_size_mismatch_names_both_sizes(fake_root):
    _save(np.zeros((10, 20), np.uint8), fake_root / "widget" / "ground_truth" / "dent" / "000_mask.png")
    ds = MVTecAD(fake_root, "widget", split="test")
    with pytest.raises(ValueError, match=r"000_mask\.png is 20x10 but image .*000\.png is 40x30"):
        ds[2]


def test_diffusion_range_round_trip():
    x = torch.rand(2, 3, 4, 4)
    y = to_diffusion_range(x)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.allclose(to_diffusion_range(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(from_diffusion_range(y), x)
    assert from_diffusion_range(torch.tensor([-3.0, 3.0]), clamp=True).tolist() == [0.0, 1.0]
    assert np.allclose(from_diffusion_range(np.array([-1.0, 1.0])), [0.0, 1.0])


# ----------------------------------------------------------------------------- MVTec download


def _tar_xz(tree: Path, arcname_prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for path in sorted(tree.iterdir()):
            archive.add(path, arcname=arcname_prefix + path.name)
    return buffer.getvalue()


@pytest.fixture
def mvtec_archive(tmp_path):
    tree = tmp_path / "tree"
    make_fake_mvtec(tree, "bottle", n_train=3)
    make_fake_mvtec(tree, "tile", n_train=2)
    (tree / "license.txt").write_text("CC BY-NC-SA 4.0")
    return _tar_xz(tree, "./")


@pytest.fixture
def server(monkeypatch):
    clear_proxy_environment(monkeypatch)
    with LoopbackServer() as running:
        yield running


def test_download_mvtec_extracts_requested_categories_only(server, mvtec_archive, tmp_path):
    server.files["mvtec.tar.xz"] = mvtec_archive
    checks = dict(
        url=server.url("mvtec.tar.xz"),
        sha256=hashlib.sha256(mvtec_archive).hexdigest(),
        expected_size=len(mvtec_archive),
    )
    root = tmp_path / "data"
    assert download_mvtec(root, ["bottle"], progress=False, **checks) == root
    assert list_categories(root) == ["bottle"]
    assert (root / "license.txt").read_text() == "CC BY-NC-SA 4.0"
    assert len(MVTecAD(root, "bottle", "test")) == 4 and len(MVTecAD(root, "bottle", "train", val_fraction=0)) == 3
    assert len(server.requests) == 1

    download_mvtec(root, ["bottle"], progress=False, **checks)  # already there: no network, no extraction
    assert len(server.requests) == 1
    download_mvtec(root, "tile", progress=False, **checks)  # archive kept: extracted without downloading
    assert len(server.requests) == 1
    assert list_categories(root) == ["bottle", "tile"]


def test_download_mvtec_resumes_and_can_drop_archive(server, mvtec_archive, tmp_path):
    server.files["mvtec.tar.xz"] = mvtec_archive
    root = tmp_path / "data"
    root.mkdir()
    half = len(mvtec_archive) // 2
    (root / "mvtec_anomaly_detection.tar.xz.part").write_bytes(mvtec_archive[:half])
    download_mvtec(
        root, ["tile"], url=server.url("mvtec.tar.xz"), sha256=hashlib.sha256(mvtec_archive).hexdigest(),
        expected_size=len(mvtec_archive), keep_archive=False, progress=False,
    )
    [request] = server.requests
    assert request["range"] == f"bytes={half}-" and request["sent"] == len(mvtec_archive) - half
    assert list_categories(root) == ["tile"]
    assert not (root / "mvtec_anomaly_detection.tar.xz").exists()


def test_download_mvtec_accepts_top_folder_and_reports_missing_category(server, tmp_path):
    tree = tmp_path / "tree"
    make_fake_mvtec(tree, "bottle", n_train=2)
    server.files["a.tar.xz"] = _tar_xz(tree, "mvtec_anomaly_detection/")
    root = tmp_path / "data"
    download_mvtec(root, ["bottle"], url=server.url("a.tar.xz"), sha256=None, expected_size=None, progress=False)
    assert list_categories(root) == ["bottle"]
    with pytest.raises(ValueError, match=r"no folder for categories \['cable'\]"):
        download_mvtec(root, ["cable"], url=server.url("a.tar.xz"), sha256=None, expected_size=None, progress=False)


def test_download_mvtec_checksum_mismatch(server, mvtec_archive, tmp_path):
    server.files["m.tar.xz"] = mvtec_archive
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download_mvtec(
            tmp_path / "d", ["bottle"], url=server.url("m.tar.xz"), sha256="1" * 64, expected_size=None, progress=False
        )
    assert not (tmp_path / "d" / "bottle").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_archive_members_are_refused(server, tmp_path, kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        if kind == "symlink":
            info = tarfile.TarInfo("bottle/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
        else:
            payload = b"owned"
            info = tarfile.TarInfo("bottle/../../evil.txt" if kind == "dotdot" else str(tmp_path / "evil.txt"))
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    server.files["bad.tar.xz"] = buffer.getvalue()
    with pytest.raises(ValueError, match="refusing archive member"):
        download_mvtec(
            tmp_path / "data", ["bottle"], url=server.url("bad.tar.xz"), sha256=None, expected_size=None, progress=False
        )
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "data" / "bottle" / "link").exists()


def test_download_mvtec_rejects_unknown_official_category_without_network(tmp_path):
    with pytest.raises(ValueError, match="unknown MVTec-AD categories.*bottl"):
        download_mvtec(tmp_path, ["bottl"])


# ----------------------------------------------------------------------------- built-in dataset

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2)


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    return make_builtin_dataset(tmp_path_factory.mktemp("builtin") / "b", seed=0, **SMALL)


def test_builtin_is_deterministic(builtin_root, tmp_path):
    same = make_builtin_dataset(tmp_path / "same", seed=0, **SMALL)
    reference = _file_digests(builtin_root)
    assert len(reference) == len(BUILTIN_CATEGORIES) * (3 + 2 + 2 * 2 * len(DEFECT_KINDS))
    assert _file_digests(same) == reference
    other = _file_digests(make_builtin_dataset(tmp_path / "other", seed=1, categories=["brick", "nut"], **SMALL))
    assert other.keys() <= reference.keys()
    assert all(other[name] != reference[name] for name in other if not name.endswith("_mask.png"))


def test_builtin_subset_matches_full_set(builtin_root, tmp_path):
    subset = _file_digests(make_builtin_dataset(tmp_path / "sub", seed=0, categories=["gravel"], **SMALL))
    reference = _file_digests(builtin_root)
    assert subset == {k: v for k, v in reference.items() if k.startswith("gravel/")}


def test_builtin_is_readable_with_exact_masks(builtin_root):
    assert list_categories(builtin_root) == sorted(BUILTIN_CATEGORIES)
    for category in BUILTIN_CATEGORIES:
        test = MVTecAD(builtin_root, category, "test", image_size=64)
        kinds = test.defect_types
        assert len(kinds) >= 5 and len(set(kinds) & set(LOW_CONTRAST_KINDS)) >= 2
        assert set(kinds) <= set(DEFECT_KINDS)
        images, masks, labels = test.stack()
        assert images.shape == (2 + 2 * len(kinds), 3, 64, 64)
        assert float(images.std()) > 0.02  # not blank
        per_image = masks.flatten(1).sum(1)
        assert torch.all(per_image[labels == 0] == 0)
        assert torch.all(per_image[labels == 1] >= 4)
        local = torch.tensor([s.defect_type not in ("good", "discolour") for s in test.samples])
        assert torch.all(per_image[local] < 0.5 * 64 * 64)  # defects are local
        assert torch.all(per_image[labels == 1] < 0.8 * 64 * 64)  # but a discoloured object may fill most
        train = MVTecAD(builtin_root, category, "train", image_size=64, val_fraction=0)
        assert len(train) == 3 and train.labels == [0, 0, 0]


def test_builtin_mask_is_exactly_the_altered_region():
    """Against the same scene drawn without the defect: inside the mask the pixels change, away
    from it they equal the clean scene up to sensor noise and 8-bit rounding."""
    from scipy.ndimage import binary_dilation

    from diffad.data import builtin, scenes

    size = 64
    for category in BUILTIN_CATEGORIES + builtin.DEVELOPMENT_CATEGORIES:
        for kind_index, kind in enumerate(builtin.CATEGORY_DEFECTS[category]):
            for index, level in enumerate((0.0, 0.5, 1.0)):
                # Each defective image draws its scene first from its own generator, so the same
                # seed gives the clean scene.
                clean = scenes.SCENES[category](builtin.category_rng(0, category, 100 + kind_index, index), size).image
                rng = builtin.category_rng(0, category, 100 + kind_index, index)
                image, mask = builtin._defective_image(category, kind, rng, size, level)
                change = np.abs(image / 255.0 - clean).max(axis=2)
                assert change[mask].mean() > 0.03, (category, kind, index)
                far = ~binary_dilation(mask, iterations=4)
                assert change[far].max() < 0.06, (category, kind, index)
                assert change[~mask].mean() < 0.02, (category, kind, index)


def test_builtin_is_idempotent_and_rebuilds_on_new_parameters(tmp_path):
    root = make_builtin_dataset(tmp_path / "b", categories=["grass"], **SMALL)
    manifest = root / "grass" / ".builtin.json"
    first = manifest.stat().st_mtime_ns
    image = root / "grass" / "train" / "good" / "000.png"
    image_time = image.stat().st_mtime_ns
    make_builtin_dataset(tmp_path / "b", categories=["grass"], **SMALL)
    assert manifest.stat().st_mtime_ns == first and image.stat().st_mtime_ns == image_time
    assert json.loads(manifest.read_text())["parameters"]["image_size"] == 64

    make_builtin_dataset(tmp_path / "b", categories=["grass"], **{**SMALL, "n_train": 4})
    assert len(list((root / "grass" / "train" / "good").glob("*.png"))) == 4
    image.unlink()  # an incomplete dataset is rebuilt
    make_builtin_dataset(tmp_path / "b", categories=["grass"], **{**SMALL, "n_train": 4})
    assert image.is_file()


def test_builtin_refuses_foreign_folders_and_bad_arguments(tmp_path):
    (tmp_path / "b" / "brick").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "b" / "brick"))):
        make_builtin_dataset(tmp_path / "b", categories=["brick"], **SMALL)
    with pytest.raises(ValueError, match="unknown built-in categories"):
        make_builtin_dataset(tmp_path / "c", categories=["carpet"])
    with pytest.raises(ValueError, match="image_size"):
        make_builtin_dataset(tmp_path / "c", image_size=8)
    with pytest.raises(ValueError, match="seed"):
        make_builtin_dataset(tmp_path / "c", seed=-1)
    with pytest.raises(ValueError, match="n_train"):
        make_builtin_dataset(tmp_path / "c", n_train=0)


def test_defect_kind_documentation():
    assert len(DEFECT_KINDS) >= 9 and set(LOW_CONTRAST_KINDS) <= set(DEFECT_KINDS)
    assert {"scratch", "crack", "stain", "hole", "foreign"} <= set(DEFECT_KINDS)
    assert all(isinstance(text, str) and len(text) > 20 for text in DEFECT_KINDS.values())


def test_every_defect_kind_has_one_painter():
    from diffad.data.defects import DEFECT_KINDS, PAINTERS as _PAINTERS

    assert set(_PAINTERS) == set(DEFECT_KINDS)


def test_downsampled_masks_keep_a_thin_crack_in_one_piece():
    from skimage.draw import line

    from diffad.data.mvtec import downsample_mask
    from diffad.metrics import label_regions

    crack = np.zeros((256, 256), dtype=bool)
    crack[line(10, 10, 240, 200)] = True  # one pixel wide, one 8-connected region
    small = downsample_mask(crack, (64, 64))
    assert small.dtype == np.float32 and set(np.unique(small)) == {0.0, 1.0}
    assert label_regions(small > 0)[1] == 1
    nearest = np.asarray(Image.fromarray(crack.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST)) > 0
    assert label_regions(nearest)[1] > 3  # what nearest neighbour did: the crack in pieces
    # a pixel is defect exactly when some part of its 4x4 block is
    blocks = crack.reshape(64, 4, 64, 4).any(axis=(1, 3))
    np.testing.assert_array_equal(small > 0, blocks)
    np.testing.assert_array_equal(downsample_mask(crack, (256, 256)), crack.astype(np.float32))


def test_development_set_shares_no_source_or_seed_with_the_test_categories(tmp_path):
    from diffad.data import DEVELOPMENT_CATEGORIES, make_development_dataset
    from diffad.data.defects import _FOREIGN_SOURCE, _MATCHED_SOURCE

    root = make_development_dataset(tmp_path / "dev", image_size=64, n_train=2, n_test_good=1, n_test_per_defect=1)
    assert list_categories(root) == sorted(DEVELOPMENT_CATEGORIES)
    assert not set(DEVELOPMENT_CATEGORIES) & set(BUILTIN_CATEGORIES)
    for category in DEVELOPMENT_CATEGORIES:
        manifest = json.loads((root / category / ".builtin.json").read_text())["parameters"]
        assert manifest["seed"] != 0 and manifest["defect_kinds"] == list(DEFECT_KINDS)
        # the patches pasted into development images come from photographs no test category is made of
        assert {_FOREIGN_SOURCE[category], _MATCHED_SOURCE[category]}.isdisjoint(BUILTIN_CATEGORIES)
        test = MVTecAD(root, category, "test", image_size=64)
        assert sorted(set(test.defect_types) - {"good"}) == sorted(DEFECT_KINDS)
    with pytest.raises(ValueError, match="seed other than 0"):
        make_development_dataset(tmp_path / "bad", seed=0)


def test_coin_is_a_photographed_object_with_pose_changes():
    from diffad.data import builtin
    from diffad.data.scenes import SCENES

    scenes = [SCENES["coin"](builtin.category_rng(0, "coin", 1, i), 64) for i in range(2)]
    assert all(s.is_object for s in scenes)
    coverage = scenes[0].support.mean()
    assert 0.3 < coverage < 0.55  # a disc of radius 0.74 of half the side: 43 % of the image
    assert np.abs(scenes[0].image - scenes[1].image).mean() > 0.01  # pose and light differ
    grey = scenes[0].image.mean(axis=2)
    assert grey[scenes[0].support > 0.99].std() > 0.05  # the photograph's relief, not a flat disc
