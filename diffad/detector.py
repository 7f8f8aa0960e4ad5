"""Your own object: train on a folder of good photos, find what is wrong in new ones.

One code path for the shell and for Python::

    python -m diffad train --images photos/good --out runs/part        # or --method padim / patchcore
    python -m diffad predict runs/part new/*.jpg --out results

    from diffad import detector
    model = detector.train("photos/good", "runs/part")                 # or detector.Detector.load("runs/part")
    result = model.predict(["new/1.jpg", "new/2.jpg"])                 # maps, scores, verdicts
    model.write(result, "results")                                     # overlays, maps (.npy), predictions.csv

Training reads the folder (:class:`diffad.data.folder.ImageFolder`: every check before anything is
written), holds out ``holdout`` of the photos (the preset's seeded ``val_fraction`` carve-out, as for
MVTec-AD), trains the method on the rest (the diffusion model through :func:`diffad.train.fit`, PaDiM
or PatchCore through their ``fit``), scores the held-out photos the way ``predict`` scores new ones,
and sets the **threshold** on the image score from them: the lowest threshold that flags at most
``fpr`` of the held-out good photos (:func:`threshold_at_fpr`). How many photos it rests on is
recorded, with a warning when they are too few to measure that rate. With labelled test images
(``test=``: ``good/`` and one folder per defect kind) the run also reports image AUROC, with masks
pixel AUROC and PRO (:func:`diffad.evaluate.metric_row`), and can take its threshold from them
(``threshold_from="labels"``: the best balance of detections and false alarms, Youden's J).

A run folder holds ``detector.json`` (method, settings, threshold, the scale of the heat maps, the
normalisation statistics, the evaluation; written last and atomically: a run without it did not
finish) beside the model (``model/model.pt`` for the diffusion model, ``baseline.pt`` otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from diffad import __version__
from diffad.data import MVTecAD
from diffad.data.folder import ImageFolder, list_images, read_image
from diffad.data.mvtec import _image_array
from diffad.device import pick_device
from diffad.io import atomic_save, atomic_write, load_torch_file
from diffad.presets import Preset, get_preset

__all__ = ["detector_methods", "DEFAULT_FPR", "DEFAULT_HOLDOUT", "Threshold", "Predictions", "Detector", "train",
           "threshold_at_fpr", "threshold_from_labels", "load_pictures", "RunError", "use_shipped_model"]


def detector_methods() -> tuple[str, ...]:
    """The methods a detector can be: the diffusion model, and every method of :mod:`diffad.methods`."""
    from diffad import methods

    return ("diffusion",) + methods.names()


DEFAULT_FPR = 0.01
DEFAULT_HOLDOUT = 0.25
RUN_FORMAT = "diffad-detector"
RUN_VERSION = 1
RUN_FILE = "detector.json"
MODEL_FOLDER = "model"
BASELINE_FILE = "baseline.pt"
CSV_NAME = "predictions.csv"
OVERLAY_SIZE = 256  # the longer side of the photo in the overlays


class RunError(ValueError):
    """A run folder that cannot be used: unfinished, of another kind, or of another version."""


# ----------------------------------------------------------------------------- thresholds


@dataclass
class Threshold:
    """The image-score threshold and what it rests on: an image is a defect when its score is above it."""

    value: float
    source: str  # "normal": held-out good images at a false-positive rate; "labels": labelled test images
    fpr: float  # the false-positive rate asked for
    n_normal: int  # the good images it was set on
    allowed: int  # how many of them it may flag: floor(fpr * n_normal)
    flagged: int  # how many of them it does flag
    warning: str | None = None

    def describe(self) -> str:
        if self.source == "labels":
            return f"threshold {self.value:.4g}, from the labelled test images (best detections minus false alarms)"
        return (f"threshold {self.value:.4g}: flags {self.flagged} of the {self.n_normal} held-out good images "
                f"(false-positive rate asked: {self.fpr:.1%})")


def threshold_at_fpr(normal_scores, fpr: float = DEFAULT_FPR) -> Threshold:
    """The lowest threshold, among the scores, that flags at most ``fpr`` of these good images' scores.

    An image is flagged when its score is above the threshold. With n scores sorted, it may flag
    k = floor(fpr * n) of them, so the threshold is the (n - k)-th smallest score. With fewer than
    1 / fpr images, k is 0 and the threshold is their highest score: the rate asked for cannot be
    measured on so few, and the warning says so (new good images will be flagged more often).
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if scores.size == 0:
        raise ValueError("no scores of good images to set a threshold on")
    if not np.all(np.isfinite(scores)):
        raise ValueError("the scores of the good images contain NaN or infinite values")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"the false-positive rate must lie strictly between 0 and 1, got {fpr}")
    n = scores.size
    allowed = int(math.floor(fpr * n + 1e-9))
    value = float(scores[n - 1 - allowed])
    warning = None
    if allowed == 0:
        needed = math.ceil(1.0 / fpr - 1e-9)
        warning = (f"the threshold rests on {n} good image{'s' if n > 1 else ''}: too few to measure a "
                   f"false-positive rate of {fpr:.1%} (that needs {needed} or more); it is the highest of their "
                   f"scores, so new good images will be flagged more often than {fpr:.1%} (about 1 in {n + 1}). "
                   f"Add good photos, or name a larger rate")
    return Threshold(value, "normal", float(fpr), n, allowed, int((scores > value).sum()), warning)


def threshold_from_labels(scores, labels) -> float:
    """The score threshold that best separates labelled test images: the highest Youden's J
    (share of defects flagged minus share of good images flagged), the higher threshold on a tie."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() != 0
    if labels.all() or not labels.any():
        raise ValueError("a threshold from labels needs good and defective test images")
    candidates = np.unique(scores)
    flagged = scores[None, :] > candidates[:, None]
    j = flagged[:, labels].mean(axis=1) - flagged[:, ~labels].mean(axis=1)
    return float(candidates[np.flatnonzero(j == j.max())[-1]])


# ----------------------------------------------------------------------------- reading pictures


def _paths_of(items) -> list:
    """Files and folders (expanded to their images, non-images reported) and in-memory pictures, in order."""
    from PIL import Image

    if isinstance(items, (str, Path, Image.Image)):
        items = [items]
    elif isinstance(items, (np.ndarray, torch.Tensor)):  # one picture (3 dims) or a batch (4)
        items = [items] if items.ndim <= 3 else list(items)
    out = []
    for item in items:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            images, others = list_images(item)
            if others:
                print(f"skipped {len(others)} file(s) in {item} that are not images: "
                      f"{', '.join(p.name for p in others[:5])}")
            if not images:
                raise ValueError(f"no images in {item}")
            out += images
        elif isinstance(item, (str, Path)):
            if not Path(item).is_file():
                raise FileNotFoundError(f"no such image file: {item}")
            out.append(Path(item))
        else:
            out.append(item)
    if not out:
        raise ValueError("no images to predict on")
    return out


def _as_picture(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    array = np.asarray(item.detach().cpu().numpy() if torch.is_tensor(item) else item)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # a (3, H, W) tensor in [0, 1]
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def load_pictures(items, image_size: int) -> tuple[torch.Tensor, list[np.ndarray], list[str]]:
    """Images for a model at ``image_size`` (N, 3, S, S) in [0, 1], the photos at overlay size (uint8),
    and their names: from files, folders, PIL images, arrays (H, W, 3) or tensors (3, H, W) in [0, 1]."""
    tensors, pictures, names = [], [], []
    for index, item in enumerate(_paths_of(items)):
        if isinstance(item, Path):
            picture, name = read_image(item, draft=max(image_size, OVERLAY_SIZE)), str(item)
        else:
            picture, name = _as_picture(item), f"image{index:04d}"
        tensors.append(torch.from_numpy(_image_array(picture, (image_size, image_size)).transpose(2, 0, 1).copy()))
        shown = picture.convert("RGB")
        shown.thumbnail((OVERLAY_SIZE, OVERLAY_SIZE))
        pictures.append(np.asarray(shown))
        names.append(name)
    return torch.stack(tensors), pictures, names


# ----------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """What :meth:`Detector.predict` returns: one entry per image, in the order given."""

    names: list[str]  # the files, or image0000, ... for pictures given in memory
    maps: np.ndarray  # (N, S, S) anomaly maps at the model's size, in the run's units
    scores: np.ndarray  # (N,) image scores
    verdicts: list[str]  # "defect" (score above the threshold) or "good"
    threshold: float
    pictures: list[np.ndarray] = field(repr=False, default_factory=list)  # the photos at overlay size
    timings: dict[str, float] = field(default_factory=dict)  # seconds: reading, unet, backbone, maps, writing

    def __len__(self) -> int:
        return len(self.names)

    def rows(self) -> list[dict]:
        return [{"path": name, "score": float(score), "verdict": verdict, "threshold": self.threshold}
                for name, score, verdict in zip(self.names, self.scores, self.verdicts)]


class _Timed:
    """A callable that adds up the seconds spent in the callable it wraps (the backbone, inside score_raw)."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _unique_stems(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for name in names:
        stem = Path(name).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


# ----------------------------------------------------------------------------- the detector


class Detector:
    """A trained method, its threshold and the scale of its heat maps: ``predict`` and ``write``.

    Made by :func:`train`, read back by :meth:`load`. ``method`` is one of :func:`detector_methods`;
    ``model`` a :class:`~diffad.models.TrainedModel` (diffusion) or a fitted PaDiM / PatchCore.
    """

    def __init__(self, method: str, preset: Preset, model, name: str, threshold: Threshold,
                 heat_range: tuple[float, float], normalizer=None, info: dict | None = None, device=None):
        if method not in detector_methods():
            raise ValueError(f"method must be one of {detector_methods()}, got {method!r}")
        self.method, self.preset, self.model, self.name = method, preset, model, name
        self.threshold, self.heat_range, self.normalizer = threshold, tuple(heat_range), normalizer
        self.info = dict(info or {})
        self.device = pick_device(device)
        self._extractor = None

    def __repr__(self) -> str:
        return (f"Detector({self.method}, {self.name!r}, {self.preset.image_size} px, "
                f"{self.threshold.describe()})")

    @property
    def extractor(self):
        if self._extractor is None:
            from diffad.models import build_feature_extractor

            self._extractor = build_feature_extractor(self.preset, self.device)
        return self._extractor

    # ------------------------------------------------------------------ scoring

    def score(self, images: torch.Tensor, timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (N, S, S) and image scores (N,) of images (N, 3, S, S) in [0, 1].

        The diffusion model's maps are the preset's final maps (:func:`diffad.scoring.final_maps`) with
        the run's normalisation statistics; every image gets the same noise draw, so an image's score
        does not depend on the images scored with it. ``timings`` receives seconds per stage.
        """
        timings = {} if timings is None else timings
        if self.method != "diffusion":
            start = time.perf_counter()
            maps, scores = self.model.predict(images)
            timings["backbone"] = timings.get("backbone", 0.0) + time.perf_counter() - start
            return maps, scores
        from diffad.scoring import final_maps, score_raw

        timed = _Timed(self.extractor)
        start = time.perf_counter()
        category = self.model.categories[0] if self.model.num_classes else None
        raw = score_raw(self.model, images, category, seed=self.preset.seed, device=self.device, extractor=timed,
                        noise_indices=[0] * len(images))
        middle = time.perf_counter()
        maps, scores = final_maps(raw, None, self.preset, normalizer=self.normalizer)
        timings["backbone"] = timings.get("backbone", 0.0) + timed.seconds
        timings["unet"] = timings.get("unet", 0.0) + middle - start - timed.seconds
        timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - middle
        return maps["ensemble"], scores["ensemble"]

    def predict(self, images, batch_size: int = 64) -> Predictions:
        """Maps, scores and verdicts of ``images``: files, folders, PIL images, arrays or tensors."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        tensors, pictures, names = load_pictures(images, self.preset.image_size)
        timings["reading"] = time.perf_counter() - start
        maps, scores = [], []
        for begin in range(0, len(tensors), batch_size):
            m, s = self.score(tensors[begin:begin + batch_size], timings)
            maps.append(m.float().numpy())
            scores.append(s.float().numpy())
        scores = np.concatenate(scores)
        verdicts = ["defect" if s > self.threshold.value else "good" for s in scores]
        return Predictions(names, np.concatenate(maps), scores, verdicts, self.threshold.value, pictures, timings)

    def overlay(self, predictions: Predictions, index: int) -> np.ndarray:
        """The overlay of one prediction: the heat map over the photo, the outline where the map exceeds
        the threshold on an image judged defective (:func:`diffad.studies.viz.overlay_image`)."""
        from diffad.overlays import overlay_image

        return overlay_image(predictions.pictures[index], predictions.maps[index], self.threshold.value,
                             self.heat_range, outline=predictions.verdicts[index] == "defect")

    def write(self, predictions: Predictions, out: str | Path) -> Path:
        """Per image ``<stem>_overlay.png`` and ``<stem>_map.npy``, and ``predictions.csv`` (path, score,
        verdict, threshold, overlay, map) into ``out``; each file written whole or not at all."""
        from PIL import Image

        start = time.perf_counter()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = predictions.rows()
        for index, (row, stem) in enumerate(zip(rows, _unique_stems(predictions.names))):
            buffer = io.BytesIO()
            Image.fromarray(self.overlay(predictions, index)).save(buffer, format="PNG", compress_level=1)
            atomic_write(out / f"{stem}_overlay.png", buffer.getvalue())
            buffer = io.BytesIO()
            np.save(buffer, predictions.maps[index].astype(np.float32))
            atomic_write(out / f"{stem}_map.npy", buffer.getvalue())
            row.update(overlay=f"{stem}_overlay.png", map=f"{stem}_map.npy")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["path", "score", "verdict", "threshold", "overlay", "map"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out / CSV_NAME, text.getvalue().encode())
        predictions.timings["writing"] = predictions.timings.get("writing", 0.0) + time.perf_counter() - start
        return out / CSV_NAME

    # ------------------------------------------------------------------ the run folder

    def save(self, run: str | Path) -> Path:
        """Write ``detector.json`` (and ``baseline.pt`` for PaDiM / PatchCore) into ``run``, atomically."""
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        if self.method != "diffusion":
            state = {k: v for k, v in vars(self.model).items() if k not in ("extractor", "device")}
            atomic_save({"class": type(self.model).__name__, "state": state}, run / BASELINE_FILE)
        normalizer = None if self.normalizer is None else {
            part: {kind: values.tolist() for kind, values in getattr(self.normalizer, part).items()}
            for part in ("mean", "std")}
        record = {"format": RUN_FORMAT, "version": RUN_VERSION, "diffad": __version__, "method": self.method,
                  "name": self.name, "preset": self.preset.to_dict(), "threshold": asdict(self.threshold),
                  "heat_range": list(self.heat_range), "normalizer": normalizer, **self.info}
        atomic_write(run / RUN_FILE, (json.dumps(record, indent=1, default=str) + "\n").encode())
        return run / RUN_FILE

    @classmethod
    def load(cls, run: str | Path, device=None) -> "Detector":
        """The detector a run folder holds; an unfinished run, another kind of folder or a run of another
        version is a :class:`RunError` saying which."""
        record = read_run(run)
        run, preset = Path(run), Preset.from_dict(record["preset"])
        device = pick_device(device)
        if record["method"] == "diffusion":
            from diffad.scoring import Normalizer
            from diffad.models import MODEL_NAME, TrainedModel

            model = TrainedModel.load(run / MODEL_FOLDER / MODEL_NAME, device).scored_as(preset)
            normalizer = Normalizer(*({kind: torch.tensor(values) for kind, values in record["normalizer"][part].items()}
                                      for part in ("mean", "std")))
        else:
            model, normalizer = _load_baseline(run / BASELINE_FILE, record["method"], preset, device), None
        info = {k: v for k, v in record.items() if k in ("training", "evaluation")}
        return cls(record["method"], preset, model, record["name"], Threshold(**record["threshold"]),
                   record["heat_range"], normalizer, info, device)


def read_run(run: str | Path) -> dict:
    """A run folder's ``detector.json``, checked: it exists, is this format and this version."""
    run = Path(run)
    path = run / RUN_FILE
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist: train one with `python -m diffad train "
                                f"--images DIR --out {run}`")
    if not path.is_file():
        what = ("its training did not finish: run the same train command again to resume it"
                if (run / MODEL_FOLDER).is_dir() else
                "it is not a folder written by `python -m diffad train --images` (a model trained on an "
                "MVTec-AD layout is scored with `python -m diffad evaluate`)")
        raise RunError(f"{run} holds no {RUN_FILE}: {what}")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not readable JSON ({error}): train the run again") from error
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise RunError(f"{path} is not a diffad detector run (no format {RUN_FORMAT!r})")
    if record.get("version") != RUN_VERSION:
        raise RunError(f"{run} was written by another version of diffad (diffad {record.get('diffad', '?')}, run "
                       f"format {record.get('version')!r}; this diffad {__version__} reads format {RUN_VERSION}): "
                       f"train it again with this version, or predict with the version that trained it")
    return record


def _build_baseline(method: str, preset: Preset, device):
    """A registered method (:mod:`diffad.methods`) on the preset's backbone."""
    from diffad import methods
    from diffad.models import build_feature_extractor

    return methods.get(method).build(preset, build_feature_extractor(preset, device), device)


def _load_baseline(path: Path, method: str, preset: Preset, device):
    if not path.is_file():
        raise RunError(f"{path} is missing: train the run again")
    saved = load_torch_file(path, mmap=False)
    model = _build_baseline(method, preset, device)
    vars(model).update(saved["state"])
    return model.to(device) if hasattr(model, "to") else model


# ----------------------------------------------------------------------------- training

def use_shipped_model(run: str | Path, name: str, preset: str | Preset = "cpu", holdout: float = DEFAULT_HOLDOUT,
                      **overrides) -> bool:
    """Put a model shipped with diffad (``resources/checkpoints/own-<name>.pt``) into ``run`` when it was
    trained with exactly these training settings, so that :func:`train` loads it instead of training
    (the book's chapter 15 reads the rocket's this way); True when it did. Made by ``python -m diffad train
    --images <photos>/normal --out RUN`` and ``TrainedModel.load(RUN/model/model.pt).save(path, half=True)``."""
    from diffad.models import MODEL_NAME
    from diffad.presets import training_fingerprint
    from diffad.shipped import manifest, shipped_file

    target = Path(run) / MODEL_FOLDER / MODEL_NAME
    entry = manifest().get(f"own-{name}.pt")
    if target.is_file() or entry is None:
        return target.is_file()
    wanted = get_preset(preset, **{"val_fraction": holdout, **overrides}).for_categories([name])
    # matched by what the manifest records it was trained with: nothing is read (or fetched) that would not fit
    if entry["categories"] != [name] or entry["training_fingerprint"] != training_fingerprint(wanted):
        return False
    shipped = shipped_file(f"own-{name}.pt")  # in the package, or fetched from the repository
    atomic_write(target, shipped.read_bytes())
    return True



def _check_out(out: Path) -> None:
    """Refuse an output folder that holds something else than (part of) a detector run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the run")
    if (out / RUN_FILE).is_file():
        read_run(out)  # a finished run of this version is trained again in place; another version refused
        return
    ours = {MODEL_FOLDER, BASELINE_FILE}
    others = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if others:
        raise ValueError(f"{out} holds other files ({', '.join(sorted(others)[:5])}): name an empty folder, or "
                         f"the folder of an earlier `train --images` run")


def _training_estimate(preset: Preset, device, feature_channels: int) -> float:
    """Seconds a diffusion run will take here: the fastest of three timed training steps on random data,
    times the preset's steps (loading and the backbone's features come on top, seconds on a CPU)."""
    from diffad.models import build_diffusion, build_unet
    from diffad.models.denoiser import feature_grid
    from diffad.step import Batch, make_optimizer, training_step

    unet = build_unet(preset, feature_channels, 1 if preset.class_cond else None).to(device)
    optimizer, diffusion = make_optimizer(unet, preset, device.type), build_diffusion(preset)
    b, size, grid = preset.batch_size, preset.image_size, feature_grid(preset)
    x0 = torch.rand(b, 3, size, size, device=device) * 2 - 1
    y = torch.zeros(b, dtype=torch.long, device=device) if preset.class_cond else None
    batch = Batch(x0, torch.randint(preset.max_train_timestep or preset.diffusion_steps, (b,), device=device),
                  torch.randn_like(x0), torch.randn(b, feature_channels, grid, grid, device=device), y)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        training_step(unet, optimizer, diffusion, batch, lr=preset.lr, feature_loss_weight=preset.feature_loss_weight,
                      grad_clip=preset.grad_clip, check_finite=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) * preset.train_steps


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _fit_method(folder: ImageFolder, out: Path, method: str, preset: Preset, device, progress: bool):
    """The trained model of ``method`` on the folder's training split (printing the time estimate first)."""
    n_train = len(folder.dataset(folder.name, "train", preset))
    if method == "diffusion":
        from diffad.models import MODEL_NAME, build_feature_extractor
        from diffad.train import fit

        if not (out / MODEL_FOLDER / MODEL_NAME).is_file():
            channels = build_feature_extractor(preset, device, pretrained=False).out_channels
            seconds = _training_estimate(preset, device, channels)
            print(f"training the diffusion model on {n_train} photos: {preset.train_steps} steps of "
                  f"{preset.batch_size} images at {preset.image_size} px, about {_format_seconds(seconds)} here "
                  f"(timed on 3 steps)")
        else:
            print(f"the run folder holds a trained model of these settings: loaded, not trained again")
        return fit(folder, [folder.name], out / MODEL_FOLDER, preset, device=device, progress=progress)
    print(f"fitting {method} on {n_train} photos at {preset.image_size} px (seconds)")
    images = folder.dataset(folder.name, "train", preset).stack()[0]
    return _build_baseline(method, preset, device).fit(images)


def _heat_range(normal_maps: torch.Tensor, threshold: float) -> tuple[float, float]:
    """The colour scale of the heat maps: from the typical pixel of the held-out good images (coldest)
    to as far above the threshold as the threshold is above it (hottest), so the threshold is mid-scale."""
    low = float(np.median(normal_maps.numpy()))
    span = threshold - low if threshold > low else max(float(normal_maps.std()), 1e-6)
    return low, low + 2 * span


def _evaluate(detector: Detector, folder: ImageFolder, preset: Preset) -> dict:
    """Image AUROC on labelled test images (pixel AUROC and PRO with masks), and the verdicts' counts."""
    from diffad.evaluate import metric_row
    from diffad.metrics import image_auroc

    images, masks, labels = folder.dataset(folder.name, "test", preset).stack()
    maps, scores = detector.score(images)
    if folder.has_masks:
        result = metric_row(folder.name, detector.method, masks[:, 0], maps, labels, scores, preset.pro_implementation)
        result = {k: result[k] for k in ("pixel_auroc", "pro", "image_auroc")}
    else:
        result = {"image_auroc": image_auroc(labels, scores)}
    result.update(n_good=int((labels == 0).sum()), n_defective=int(labels.sum()),
                  scores=[float(s) for s in scores], labels=[int(v) for v in labels])
    return result


def _count_errors(evaluation: dict, threshold: float) -> dict:
    scores, labels = np.asarray(evaluation["scores"]), np.asarray(evaluation["labels"])
    return {"false_alarms": int(((scores > threshold) & (labels == 0)).sum()),
            "misses": int(((scores <= threshold) & (labels == 1)).sum())}


def train(images, out, method: str = "diffusion", preset: str | Preset = "cpu", test=None, masks=None,
          fpr: float = DEFAULT_FPR, holdout: float = DEFAULT_HOLDOUT, threshold_from: str = "normal",
          name: str | None = None, device=None, progress: bool = True, **overrides) -> Detector:
    """Train ``method`` on a folder of good photos, set its threshold, and write the run to ``out``.

    ``images``: a folder (or an :class:`ImageFolder`); ``test``/``masks``: optional labelled test images
    and their masks; ``fpr``: the share of good photos the threshold may flag; ``holdout``: the share of
    the photos held out to set it; ``threshold_from``: "normal" (held-out photos at ``fpr``) or "labels"
    (the labelled test images). ``overrides``: preset fields (``train_steps=...``). Returns the detector.
    """
    if method not in detector_methods():
        raise ValueError(f"method must be one of {detector_methods()}, got {method!r}")
    if threshold_from not in ("normal", "labels"):
        raise ValueError(f"threshold_from must be 'normal' or 'labels', got {threshold_from!r}")
    # resolved once, here: a bad field fails before the folder is read
    preset = get_preset(preset, **{"val_fraction": holdout, **overrides})
    folder = images if isinstance(images, ImageFolder) else ImageFolder(images, test, masks, name)
    if threshold_from == "labels" and not folder.labelled:
        raise ValueError("threshold_from='labels' needs a labelled test folder (good/ and defect subfolders)")
    threshold_at_fpr([0.0], fpr)  # checks the rate before any training
    out, device = Path(out), pick_device(device)
    _check_out(out)
    note = folder.size_note(preset.image_size)
    if note:
        print(note)
    held = len(MVTecAD.val_indices(len(folder.paths), preset.val_fraction, preset.seed))
    print(f"{folder.name}: {len(folder.paths)} photos, {len(folder.paths) - held} to train on, {held} held out "
          f"to set the threshold")
    model = _fit_method(folder, out, method, preset, device, progress)
    return _finish(folder, out, method, preset, model, fpr, threshold_from, device)


def _finish(folder, out, method, preset, model, fpr, threshold_from, device) -> Detector:
    """Score the held-out photos, set the threshold (and evaluate on labelled test images), write the run."""
    from diffad.scoring import Normalizer, score_raw

    held_out = folder.dataset(folder.name, "val", preset).stack()[0]
    normalizer = None
    detector = Detector(method, preset, model, folder.name, Threshold(0.0, "normal", fpr, 0, 0, 0), (0.0, 1.0),
                        None, device=device)
    if method == "diffusion":
        model.preset = preset  # fit returns the model with the scoring settings asked for now
        category = model.categories[0] if model.num_classes else None
        raw = score_raw(model, held_out, category, seed=preset.seed, device=device, extractor=detector.extractor,
                        noise_indices=[0] * len(held_out))
        detector.normalizer = normalizer = Normalizer.fit(raw, preset.smoothing_sigma)
    maps, scores = detector.score(held_out)
    threshold = threshold_at_fpr(scores.numpy(), fpr)
    info = {"training": {"images": str(folder.folder), "n_images": len(folder.paths), "n_held_out": len(held_out),
                         "held_out_scores": [float(s) for s in scores], "notes": folder.notes}}
    if folder.labelled:
        evaluation = _evaluate(detector, folder, preset)
        if threshold_from == "labels":
            value = threshold_from_labels(evaluation["scores"], evaluation["labels"])
            threshold = Threshold(value, "labels", fpr, len(held_out), 0, int((scores > value).sum()))
        info["evaluation"] = {**evaluation, **_count_errors(evaluation, threshold.value)}
    detector.threshold, detector.heat_range, detector.info = threshold, _heat_range(maps, threshold.value), info
    detector.save(out)
    _report(detector)
    return detector


def _report(detector: Detector) -> None:
    print(detector.threshold.describe())
    if detector.threshold.warning:
        print(f"warning: {detector.threshold.warning}")
    evaluation = detector.info.get("evaluation")
    if evaluation:
        metrics = ", ".join(f"{label} {evaluation[key]:.3f}" for key, label in
                            (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pro", "PRO"))
                            if key in evaluation)
        print(f"labelled test images ({evaluation['n_good']} good, {evaluation['n_defective']} defective): "
              f"{metrics}; at the threshold {evaluation['false_alarms']} false alarm(s), {evaluation['misses']} "
              f"miss(es)")
