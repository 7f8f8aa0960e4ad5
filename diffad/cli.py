"""Command line: ``python -m diffad train | evaluate | reproduce | tune | plan | builtin``.

    python -m diffad builtin data/builtin
    python -m diffad builtin data/crosscheck --crosscheck
    python -m diffad builtin data/development --development
    python -m diffad tune --data-root data/development --out runs/development
    python -m diffad plan --preset paper --gpu-memory 15 --compute-capability 7.5
    python -m diffad train --data-root data/builtin --category brick --out runs/brick
    python -m diffad train --images photos/good --out runs/part              # a plain folder of good photos
    python -m diffad predict runs/part new/*.jpg --out results               # overlays, maps, predictions.csv
    python -m diffad evaluate --data-root data/builtin --category brick --model runs/brick
    python -m diffad reproduce --data-root data/builtin --preset cpu --out runs/cpu

Every preset field can be overridden with ``--set name=value`` (e.g. ``--set train_steps=100``).

Several GPUs: ``torchrun --standalone --nproc_per_node 8 -m diffad train ...`` trains one model
with DistributedDataParallel (the preset's batch split over the GPUs);
``torchrun --standalone --nproc_per_node 8 -m diffad reproduce ...`` spreads the categories
over the GPUs, one model per category, and rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from diffad.presets import PRESETS, PresetError, get_preset, parse_field
from diffad.process import skip_final_collection


def parse_overrides(pairs: list[str]) -> dict:
    """``name=value`` strings to a dict, each value read by its field's type (presets.parse_field).

    A bad pair raises PresetError (a ValueError) naming the field, the value and what is allowed.
    """
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PresetError(f"--set expects name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        overrides[name.strip()] = parse_field(name.strip(), value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, needs_category=False, mvtec_required=True):
        p.add_argument("--data-root", required=mvtec_required, type=Path, help="a folder in the MVTec-AD layout")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="default: cpu (evaluate: the preset the model was trained with)")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a preset field")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
        if needs_category:
            p.add_argument("--category", required=mvtec_required, action="append",
                           help="category to use; repeat it to train one unified model")

    p = sub.add_parser("builtin", help="write the built-in dataset")
    p.add_argument("root", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crosscheck", action="store_true",
                   help="the cross-check test set instead: the same training images, new normal test images "
                        "and defects from a second, independent painter (diffad.data.crosscheck; seed default 2)")
    p.add_argument("--development", action="store_true",
                   help="the development set instead: two categories of other photographs (coin, tissue), "
                        "where settings are chosen (diffad.data.make_development_dataset; seed default 1)")

    p = sub.add_parser("tune", help="choose the scoring settings on a development set: train or load one model "
                                     "per category, score once, sweep diffad.studies.tuning.SCORING_GRID, print the choice")
    common(p)
    p.add_argument("--out", required=True, type=Path, help="models, sweep.csv and chosen.json go here")
    p.add_argument("--category", action="append", default=None, help="default: every category under --data-root")

    p = sub.add_parser("plan", help="how training would run on a GPU (this one, or one described): precision, "
                                     "gradient checkpointing, EMA, estimated peak memory and time")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a preset field")
    p.add_argument("--gpu-memory", default=None, metavar="GIB", help="plan for a GPU with this memory, e.g. 15")
    p.add_argument("--compute-capability", type=str, default=None, metavar="X.Y", help="e.g. 7.5 for a T4")
    p.add_argument("--categories", type=int, default=1, help="classes of a unified model (1: one category)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="also estimate the whole table's training time on N GPUs (reproduce under torchrun)")
    p.add_argument("--table-categories", type=int, default=None, metavar="C",
                   help="categories of the table, one model each (default: MVTec-AD's 15; "
                        "a unified model of --categories > 1 is one model for all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("train", help="train (or resume) a model on an MVTec-AD category (--data-root, --category), "
                                      "or a detector on a plain folder of good photos (--images); under torchrun, "
                                      "one model over all processes")
    common(p, needs_category=True, mvtec_required=False)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many steps in this call (the checkpoint resumes it)")
    _own_object_arguments(p, sub)

    p = sub.add_parser("evaluate", help="evaluate a trained model on a category's test split")
    common(p, needs_category=True)
    p.add_argument("--model", required=True, type=Path, help="the --out folder of `diffad train`")
    p.add_argument("--no-baselines", action="store_true")

    p = sub.add_parser("reproduce", help="train and evaluate every category, write results.csv and tables; "
                                          "under torchrun, the categories spread over the processes")
    common(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--category", action="append", default=None, help="only these categories")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--intervals", type=int, default=None, metavar="N",
                   help="bootstrap resamples of the test images behind each 95%% interval "
                        "(default: diffad.evaluate.BOOTSTRAP_RESAMPLES; 0: no intervals, a faster run)")
    return parser


def _own_object_arguments(p, sub) -> None:
    """``train``'s options for a plain folder of photos, and the ``predict`` command (diffad.detector)."""
    from diffad.detector import detector_methods

    own = p.add_argument_group("a plain folder of photos (diffad.detector)")
    own.add_argument("--images", type=Path, default=None, help="a folder of photos of good parts (any size, RGB or "
                                                               "grey, PNG/JPEG); replaces --data-root and --category")
    own.add_argument("--method", default="diffusion", choices=detector_methods(),
                     help="the diffusion model, or a method of diffad.methods")
    own.add_argument("--test", type=Path, default=None,
                     help="labelled test images: good/ and one folder per defect kind (image AUROC is reported)")
    own.add_argument("--masks", type=Path, default=None, help="their masks, <kind>/<name>_mask.png (default: "
                                                              "<test>/ground_truth; pixel AUROC and PRO)")
    own.add_argument("--fpr", type=float, default=0.01,
                     help="the share of good photos the threshold may flag (default 0.01)")
    own.add_argument("--holdout", type=float, default=0.25,
                     help="the share of the photos held out to set the threshold (default 0.25)")
    own.add_argument("--threshold-from", default="normal", choices=("normal", "labels"),
                     help="set the threshold on the held-out good photos at --fpr (default), or on the "
                          "labelled --test images")
    own.add_argument("--name", default=None, help="the object's name (default: the folder's)")

    p = sub.add_parser("predict", help="score new images with a run of `train --images`: an overlay (heat map and "
                                        "defect outline), the raw map (.npy) per image, and predictions.csv")
    p.add_argument("run", type=Path, help="the --out folder of `diffad train --images`")
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--out", required=True, type=Path, help="where the overlays, maps and predictions.csv go")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()  # the command ends 1-2 s sooner (diffad.process)
    args = build_parser().parse_args(argv)
    if args.command == "builtin":
        from diffad.data import make_builtin_dataset, make_crosscheck_dataset

        if args.crosscheck and args.development:
            raise SystemExit("diffad builtin: choose one of --crosscheck and --development")
        if args.crosscheck:
            seed = 2 if args.seed == 0 else args.seed
            print(make_crosscheck_dataset(args.root, seed=seed, image_size=args.image_size))
        elif args.development:
            from diffad.data import make_development_dataset

            seed = 1 if args.seed == 0 else args.seed
            print(make_development_dataset(args.root, seed=seed, image_size=args.image_size))
        else:
            print(make_builtin_dataset(args.root, seed=args.seed, image_size=args.image_size))
        return 0
    from diffad import distributed

    try:
        overrides = parse_overrides(getattr(args, "set", []))
        if args.command == "plan":
            return _plan(args, overrides)
        if args.command == "train" and args.images is not None:
            return _train_images(args, overrides)
        if args.command == "predict":
            return _predict(args)
        if args.command == "train":
            if args.data_root is None or not args.category:
                raise ValueError("train needs --images (a folder of good photos), or --data-root and --category "
                                 "(an MVTec-AD layout)")
            from diffad.train import fit

            model = fit(args.data_root, args.category, args.out, args.preset or "cpu", device=args.device,
                        stop_after=args.stop_after, **overrides)
            if distributed.is_main():
                done = "" if (args.out / "model.pt").is_file() else " (stopped early; run again to resume)"
                print(f"trained {model.categories}: {len(model.history)} steps, model in {args.out}{done}")
        elif args.command == "evaluate":
            from diffad.evaluate import evaluate_category, write_results_csv
            from diffad.models import MODEL_NAME, TrainedModel

            model = TrainedModel.load(args.model / MODEL_NAME, args.device)
            # scored with its preset's scoring settings of today and --set, not of its training day
            known = model.preset.name in PRESETS
            base = args.preset or (model.preset.name if known else model.preset)
            model = model.scored_as(get_preset(base, **overrides))
            rows = []
            for category in args.category:
                rows += evaluate_category(model, args.data_root, category, baselines=not args.no_baselines,
                                          device=args.device, progress=True).rows
            for r in rows:
                print(f"{r['category']:<12} {r['method']:<9} pixel AUROC {r['pixel_auroc']:.3f}  "
                      f"PRO {r['pro']:.3f}  image AUROC {r['image_auroc']:.3f}")
            write_results_csv(rows, args.model / "results.csv")
        elif args.command == "tune":
            from diffad.studies.tuning import tune

            chosen, _ = tune(args.data_root, args.out, args.preset or "cpu", args.category, device=args.device,
                             **overrides)
            print((args.out / "chosen.json").read_text())
        elif args.command == "reproduce":
            from diffad.evaluate import BOOTSTRAP_RESAMPLES, reproduce

            reproduce(args.data_root, args.out, args.preset or "cpu", categories=args.category,
                      baselines=not args.no_baselines, figures=not args.no_figures, device=args.device,
                      intervals=BOOTSTRAP_RESAMPLES if args.intervals is None else args.intervals, **overrides)
            if distributed.is_main():
                print((args.out / "table1.md").read_text())
                print(f"results in {args.out / 'results.csv'}")
    except (FileNotFoundError, ValueError, OSError, distributed.PeerLost) as exc:
        where = f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.launched() else ""
        print(f"diffad {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _train_images(args, overrides: dict) -> int:
    """``train --images``: a detector on a plain folder of photos (diffad.detector.train)."""
    from diffad import detector

    if args.data_root is not None or args.category:
        raise ValueError("--images replaces --data-root and --category: give one or the other")
    detector.train(args.images, args.out, method=args.method, preset=args.preset or "cpu", test=args.test,
                   masks=args.masks, fpr=args.fpr, holdout=args.holdout, threshold_from=args.threshold_from,
                   name=args.name, device=args.device, **overrides)
    print(f"run in {args.out}; predict with: python -m diffad predict {args.out} IMAGES... --out DIR")
    return 0


def _predict(args) -> int:
    """``predict RUN IMAGES... --out DIR``: the same Detector.predict and write as in Python."""
    from diffad.detector import Detector

    model = Detector.load(args.run, args.device)
    predictions = model.predict(args.images)
    table = model.write(predictions, args.out)
    flagged = predictions.verdicts.count("defect")
    print(f"{len(predictions)} image(s): {flagged} defect, {len(predictions) - flagged} good at threshold "
          f"{predictions.threshold:.4g}; overlays, maps and {table.name} in {args.out}")
    return 0


def _plan(args, overrides: dict) -> int:
    import json

    memory_gib = None if args.gpu_memory is None else _gpu_memory(args.gpu_memory)
    capability = None if args.compute_capability is None else _compute_capability(args.compute_capability)
    if args.categories < 1:
        raise ValueError(f"--categories takes 1 or more, got {args.categories}")
    from diffad.device_plan import plan_training

    preset = get_preset(args.preset, **overrides)
    plan = plan_training(preset, memory_gib=memory_gib, compute_capability=capability,
                         num_classes=args.categories, gpus=args.gpus, table_categories=args.table_categories)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1, default=str))
    else:
        print(plan.describe())
    return 0 if plan.fits is not False else 3


def _gpu_memory(text: str) -> float:
    """``--gpu-memory``: a GPU's memory in GiB, a finite number above 0."""
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"--gpu-memory takes the GPU's memory in GiB, a number above 0 (e.g. 15); got {text!r}")
    return gib


def _compute_capability(text: str) -> tuple[int, int]:
    """``--compute-capability``: X.Y with X >= 1 (7.5 for a T4, 8.0 for an A100)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    if match is None or int(match[1]) < 1:
        raise ValueError(f"--compute-capability takes X.Y with X >= 1, e.g. 7.5; got {text!r}")
    return int(match[1]), int(match[2])
