"""Speed of ``predict`` with the cpu preset, end to end: images/s and where the time goes.

    python benchmarks/bench_predict.py [--images 64] [--repeats 3] [--threads N]

Writes a folder of phone-like JPEGs (the rocket photos of chapter 15, 224-320 px), builds a
diffusion detector from a shipped cpu-preset model (the weights do not change the speed), and times
``Detector.predict`` followed by ``Detector.write``, exactly what ``python -m diffad predict`` runs:
reading (decode, EXIF, resize to 64 px and to the overlay's 256 px), the UNet passes (one per test
timestep), the backbone (the feature branch's targets), the maps (normalisation, smoothing, the
ensemble, image scores) and writing (overlay PNG, raw map .npy, predictions.csv). The one-off cost
of a shell command (imports, loading the run) is printed apart. The best of ``--repeats`` runs is kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

STAGES = ("reading", "unet", "backbone", "maps", "writing")


def build_detector(folder: Path, run: Path):
    """A diffusion detector of the cpu preset, saved to ``run`` (threshold and heat scale from 8 photos)."""
    from diffad.detector import MODEL_FOLDER, Detector, Threshold, load_pictures
    from diffad.scoring import Normalizer, score_raw
    from diffad.train import MODEL_NAME, TrainedModel

    shipped = Path(__file__).resolve().parents[1] / "diffad" / "resources" / "checkpoints" / "cpu-brick.pt"
    model = TrainedModel.load(shipped)
    images = load_pictures(sorted(folder.glob("*.jpg"))[:8], model.preset.image_size)[0]
    detector = Detector("diffusion", model.preset, model, "bench", Threshold(0.0, "normal", 0.01, 8, 0, 0), (0.0, 1.0))
    raw = score_raw(model, images, extractor=detector.extractor, noise_indices=[0] * len(images))
    detector.normalizer = Normalizer.fit(raw, model.preset.smoothing_sigma)
    maps, scores = detector.score(images)
    detector.threshold = Threshold(float(scores.max()), "normal", 0.01, 8, 0, 0)
    detector.heat_range = (float(maps.median()), 2 * float(scores.max()) - float(maps.median()))
    model.save(run / MODEL_FOLDER / MODEL_NAME)
    detector.save(run)
    return detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffad.data.photos import make_photo_folder
    from diffad.detector import Detector

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_photo_folder(tmp / "rocket", n_normal=args.images, n_test_good=0, n_per_defect=1) / "normal"
        build_detector(folder, tmp / "run")
        start = time.perf_counter()
        detector = Detector.load(tmp / "run")
        load_seconds = time.perf_counter() - start
        paths = sorted(folder.glob("*.jpg"))
        detector.predict(paths[:8])  # warm-up: the backbone's weights, oneDNN's kernels
        best = None
        for repeat in range(args.repeats):
            start = time.perf_counter()
            predictions = detector.predict(paths)
            detector.write(predictions, tmp / f"out{repeat}")
            total = time.perf_counter() - start
            if best is None or total < best[0]:
                best = (total, dict(predictions.timings))
    total, timings = best
    print(f"predict, cpu preset ({detector.preset.image_size} px, {len(detector.preset.test_timesteps)} UNet passes "
          f"per image, backbone {detector.preset.backbone} at {detector.preset.backbone_input_size} px), "
          f"{torch.get_num_threads()} threads, {len(paths)} JPEGs of 224-320 px:")
    print(f"  {len(paths) / total:.1f} images/s end to end ({1000 * total / len(paths):.1f} ms per image, best of "
          f"{args.repeats})")
    for stage in STAGES:
        seconds = timings.get(stage, 0.0)
        print(f"  {stage:<9} {1000 * seconds / len(paths):6.1f} ms/image  {100 * seconds / total:5.1f}%")
    other = total - sum(timings.get(stage, 0.0) for stage in STAGES)
    print(f"  {'other':<9} {1000 * other / len(paths):6.1f} ms/image  {100 * other / total:5.1f}%")
    print(f"  once per command: loading the run {load_seconds:.2f} s (plus Python's imports)")


if __name__ == "__main__":
    main()
