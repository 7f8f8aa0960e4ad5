"""Measurements behind the book's figures, computed rather than asserted.

* :func:`defect_contrast` -- how visible a defect is: the contrast-to-noise ratio of the
  defect region against a ring of its surroundings.
* :func:`noise_sweep` -- the paper's Fig. 2 as numbers: one defective image noised to
  increasing t; how visible the defect stays in x_t, and whether the model's one-step
  estimate of the clean image x0_hat (and the KL map) singles the defect out.
* :func:`timestep_profile` -- what a trained model does at each t: its hybrid-loss terms
  and the variance it learned, between beta_t and the posterior variance beta~_t.
* :func:`feature_prediction` -- what the feature head predicts from x_t against the backbone's
  features of the clean image, and their error (the feature-level score before upsampling).
* :func:`inside_outside` -- the mean of maps inside and outside the defect masks (how much a
  reconstruction changed the defect against the normal parts).
* :func:`defect_type_metrics` -- pixel AUROC (or PRO) of several maps per defect type.
* :func:`largest_defect` -- the test image of a defect type with the largest defect (for figures).
* :func:`mask_fragments` -- how many regions a defect becomes when its mask is downsampled, by
  nearest neighbour and by area (what PRO counts at the evaluation resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffad.checks import check_images
from diffad.data import from_diffusion_range, to_diffusion_range
from diffad.metrics import pixel_auroc, pro
from diffad.scoring import OnePass
from diffad.tables import records_markdown
from diffad.models.denoiser import TrainedModel, build_diffusion, build_feature_extractor

DEFECT_METRICS = {"pixel_auroc": pixel_auroc, "pro": pro}


def _as_masks(masks, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) masks as a bool tensor of shape (N, H, W) matching ``shape``."""
    masks = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if tuple(masks.shape) != tuple(shape):
        raise ValueError(f"masks have shape {tuple(masks.shape)}, expected {tuple(shape)} (N, H, W)")
    return masks > 0.5


def ring_masks(masks, width: int) -> torch.Tensor:
    """The surroundings of each defect: pixels within ``width`` pixels of it, outside it. (N, H, W) bool."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    inside = masks > 0.5
    dilated = F.max_pool2d(inside[:, None].float(), 2 * width + 1, stride=1, padding=width)[:, 0] > 0.5
    return dilated & ~inside


def defect_contrast(images, masks, ring_width: int | None = None) -> torch.Tensor:
    """Contrast-to-noise ratio (N,) of each image's defect against a ring of its surroundings.

    ``|| mean_defect - mean_ring ||`` over the colour channels, divided by the ring's standard
    deviation (root of the channel-mean variance). A defect that stands out of its neighbourhood
    scores high; one buried in texture or noise scores near 0. ``ring_width`` defaults to 5 % of
    the image side (at least 2 px). Images without a defect (or without a ring) give NaN.
    """
    images = check_images(images, value_range=None)
    n, _, h, w = images.shape
    inside = _as_masks(masks, (n, h, w))
    ring = ring_masks(inside, ring_width or max(2, round(0.05 * min(h, w))))
    out = torch.full((n,), float("nan"))
    for i in range(n):
        if inside[i].sum() == 0 or ring[i].sum() < 2:
            continue
        defect = images[i][:, inside[i]]  # (3, P)
        around = images[i][:, ring[i]]
        spread = around.var(dim=1).mean().clamp_min(1e-12).sqrt()
        out[i] = (defect.mean(dim=1) - around.mean(dim=1)).norm() / spread
    return out


def inside_outside(maps, masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each map (N, H, W) inside its defect mask and outside it: two (N,) tensors (NaN if empty)."""
    maps = torch.as_tensor(maps).float()
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    inside = _as_masks(masks, maps.shape)
    nan = torch.tensor(float("nan"))
    mean_in = torch.stack([maps[i][inside[i]].mean() if inside[i].any() else nan for i in range(len(maps))])
    mean_out = torch.stack([maps[i][~inside[i]].mean() if (~inside[i]).any() else nan for i in range(len(maps))])
    return mean_in, mean_out


def _check_timesteps(timesteps, num_timesteps: int, low: int = 0) -> tuple[int, ...]:
    timesteps = tuple(int(t) for t in timesteps)
    if not timesteps or any(not low <= t < num_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be a non-empty list of ints in [{low}, {num_timesteps}), got {list(timesteps)}")
    return timesteps


@dataclass
class NoiseSweep:
    """One defective image seen at increasing noise levels (the paper's Fig. 2, measured).

    Images (K, 3, H, W) in [0, 1] are those of the first noise draw; the curves (K,) average
    over all draws. ``contrast``: the defect's contrast-to-noise ratio in x_t
    (:func:`defect_contrast`; ``clean_contrast`` is that of x0). ``error_inside`` /
    ``error_outside``: mean |x0_hat - x0| (on the [0, 1] scale) inside the defect and outside it:
    the first grows as the model replaces the defect, the second as it loses normal detail.
    ``error_ratio``: their ratio per draw; ``kl_ratio``: the same ratio for the KL map. A ratio
    well above 1 means the model's estimate singles the defect out.
    """

    timesteps: tuple[int, ...]
    noisy: torch.Tensor
    predicted: torch.Tensor
    kl: torch.Tensor  # (K, H, W), bits per element, channel mean
    contrast: torch.Tensor
    clean_contrast: float
    error_inside: torch.Tensor
    error_outside: torch.Tensor
    error_ratio: torch.Tensor
    kl_ratio: torch.Tensor


@torch.no_grad()
def noise_sweep(model: TrainedModel, image: torch.Tensor, mask, t_originals, category: str | None = None,
                seed: int = 0, draws: int = 4) -> NoiseSweep:
    """Noise ``image`` (3, H, W) in [0, 1] to each step of ``t_originals`` (of the model's T steps) and measure.

    The same unit noise is scaled to every t within a draw, so the images differ only in the
    noise level. One UNet pass per (t, draw) gives x0_hat and the KL map, as in scoring.
    """
    size = model.preset.image_size
    if torch.is_tensor(image) and image.ndim != 3:
        raise ValueError(f"image must be one (3, H, W) tensor in [0, 1], got shape {tuple(image.shape)}")
    image = check_images(image[None] if torch.is_tensor(image) else image, "image", image_size=size)[0]
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    mask = _as_masks(torch.as_tensor(mask).reshape(1, size, size), (1, size, size))[0]
    if not mask.any():
        raise ValueError("mask is empty: noise_sweep needs a defective image and its defect mask")
    diffusion = build_diffusion(model.preset)
    timesteps = _check_timesteps(t_originals, diffusion.num_timesteps, low=1)  # t = 0 has no KL term
    unet = model.unet.eval()
    device = next(unet.parameters()).device
    x0 = to_diffusion_range(image.float()).to(device)[None]
    noise = torch.randn((draws, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed)).to(device)
    noisy, predicted, kls, contrast, error_ratio, kl_ratio, inside, outside = [], [], [], [], [], [], [], []
    masks = mask[None].expand(draws, -1, -1)
    for t_value in timesteps:
        batch = x0.expand(draws, -1, -1, -1)
        one = OnePass(model, diffusion, batch, t_value, noise, category, features=False)
        x_t = one.x_t
        kl = one.kl().mean(dim=1).cpu()
        x0_hat = one.pred_x0()
        error = (x0_hat - batch).abs().mean(dim=1).cpu() / 2  # on the [0, 1] image scale
        noisy.append(from_diffusion_range(x_t[0], clamp=True).cpu())
        predicted.append(from_diffusion_range(x0_hat[0], clamp=True).cpu())
        kls.append(kl[0])
        contrast.append(defect_contrast(x_t.cpu(), masks.cpu()).mean())
        e_in, e_out = inside_outside(error, masks.cpu())
        k_in, k_out = inside_outside(kl, masks.cpu())
        inside.append(e_in.mean())
        outside.append(e_out.mean())
        error_ratio.append((e_in / e_out.clamp_min(1e-12)).mean())
        kl_ratio.append((k_in / k_out.clamp_min(1e-12)).mean())
    clean = float(defect_contrast(x0.cpu(), mask[None].cpu())[0])
    return NoiseSweep(timesteps, torch.stack(noisy), torch.stack(predicted), torch.stack(kls), torch.stack(contrast),
                      clean, torch.stack(inside), torch.stack(outside), torch.stack(error_ratio), torch.stack(kl_ratio))


@dataclass
class TimestepProfile:
    """A trained model's behaviour at each of ``timesteps`` (each array (K,)).

    ``mse``: the epsilon-prediction error (the simple loss); ``vb``: the variational-bound term
    in bits per dimension (what trains the variance). ``variance_fraction``: the mean of
    (v + 1) / 2, where the learned log variance is fraction * log beta_t + (1 - fraction) *
    log beta~_t (0: the posterior variance beta~_t, 1: beta_t); ``fraction_std`` its spread over
    pixels and images. ``beta``, ``posterior_variance``: the schedule's two bounds;
    ``model_variance``: exp of the mean predicted log variance.
    """

    timesteps: tuple[int, ...]
    mse: np.ndarray
    vb: np.ndarray
    variance_fraction: np.ndarray
    fraction_std: np.ndarray
    beta: np.ndarray
    posterior_variance: np.ndarray
    model_variance: np.ndarray


@torch.no_grad()
def timestep_profile(model: TrainedModel, images: torch.Tensor, t_originals, category: str | None = None,
                     seed: int = 0) -> TimestepProfile:
    """Loss terms and learned variance of ``model`` on ``images`` (N, 3, H, W) in [0, 1] at each step of
    ``t_originals`` (the model's T training steps)."""
    images = check_images(images, image_size=model.preset.image_size)
    diffusion = build_diffusion(model.preset)
    timesteps = _check_timesteps(t_originals, diffusion.num_timesteps)
    unet = model.unet.eval()
    device = next(unet.parameters()).device
    x0 = to_diffusion_range(images.float()).to(device)
    n = len(x0)
    generator = torch.Generator().manual_seed(seed)
    columns = {k: [] for k in ("mse", "vb", "fraction", "fraction_std", "log_variance")}
    for t_value in timesteps:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        one = OnePass(model, diffusion, x0, t_value, noise, category, features=False)
        losses = one.losses()
        fraction = (one.output[:, x0.shape[1]:] + 1) / 2  # v in [-1, 1] -> [0, 1], as the diffusion reads it
        log_variance = one.mean_variance()["log_variance"]
        columns["mse"].append(losses["mse"].mean().item())
        columns["vb"].append(losses["vb"].mean().item())
        columns["fraction"].append(fraction.mean().item())
        columns["fraction_std"].append(fraction.std().item())
        columns["log_variance"].append(log_variance.mean().item())
    index = np.asarray(timesteps)
    return TimestepProfile(
        timesteps, np.array(columns["mse"]), np.array(columns["vb"]), np.array(columns["fraction"]),
        np.array(columns["fraction_std"]), diffusion.betas[index], diffusion.posterior_variance[index],
        np.exp(np.array(columns["log_variance"])))


@torch.no_grad()
def feature_prediction(model: TrainedModel, images: torch.Tensor, t_index: int, category: str | None = None,
                       seed: int = 0, extractor=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature head's prediction from x_t against the backbone's features of the clean image.

    ``images`` (N, 3, H, W) in [0, 1] are noised once to step ``t_index`` of the scoring schedule (the
    preset's ``timestep_respacing``, as in :func:`diffad.scoring.score_raw`). Returns the target
    features (N, C, h, w) (standardised as the head was trained), the prediction (N, C, h, w) and
    the channel-mean squared error (N, h, w), all on the CPU. ``extractor`` defaults to the
    preset's backbone (:func:`diffad.models.build_feature_extractor`).
    """
    images = check_images(images, image_size=model.preset.image_size)
    diffusion = build_diffusion(model.preset, model.preset.timestep_respacing)
    (t,) = _check_timesteps((t_index,), diffusion.num_timesteps)
    unet = model.unet.eval()
    device = next(unet.parameters()).device
    extractor = extractor if extractor is not None else build_feature_extractor(model.preset, device)
    x0 = to_diffusion_range(images).to(device)
    target = model.feature_target(extractor(x0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    predicted = OnePass(model, diffusion, x0, t, noise, category).features
    if predicted.shape != target.shape:
        raise ValueError(f"the feature head predicts {tuple(predicted.shape)} but the extractor gives "
                         f"{tuple(target.shape)}: use the model's own backbone")
    return target.cpu(), predicted.cpu(), (predicted - target).pow(2).mean(dim=1).cpu()


def largest_defect(data, kind: str) -> int:
    """Index of the test image of defect type ``kind`` whose mask is largest (the clearest example).

    ``data`` has ``defect_types`` (one name per test image) and ``test_masks`` (N, H, W).
    """
    indices = [i for i, name in enumerate(data.defect_types) if name == kind]
    if not indices or kind == "good":
        known = sorted(set(data.defect_types) - {"good"})
        raise ValueError(f"no test image of defect type {kind!r}; the defect types are {known}")
    return max(indices, key=lambda i: float(data.test_masks[i].sum()))


def defect_type_metrics(data, maps: dict, metric: str = "pixel_auroc") -> list[dict]:
    """``metric`` of each map per defect type: one row per type, one column per map.

    Each row scores the test images of that defect type together with all good test images
    (their normal pixels count as negatives), as MVTec-style per-type breakdowns do. ``data``
    has ``test_masks`` (N, H, W), ``defect_types`` (N names, ``"good"`` for normal images);
    ``maps`` maps a name to (N, H, W) maps. Rows hold ``defect_type``, ``images`` and a value per map.
    """
    if metric not in DEFECT_METRICS:
        raise ValueError(f"metric must be one of {sorted(DEFECT_METRICS)}, got {metric!r}")
    types = np.asarray(data.defect_types)
    masks = torch.as_tensor(data.test_masks)
    for name, values in maps.items():
        if tuple(values.shape) != tuple(masks.shape):
            raise ValueError(f"map {name!r} has shape {tuple(values.shape)}, masks {tuple(masks.shape)}")
    good = types == "good"
    rows = []
    for defect in [t for t in dict.fromkeys(types) if t != "good"]:
        chosen = torch.as_tensor(np.nonzero((types == defect) | good)[0])
        row = {"defect_type": str(defect), "images": int((types == defect).sum())}
        for name, values in maps.items():
            row[name] = DEFECT_METRICS[metric](masks[chosen], torch.as_tensor(values)[chosen])
        rows.append(row)
    return rows


markdown_table = records_markdown  # the chapters' name for it


MASK_DOWNSAMPLING = ("full size", "nearest", "area (diffad)")


def masks_by_rule(data_root, category: str, size: int) -> dict[str, list[np.ndarray]]:
    """Every test mask of ``category`` (good images: all zero), in test-split order, at its file's
    size and at ``size`` by nearest neighbour and by area (:func:`diffad.data.mvtec.downsample_mask`,
    diffad's rule): rule (``MASK_DOWNSAMPLING``) -> list of boolean masks."""
    from PIL import Image

    from diffad.data import MVTecAD
    from diffad.data.mvtec import downsample_mask

    full = MVTecAD(data_root, category, split="test", image_size=None)
    out: dict[str, list[np.ndarray]] = {rule: [] for rule in MASK_DOWNSAMPLING}
    for sample in full.samples:
        if sample.mask_path is None:
            width, height = Image.open(sample.path).size
            mask = np.zeros((height, width), dtype=bool)
        else:
            mask = np.asarray(Image.open(sample.mask_path).convert("L")) > 0
        nearest = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        out["full size"].append(mask)
        out["nearest"].append(np.asarray(nearest) > 0)
        out["area (diffad)"].append(downsample_mask(mask, (size, size)) > 0)
    return out


def mask_rule_effect(data_root, out_dir, categories, methods) -> list[dict]:
    """What the mask rule does to a whole table: each method's pixel AUROC and PRO, averaged over
    ``categories``, against masks brought to the maps' size by nearest neighbour and by area
    (diffad's rule), read from the maps ``reproduce`` saved in ``<out_dir>/<category>/maps.npz``.
    One row per method; the PRO change is area - nearest, in points."""
    from pathlib import Path

    per_method: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for category in categories:
        saved = np.load(Path(out_dir) / category / "maps.npz")
        size = saved["masks"].shape[-1]
        rules = {rule: np.stack(masks) for rule, masks in masks_by_rule(data_root, category, size).items()}
        if not np.array_equal(rules["area (diffad)"], saved["masks"].astype(bool)):
            raise ValueError(f"the masks saved for {category} in {out_dir} are not the area-rule masks of "
                             f"{data_root}: the maps come from other data; rerun reproduce")
        for method in methods:
            if method not in saved:
                raise ValueError(f"{method!r} is not among the maps saved for {category}: {sorted(saved.files)}")
            values = per_method[method]
            for rule, key in (("nearest", "nearest"), ("area (diffad)", "area")):
                values.setdefault(f"pixel AUROC, {key}", []).append(pixel_auroc(rules[rule], saved[method]))
                values.setdefault(f"PRO, {key}", []).append(pro(rules[rule], saved[method]))
    rows = []
    for method, values in per_method.items():
        row = {"method": method, **{k: 100 * float(np.mean(v)) for k, v in values.items()}}
        row["PRO change"] = row["PRO, area"] - row["PRO, nearest"]
        rows.append(row)
    return rows


def mask_fragments(data_root, category: str, size: int) -> list[dict]:
    """How many 8-connected regions each defect becomes when its mask is brought to ``size``.

    For every defective test image of ``category``: the regions at the file's size, after
    nearest-neighbour resizing (which keeps one source pixel per block, so a thin crack falls
    apart) and after area downsampling (diffad's rule). One row per defect type: the mean number
    of regions per image under each rule. PRO weighs every region alike, so fragments count as
    extra defects.
    """
    from diffad.data import MVTecAD
    from diffad.metrics import label_regions

    kinds = [s.defect_type for s in MVTecAD(data_root, category, split="test", image_size=None).samples]
    masks = masks_by_rule(data_root, category, size)
    counts: dict[str, list[list[int]]] = {}
    for i, kind in enumerate(kinds):
        if kind != "good":
            counts.setdefault(kind, []).append([label_regions(masks[rule][i])[1] for rule in MASK_DOWNSAMPLING])
    return [{"defect_type": kind, "images": len(values),
             **{rule: float(np.mean([v[j] for v in values])) for j, rule in enumerate(MASK_DOWNSAMPLING)}}
            for kind, values in counts.items()]


def head_against_template(model: TrainedModel, train_images: torch.Tensor, groups: dict[str, torch.Tensor],
                          t_index: int, category: str | None = None, seed: int = 0, extractor=None) -> list[dict]:
    """What the feature head knows beyond an average normal image, per group of images.

    The *template* is the mean target of ``train_images`` at each grid position: a head that
    learned nothing but it would score every image by its distance to an average normal image.
    For each named group of images, the mean squared error (standardised features, as the head
    is trained) of the head's prediction from x_t (:func:`feature_prediction`) and of the template,
    and ``head / template``: below 1 where the head predicts better than the template.
    """
    extractor = extractor if extractor is not None else build_feature_extractor(
        model.preset, next(model.unet.parameters()).device)
    target, _, _ = feature_prediction(model, train_images, t_index, category, seed, extractor)
    template = target.mean(dim=0, keepdim=True)
    rows = []
    for name, images in groups.items():
        target, predicted, _ = feature_prediction(model, images, t_index, category, seed, extractor)
        head = float((predicted - target).pow(2).mean())
        average = float((template - target).pow(2).mean())
        rows.append({"images": name, "count": len(images), "head": head, "template": average,
                     "head / template": head / average})
    return rows


def timestep_correlation(raw, kind: str) -> np.ndarray:
    """Pearson correlation of one map type's raw maps between every pair of scored timesteps
    (all images and pixels pooled): near 1 where the map does not change with the noise level."""
    maps = raw.get(kind)
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1).double()
    return torch.corrcoef(flat).numpy()
