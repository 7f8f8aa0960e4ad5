"""Evaluation: run trained models over a dataset and put the numbers beside the paper's.

``evaluate_category`` scores one category's test split with the diffusion model (ensemble,
KL, RGB and feature maps from one scoring run) and with the SPADE, PaDiM and PatchCore
baselines on the same images, and computes pixel AUROC, PRO and image AUROC for each.

``reproduce`` does that for every category under a data root: it trains each model (or loads
it), evaluates, and writes ``results.csv``, a markdown table beside the paper's Table 1,
per-image anomaly maps and overlay figures. Each finished category is recorded in
``<out>/<category>/metrics.json``; an interrupted run resumes without redoing it (a baseline
added since is run and recorded on its own).

Quoted numbers stay apart from computed ones: ``resources/paper_table1.csv`` is the paper's
Table 1, ``resources/quoted_averages.csv`` holds published MVTec-AD averages of methods the
paper does not list (PatchCore); tables mark both with †.
"""

from __future__ import annotations

import csv
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffad import distributed
from diffad.data import MVTecAD, is_builtin, list_categories
from diffad import methods as method_registry
from diffad.methods import DIFFUSION_MAPS
from diffad.metrics import INTERVAL_COLUMNS, ImageBootstrap, bootstrap_intervals, image_auroc, pixel_auroc, pro, pro_authors
from diffad.presets import Preset, get_preset
from diffad.scoring import MAP_TYPES, RawMaps, final_maps, score_raw
from diffad.tables import markdown_table
from diffad.device import pick_device
from diffad.models.denoiser import TrainedModel, build_feature_extractor
from diffad.train import fit

# The built-in methods, as rows of results.csv: the diffusion model's maps, then the registered
# baselines (diffad.methods; method_names() adds any registered later).
BASELINE_METHODS = method_registry.names()  # those diffad.methods registers itself
METHODS = DIFFUSION_MAPS + BASELINE_METHODS
RESULT_COLUMNS = ("category", "method", "pixel_auroc", "pro", "image_auroc")
# Resamples of the test images behind each 95% interval of results.csv (metrics.ImageBootstrap).
BOOTSTRAP_RESAMPLES = 1000
# Bumped when a change to diffad changes recorded results without changing a preset field, so that
# caches keyed by settings (book.settings_hash) start afresh: 2 = masks downsampled by area
# (data.mvtec.downsample_mask), intervals and image scores recorded.
EVALUATION_VERSION = 2
PAPER_TABLE1 = Path(__file__).parent / "resources" / "paper_table1.csv"
QUOTED_AVERAGES = Path(__file__).parent / "resources" / "quoted_averages.csv"


@dataclass
class CategoryData:
    """A category's splits as tensors at the model's resolution."""

    category: str
    train_images: torch.Tensor
    val_images: torch.Tensor
    test_images: torch.Tensor
    test_masks: torch.Tensor  # (N, H, W) in {0, 1}
    test_labels: torch.Tensor
    defect_types: list[str]

    @classmethod
    def load(cls, data_root, category: str, preset: Preset) -> "CategoryData":
        common = dict(image_size=preset.image_size, val_fraction=preset.val_fraction, seed=preset.seed,
                      image_resize=preset.image_resize)
        train = MVTecAD(data_root, category, split="train", **common)
        val = MVTecAD(data_root, category, split="val", **common)
        test = MVTecAD(data_root, category, split="test", mask_rule=preset.mask_rule, **common)
        test_images, test_masks, test_labels = test.stack()
        return cls(category, train.stack()[0], val.stack()[0], test_images, test_masks[:, 0], test_labels,
                   [sample.defect_type for sample in test.samples])


PRO_IMPLEMENTATIONS = {"exact": pro, "authors": pro_authors}


def metric_row(category: str, method: str, masks, maps, labels, scores, pro_implementation: str = "exact",
               intervals: int = 0, seed: int = 0) -> dict:
    """One results row: pixel AUROC and PRO over the maps, image AUROC over the scores.

    ``pro_implementation``: "exact" (MVTec's PRO) or "authors" (their thinned approximation).
    ``intervals``: that many bootstrap resamples of the test images (seeded by ``seed``) add 95%
    intervals as ``INTERVAL_COLUMNS`` (``pixel_auroc_lo``, ``pixel_auroc_hi``, ...; exact PRO).
    """
    if pro_implementation not in PRO_IMPLEMENTATIONS:
        raise ValueError(f"pro_implementation must be one of {sorted(PRO_IMPLEMENTATIONS)}, got {pro_implementation!r}")
    row = {
        "category": category,
        "method": method,
        "pixel_auroc": pixel_auroc(masks, maps),
        "pro": PRO_IMPLEMENTATIONS[pro_implementation](masks, maps),
        "image_auroc": image_auroc(labels, scores),
    }
    if intervals:
        row.update(bootstrap_intervals(masks, maps, labels, scores, n_resamples=intervals, seed=seed))
    return row


def difference_interval(masks, labels, first: tuple, second: tuple, n_resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """The difference first - second of each metric, with a paired bootstrap interval.

    ``first`` and ``second`` are (maps, image scores) of two methods on the same test images; both
    are scored on the same resamples, so what the images share cancels. metric -> {"difference",
    "lo", "hi", "tie"}: a tie when the interval holds 0.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_resamples)])
    boots = [ImageBootstrap(masks, maps, labels, scores) for maps, scores in (first, second)]
    point = boots[0].metrics(np.ones(n)), boots[1].metrics(np.ones(n))
    diffs = boots[0].metrics_batch(weights) - boots[1].metrics_batch(weights)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(diffs, [tail, 100 - tail], axis=0)
    return {metric: {"difference": point[0][i] - point[1][i], "lo": float(low[i]), "hi": float(high[i]),
                     "tie": bool(low[i] <= 0 <= high[i])}
            for i, metric in enumerate(RESULT_COLUMNS[2:])}


@dataclass
class CategoryResult:
    """Metrics rows, the final maps (N, H, W) per method, and the raw maps for re-weighting."""

    rows: list[dict]
    maps: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    raw_test: RawMaps | None = None
    raw_val: RawMaps | None = None
    extra: dict = field(default_factory=dict)


def score_category(model: TrainedModel, data: CategoryData, seed: int = 0, device=None,
                   progress: bool = False, known: tuple[RawMaps, RawMaps] | None = None,
                   same_pass: tuple[RawMaps, RawMaps] | None = None) -> tuple[RawMaps, RawMaps]:
    """Raw per-timestep maps of the test images and of the normal validation images.

    ``known``: this category's test and validation maps at the first of the preset's timesteps
    (a narrower scoring of the same model), which are copied instead of scored again (``score_raw``).
    ``same_pass``: for the authors' timestep mode, the same scoring in the consistent mode, whose
    first pass is this one's (``score_raw``).
    """
    extractor = build_feature_extractor(model.preset, device)
    category = data.category if model.num_classes else None
    known_test, known_val = known if known is not None else (None, None)
    same_test, same_val = same_pass if same_pass is not None else (None, None)
    raw_test = score_raw(model, data.test_images, category, seed=seed, device=device, extractor=extractor,
                         progress=progress, known=known_test, same_pass=same_test)
    raw_val = score_raw(model, data.val_images, category, seed=seed + 1, device=device, extractor=extractor,
                        known=known_val, same_pass=same_val)
    return raw_test, raw_val


def method_names() -> tuple[str, ...]:
    """Every method's name as a row of the tables: the diffusion model's maps, then each registered method."""
    return DIFFUSION_MAPS + method_registry.names()


def diffusion_rows(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset,
                   alpha: float | None = None, intervals: int = 0,
                   methods: tuple[str, ...] = DIFFUSION_MAPS) -> tuple[list[dict], dict, dict]:
    """Metrics of the ensemble, KL, RGB and feature maps with the preset's settings (alpha may be given);
    ``intervals`` bootstrap resamples add 95% intervals (:func:`metric_row`). ``methods``: the maps
    to measure (a sweep that reads only the ensemble measures only the ensemble); every final map
    is returned."""
    unknown = [m for m in methods if m not in DIFFUSION_MAPS]
    if unknown:
        raise ValueError(f"unknown diffusion map(s) {unknown}; choose from {DIFFUSION_MAPS}")
    maps, all_scores = final_maps(raw_test, raw_val, preset, alpha)
    rows, scores = [], {}
    for method in (m for m in DIFFUSION_MAPS if m in methods):
        scores[method] = all_scores[method]
        rows.append(metric_row(data.category, method, data.test_masks, maps[method], data.test_labels, scores[method],
                               preset.pro_implementation, intervals, preset.seed))
    return rows, maps, scores


def baseline_rows(data: CategoryData, preset: Preset, device=None,
                  methods: tuple[str, ...] | None = None, intervals: int = 0) -> tuple[list[dict], dict, dict]:
    """Every registered method (:mod:`diffad.methods`: SPADE, PaDiM, PatchCore and any added), or those
    of ``methods``, fitted on the category's normal training images and run on its test images, on the
    same backbone and images as the diffusion model."""
    specs = [method_registry.get(name) for name in (method_registry.names() if methods is None else methods)]
    rows, maps, scores = [], {}, {}
    extractor = build_feature_extractor(preset, device)
    with extractor.reusing_passes():  # the methods after the first read the backbone's maps
        for spec in specs:
            name, method = spec.name, spec.build(preset, extractor, device)
            method.fit(data.train_images)
            maps[name], scores[name] = method.predict(data.test_images)
            rows.append(metric_row(data.category, name, data.test_masks, maps[name], data.test_labels,
                                   scores[name], preset.pro_implementation, intervals, preset.seed))
    return rows, maps, scores


def evaluate_category(model: TrainedModel, data_root, category: str, baselines: bool = True, seed: int = 0,
                      device=None, progress: bool = False, intervals: int = BOOTSTRAP_RESAMPLES,
                      scorer=None) -> CategoryResult:
    """All methods' metrics on one category's test split, with ``intervals`` bootstrap resamples.

    ``scorer(model, data, seed)`` returns the raw test and validation maps instead of
    :func:`score_category` (the book passes its cache of scored maps, ``book.scorer``).
    """
    data = CategoryData.load(data_root, category, model.preset)
    if scorer is None:
        raw_test, raw_val = score_category(model, data, seed, device, progress)
    else:
        raw_test, raw_val = scorer(model, data, seed)
    rows, maps, scores = diffusion_rows(data, raw_test, raw_val, model.preset, intervals=intervals)
    if baselines:
        b_rows, b_maps, b_scores = baseline_rows(data, model.preset, device, intervals=intervals)
        rows, maps, scores = rows + b_rows, {**maps, **b_maps}, {**scores, **b_scores}
    return CategoryResult(rows, maps, scores, raw_test, raw_val, {"data": data})


def complete_baselines(folder: str | Path, category: str, rows: list[dict], data_root, preset: Preset,
                       device=None, intervals: int = BOOTSTRAP_RESAMPLES) -> list[dict]:
    """A finished category's recorded rows, with every baseline they lack run now and recorded.

    ``reproduce`` calls this when it resumes: a category finished before a baseline was added
    to diffad gets that baseline's row (appended to ``metrics.json``) and maps (added to
    ``maps.npz``) without the diffusion model being scored again.
    """
    folder = Path(folder)
    present = {r["method"] for r in rows}
    missing = tuple(m for m in method_registry.names() if m not in present)
    if not missing:
        return rows
    preset = preset.for_categories(category)
    data = CategoryData.load(data_root, category, preset)
    new_rows, maps, scores = baseline_rows(data, preset, device, missing, intervals=intervals)
    saved = folder / "maps.npz"
    if saved.is_file():
        with np.load(saved) as old:
            arrays = dict(old)
        arrays.update(_saved_arrays(maps, scores))
        tmp = folder / "maps.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(saved)
    rows = rows + new_rows
    tmp = folder / "metrics.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(folder / "metrics.json")
    return rows


def _saved_arrays(maps: dict, scores: dict) -> dict[str, np.ndarray]:
    """What maps.npz keeps of each method: its maps, and its image scores as ``<method>_scores``."""
    arrays = {k: v.numpy().astype(np.float32) for k, v in maps.items()}
    arrays.update({f"{k}_scores": np.asarray(v, dtype=np.float64) for k, v in scores.items()})
    return arrays


def write_results_csv(rows: list[dict], path: str | Path) -> Path:
    """One line per row: RESULT_COLUMNS, and the 95% intervals (INTERVAL_COLUMNS) when every row has them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = RESULT_COLUMNS + (INTERVAL_COLUMNS if rows and all(c in r for r in rows for c in INTERVAL_COLUMNS)
                                else ())
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in columns})
    return path


def read_results_csv(path: str | Path) -> list[dict]:
    numeric = RESULT_COLUMNS[2:] + INTERVAL_COLUMNS
    with open(path, newline="") as handle:
        return [{**r, **{k: float(r[k]) for k in numeric if k in r}} for r in csv.DictReader(handle)]


def read_paper_table1(path: str | Path = PAPER_TABLE1) -> dict[str, dict[str, float]]:
    """The paper's Table 1 (percent): category -> column -> value."""
    with open(path, newline="") as handle:
        return {r["category"]: {k: float(v) for k, v in r.items() if k != "category"} for r in csv.DictReader(handle)}


def read_quoted_averages(path: str | Path = QUOTED_AVERAGES) -> dict[str, dict]:
    """Published MVTec-AD averages (percent) of methods outside the paper's Table 1: method -> row.

    Each row has ``label``, ``image_auroc``, ``pixel_auroc``, ``pro``, ``source`` (where the
    numbers are published) and ``settings`` (how they were obtained). Averages only.
    """
    with open(path, newline="") as handle:
        return {r["method"]: {**r, **{k: float(r[k]) for k in RESULT_COLUMNS[2:]}} for r in csv.DictReader(handle)}


def table1_markdown(rows: list[dict], paper: dict | None = None, mvtec: bool = True,
                    quoted_averages: dict | None = None) -> str:
    """Our (pixel AUROC, PRO) per method beside the paper's Table 1, for MVTec categories.

    SPADE and PaDiM appear twice: as the paper quotes them and as run by us; CFlow, DRAEM and
    UniAD only as quoted. PatchCore, not in the paper, appears as run by us and with its
    published average (``resources/quoted_averages.csv``) in the average row only. With
    ``mvtec=False`` (the built-in data, whose ``capsule`` is not MVTec's) or for categories
    outside MVTec-AD, only our columns are filled.
    """
    paper = read_paper_table1() if paper is None else paper
    quoted_averages = read_quoted_averages() if quoted_averages is None else quoted_averages
    if not mvtec:
        paper = {}
    ours: dict[str, dict[str, dict]] = {}
    for r in rows:
        ours.setdefault(r["category"], {})[r["method"]] = r

    def pair(a, b):
        return f"({a:.1f}, {b:.1f})"

    quoted = [("SPADE†", "spade"), ("PaDiM†", "padim"), ("CFlow†", "cflow"), ("DRAEM†", "draem"),
              ("UniAD†", "uniad"), ("Paper Ours†", "ours")]
    averages_only = [(f"{q['label']}†", method, q) for method, q in quoted_averages.items()]
    run = [(method.label, method.name) for method in method_registry.registered()] + [("diffad", "ensemble")]
    any_mvtec = any(c in paper for c in ours)
    header = (["category"] + ([q for q, _ in quoted] + [q for q, _, _ in averages_only] if any_mvtec else [])
              + [r for r, _ in run])
    body = []
    categories = list(ours) + (["average"] if len(ours) > 1 else [])
    for category in categories:
        cells = [category]
        if any_mvtec:
            if category in paper and (category != "average" or all(c in paper for c in ours)):
                cells += [pair(paper[category][f"{k}_pixel_auroc"], paper[category][f"{k}_pro"]) for _, k in quoted]
            else:
                cells += ["–"] * len(quoted)
            quotable = category == "average" and all(c in paper for c in ours)
            cells += [pair(q["pixel_auroc"], q["pro"]) if quotable else "–" for _, _, q in averages_only]
        for _, method in run:
            if category == "average":
                vals = [ours[c][method] for c in ours if method in ours[c]]
                cells.append(pair(100 * np.mean([v["pixel_auroc"] for v in vals]), 100 * np.mean([v["pro"] for v in vals]))
                             if vals else "–")
            else:
                v = ours[category].get(method)
                cells.append(pair(100 * v["pixel_auroc"], 100 * v["pro"]) if v else "–")
        body.append(cells)
    quoted_note = "; † quoted from the paper's Table 1" + "".join(
        f"; {label} from {q['source']}, average only" for label, _, q in averages_only) + "."
    return markdown_table(header, body, ["(pixel AUROC, PRO) in percent, computed by diffad" + (
        quoted_note if any_mvtec else "; the paper's columns need MVTec-AD data.")])


def reproduce(data_root, out_dir, preset: str | Preset = "cpu", categories: list[str] | None = None,
              baselines: bool = True, figures: bool = True, device=None, progress: bool = True,
              model_loader=None, intervals: int = BOOTSTRAP_RESAMPLES, scorer=None, **overrides) -> list[dict]:
    """Train (or load) and evaluate every category under ``data_root``; write the results.

    Models train into ``<out>/<category>/model`` unless ``model_loader(category)`` supplies them
    (the book passes its cache of trained models), and ``scorer(model, data, seed)`` computes the
    raw maps instead of :func:`score_category` (the book passes its cache of scored maps, so maps
    another chapter scored are read, not scored again). A category already recorded is read back,
    and only the baselines it lacks are run (:func:`complete_baselines`).
    Writes ``<out>/results.csv`` (category, method, pixel_auroc, pro, image_auroc and their 95%
    bootstrap intervals ``pixel_auroc_lo``, ``pixel_auroc_hi``, ...), ``<out>/table1.md``,
    ``<out>/intervals.md`` (every method's metrics with their intervals),
    ``<out>/<category>/maps.npz`` (per-image maps of every method, its image scores as
    ``<method>_scores``, the labels and masks) and ``<out>/<category>/overlays.png``.

    Under torchrun with N processes the categories spread over them: rank r trains and scores
    categories r, r + N, ... on its own device (``cuda:LOCAL_RANK``), one model each, no DDP.
    When every rank is done, rank 0 reads every category's ``metrics.json`` and writes the
    tables, so ``out_dir`` must be one folder all ranks see (on several nodes, a shared file
    system). Rank 0 returns every row; the others their own categories' rows.

    ``intervals``: bootstrap resamples of the test images behind each interval (``0``: none, no
    ``intervals.md``; the resamples' exact PRO is most of the scoring time on a CPU). A category
    already recorded keeps the intervals it was recorded with.
    """
    if isinstance(intervals, bool) or not isinstance(intervals, int) or intervals < 0:
        raise ValueError(f"intervals must be a number of bootstrap resamples >= 0 (0: none); got {intervals!r}")
    preset = get_preset(preset, **overrides)
    data_root, out_dir = Path(data_root), Path(out_dir)
    present = list_categories(data_root)
    categories = present if categories is None else list(categories)
    missing = [c for c in categories if c not in present]
    if missing:
        raise ValueError(f"categories {missing} not found under {data_root}; present: {present}")
    spread = distributed.launched()
    group = distributed.process_group(device, backend="gloo") if spread else nullcontext(pick_device(device))
    with group as device:  # gloo: the ranks only meet once, at the end
        rank, world = distributed.rank(), distributed.world_size()
        mine = categories[rank::world] if spread else categories
        shown = progress and rank == 0
        all_rows = []
        desc = f"categories of rank 0 (of {world})" if spread else "categories"
        for category in tqdm(mine, desc=desc, disable=not shown):
            all_rows += _reproduce_category(data_root, out_dir, category, preset, baselines, figures, device, shown,
                                            model_loader, intervals, scorer)
            if progress and rank != 0:
                print(f"[rank {rank}] {category} done", flush=True)
        if spread:
            distributed.wait_for_all("the other ranks to finish their categories")
            if rank != 0:
                return all_rows
            all_rows = []
            for category in categories:
                done = out_dir / category / "metrics.json"
                if not done.is_file():
                    raise FileNotFoundError(
                        f"rank 0 finds no {done}, which another rank should have written: the --out folder "
                        f"must be one folder that every rank sees (on several nodes, a shared file system)")
                all_rows += json.loads(done.read_text())
    write_results_csv(all_rows, out_dir / "results.csv")
    mvtec = not any(is_builtin(data_root, c) for c in categories)
    (out_dir / "table1.md").write_text(table1_markdown(all_rows, mvtec=mvtec))
    if all(f"{RESULT_COLUMNS[2]}_lo" in row for row in all_rows):
        methods = tuple(dict.fromkeys(row["method"] for row in all_rows))
        (out_dir / "intervals.md").write_text(interval_markdown(all_rows, methods))
    return all_rows


def _reproduce_category(data_root: Path, out_dir: Path, category: str, preset: Preset, baselines: bool,
                        figures: bool, device, progress: bool, model_loader, intervals: int,
                        scorer=None) -> list[dict]:
    """One category of :func:`reproduce`: its recorded rows, or train, evaluate and record it."""
    folder = out_dir / category
    done = folder / "metrics.json"
    if done.is_file():
        recorded = json.loads(done.read_text())
        if baselines:
            recorded = complete_baselines(folder, category, recorded, data_root, preset, device, intervals)
        return recorded
    if model_loader is not None:  # scored with the settings asked for, not those it was trained under
        model = model_loader(category).scored_as(preset.for_categories(category))
    else:
        model = fit(data_root, category, folder / "model", preset, device=device, progress=progress, ddp=False)
    result = evaluate_category(model, data_root, category, baselines=baselines, seed=preset.seed,
                               device=device, progress=progress, intervals=intervals, scorer=scorer)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "maps.npz", **_saved_arrays(result.maps, result.scores),
                        labels=result.extra["data"].test_labels.numpy(),
                        masks=result.extra["data"].test_masks.numpy().astype(np.uint8))
    if figures:
        from diffad.overlays import overlay_figure

        fig = overlay_figure(result.extra["data"], result.maps, n=4)
        fig.savefig(folder / "overlays.png", dpi=100, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.rows, indent=1))
    tmp.replace(done)
    return result.rows


def select_timesteps(raw: RawMaps, timesteps: tuple[int, ...]) -> RawMaps:
    """The maps of a subset of the scored timesteps (no new UNet pass): :meth:`RawMaps.select`."""
    return raw.select(tuple(timesteps))


def settings_sweep(data: CategoryData, raw_test: RawMaps, raw_val: RawMaps, preset: Preset,
                   methods: tuple[str, ...] = ("ensemble", "kl", "rgb", "feature"), **grid) -> list[dict]:
    """Metrics for every combination of the settings in ``grid``, from one scoring run.

    ``grid`` maps a scoring field (``alpha``, ``normalization``, ``smoothing_sigma``,
    ``test_timesteps``) to the values to try; each row holds the settings and the metrics.
    """
    import itertools

    names = list(grid)
    for sigma in grid.get("smoothing_sigma", [preset.smoothing_sigma]):  # blurred once, then selected
        for raw in (raw_test, raw_val):
            for kind in MAP_TYPES:
                raw.smoothed(kind, sigma)
    rows = []
    for values in itertools.product(*(grid[n] for n in names)):
        settings = dict(zip(names, values))
        p = preset.replace(**settings)
        timesteps = tuple(p.test_timesteps)
        test, val = select_timesteps(raw_test, timesteps), select_timesteps(raw_val, timesteps)
        metric_rows, _, _ = diffusion_rows(data, test, val, p, methods=methods)
        rows += [{**settings, **r} for r in metric_rows]
    return rows


# --------------------------------------------------------------------------- result tables

METRIC_LABELS = {"pixel_auroc": "pixel AUROC", "pro": "PRO", "image_auroc": "image AUROC"}


def method_averages(rows: list[dict], metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> dict[str, dict[str, float]]:
    """Each method's metrics averaged over the categories it was run on: method -> metric -> mean."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["method"], []).append(row)
    return {method: {m: float(np.mean([r[m] for r in group])) for m in metrics} for method, group in grouped.items()}


def results_markdown(rows: list[dict], methods: tuple[str, ...] | None = None,
                     metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> str:
    """Every method's metrics per category and on average, as a markdown table (percent).

    One column per method; each cell is ``pixel AUROC / PRO / image AUROC`` (the ``metrics``
    asked for, in that order). Methods default to those present in ``rows``, in first-seen order.
    """
    if not rows:
        raise ValueError("no result rows to tabulate")
    unknown = [m for m in metrics if m not in METRIC_LABELS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_LABELS)}")
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        table.setdefault(row["category"], {})[row["method"]] = row
    present = list(dict.fromkeys(r["method"] for r in rows))
    methods = present if methods is None else list(methods)
    missing = [m for m in methods if m not in present]
    if missing:
        raise ValueError(f"method(s) {missing} not in the rows; present: {present}")

    def cell(values: dict | None) -> str:
        return " / ".join(f"{100 * values[m]:.1f}" for m in metrics) if values else "–"

    body = [[category] + [cell(by_method.get(m)) for m in methods] for category, by_method in table.items()]
    if len(table) > 1:
        averages = method_averages([r for r in rows if r["method"] in methods], metrics)
        body.append(["**average**"] + [cell(averages.get(m)) for m in methods])
    return markdown_table(["category"] + list(methods), body,
                          [f"{' / '.join(METRIC_LABELS[m] for m in metrics)} in percent, computed by diffad."])


def averages_markdown(sets: dict[str, list[dict]], methods: tuple[str, ...],
                      metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> str:
    """Each method's metrics averaged over categories, one column per set of results (the same
    models on two test sets, say): cells ``pixel AUROC / PRO / image AUROC`` in percent."""
    averages = {name: method_averages(rows, metrics) for name, rows in sets.items()}
    missing = [(name, m) for name, by_method in averages.items() for m in methods if m not in by_method]
    if missing:
        raise ValueError(f"methods missing from a set of results: {missing}")
    body = [[method] + [" / ".join(f"{100 * averages[name][method][m]:.1f}" for m in metrics) for name in sets]
            for method in methods]
    return markdown_table(["method"] + list(sets), body,
                          [f"{' / '.join(METRIC_LABELS[m] for m in metrics)} in percent, mean over categories."])


def interval_markdown(rows: list[dict], methods: tuple[str, ...],
                      metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> str:
    """Per category, each method's metrics with their 95% bootstrap intervals (percent):
    ``98.2 [97.5, 98.9]``. Rows must carry INTERVAL_COLUMNS (``reproduce`` records them)."""
    lacking = [r["method"] for r in rows if r["method"] in methods and f"{metrics[0]}_lo" not in r]
    if lacking:
        raise ValueError(f"rows of {sorted(set(lacking))} have no intervals; evaluate with intervals > 0")
    by_category: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["method"] in methods:
            by_category.setdefault(row["category"], {})[row["method"]] = row
    body = []
    for category, by_method in by_category.items():
        for metric in metrics:
            body.append([category, METRIC_LABELS[metric]] + [
                f"{100 * r[metric]:.1f} [{100 * r[metric + '_lo']:.1f}, {100 * r[metric + '_hi']:.1f}]"
                if (r := by_method.get(m)) else "–" for m in methods])
    return markdown_table(["category", "metric"] + list(methods), body,
                          ["In percent, with 95% bootstrap intervals over the test images (resampled by image, "
                           f"{BOOTSTRAP_RESAMPLES} seeded resamples)."])


def compare_saved(folder: str | Path, first: str, second: str, n_resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`difference_interval` of two methods from the maps and scores ``reproduce`` saved in a
    category's folder (``maps.npz``): first - second per metric, with a paired interval."""
    with np.load(Path(folder) / "maps.npz") as saved:
        missing = [k for m in (first, second) for k in (m, f"{m}_scores") if k not in saved.files]
        if missing:
            raise ValueError(f"{folder}/maps.npz lacks {missing}; rerun reproduce with this diffad")
        return difference_interval(saved["masks"], saved["labels"], (saved[first], saved[f"{first}_scores"]),
                                   (saved[second], saved[f"{second}_scores"]), n_resamples, seed)


def _by_category_and_method(rows: list[dict], methods: tuple[str, ...]) -> dict[tuple[str, str], list[dict]]:
    """The rows of ``methods`` grouped by (category, method), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["method"] in methods:
            groups.setdefault((row["category"], row["method"]), []).append(row)
    return groups


def spread_markdown(rows: list[dict], by: str = "seed", methods: tuple[str, ...] = ("ensemble",),
                    metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> str:
    """Per category and method, each metric's mean and range over the values of ``by`` (training
    seeds, say), with the mean width of the rows' 95% bootstrap intervals beside it when present."""
    body = []
    for (category, method), group in _by_category_and_method(rows, methods).items():
        values = sorted({r[by] for r in group})
        cells = []
        for metric in metrics:
            v = np.array([r[metric] for r in group]) * 100
            cell = f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"
            if all(f"{metric}_lo" in r for r in group):
                width = np.mean([r[f"{metric}_hi"] - r[f"{metric}_lo"] for r in group]) * 100
                cell += f", interval {width:.1f}"
            cells.append(cell)
        body.append([category, method, ", ".join(str(v) for v in values)] + cells)
    return markdown_table(["category", "method", by] + [METRIC_LABELS[m] for m in metrics], body,
                          [f"Mean (lowest-highest) over the {by}s, in percent; 'interval': the mean width of "
                           "the 95% bootstrap interval over test images."])


def spread_against_intervals(rows: list[dict], by: str = "seed", methods: tuple[str, ...] = ("ensemble",),
                             metrics: tuple[str, ...] = RESULT_COLUMNS[2:]) -> dict[str, dict]:
    """Whether retraining moves a number more than the test images do: per metric, the category and
    method whose range over ``by`` is widest relative to its rows' mean 95% bootstrap interval,
    as {"category", "method", "range", "interval"} in points."""
    groups = _by_category_and_method(rows, methods)
    out = {}
    for metric in metrics:
        found = []
        for (category, method), group in groups.items():
            spread = 100 * (max(r[metric] for r in group) - min(r[metric] for r in group))
            width = 100 * float(np.mean([r[f"{metric}_hi"] - r[f"{metric}_lo"] for r in group]))
            ratio = spread / width if width > 0 else (np.inf if spread > 0 else 0.0)
            found.append((ratio, {"category": category, "method": method, "range": spread, "interval": width}))
        out[metric] = max(found, key=lambda item: item[0])[1]
    return out


def paper_table1_markdown(paper: dict | None = None) -> str:
    """The paper's Table 1 as it is published: (pixel AUROC, PRO) per method and category, quoted."""
    paper = read_paper_table1() if paper is None else paper
    columns = [("SPADE", "spade"), ("PaDiM", "padim"), ("CFlow", "cflow"), ("DRAEM", "draem"),
               ("UniAD", "uniad"), ("Ours", "ours"), ("Ours*", "ours_star")]
    body = [[f"**{category}**" if category == "average" else category]
            + [f"({values[f'{k}_pixel_auroc']:.1f}, {values[f'{k}_pro']:.1f})" for _, k in columns]
            for category, values in paper.items()]
    return markdown_table(["category"] + [name for name, _ in columns], body, [
        "(pixel AUROC, PRO) in percent, quoted from Lu et al. (ICCV 2023), Table 1; "
        "Ours* uses per-category settings the paper does not publish."])


def quoted_averages_markdown(paper: dict | None = None, quoted_averages: dict | None = None) -> str:
    """Published MVTec-AD averages side by side: the paper's Table 1 methods and those quoted apart (PatchCore).

    Every number is quoted (†), none computed here. The paper's Table 1 gives no image AUROC.
    """
    paper = read_paper_table1() if paper is None else paper
    quoted_averages = read_quoted_averages() if quoted_averages is None else quoted_averages
    average = paper["average"]
    columns = [("SPADE", "spade"), ("PaDiM", "padim"), ("CFlow", "cflow"), ("DRAEM", "draem"),
               ("UniAD", "uniad"), ("Ours (Lu et al.)", "ours")]
    body = [[f"{name}†", f"({average[f'{k}_pixel_auroc']:.1f}, {average[f'{k}_pro']:.1f})", "–",
             "Lu et al. (ICCV 2023), Table 1"] for name, k in columns]
    body += [[f"{q['label']}†", f"({q['pixel_auroc']:.1f}, {q['pro']:.1f})", f"{q['image_auroc']:.1f}", q["source"]]
             for q in quoted_averages.values()]
    notes = ["MVTec-AD averages over the 15 categories in percent, all quoted (†), none computed by diffad.", ""]
    notes += [f"{q['label']}: {q['settings']}." for q in quoted_averages.values()]
    return markdown_table(["method", "(pixel AUROC, PRO)", "image AUROC", "quoted from"], body, notes)


def paper_pattern(rows: list[dict], method: str = "ensemble", rival: str = "padim",
                  paper: dict | None = None, paper_method: str = "ours") -> list[dict]:
    """Does our data show the paper's pattern between two methods? One dict per metric.

    Compares the averages of ``method`` and ``rival`` in ``rows`` with the paper's Table 1
    averages of ``paper_method`` and ``rival`` (pixel AUROC and PRO, in percent): who is ahead
    in the paper, who is ahead here, and whether the two agree.
    """
    paper = read_paper_table1() if paper is None else paper
    ours = method_averages(rows, ("pixel_auroc", "pro"))
    for name in (method, rival):
        if name not in ours:
            raise ValueError(f"method {name!r} not in the rows; present: {sorted(ours)}")
    result = []
    for metric in ("pixel_auroc", "pro"):
        p_method, p_rival = paper["average"][f"{paper_method}_{metric}"], paper["average"][f"{rival}_{metric}"]
        o_method, o_rival = 100 * ours[method][metric], 100 * ours[rival][metric]
        paper_leader = method if p_method > p_rival else rival
        our_leader = method if o_method > o_rival else rival
        result.append({"metric": metric, "paper": {method: p_method, rival: p_rival}, "paper_leader": paper_leader,
                       "ours": {method: o_method, rival: o_rival}, "our_leader": our_leader,
                       "agrees": paper_leader == our_leader})
    return result
