"""Test-time scores: the KL map, the RGB map, the feature map, their ensemble, image scores.

For each test timestep t the clean image x0 is noised once to x_t and the UNet runs **once**.
That one pass gives

* the **KL map**: per element, D_KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) ) in bits,
  with the predicted x0 clipped to [-1, 1], averaged over the colour channels. Where the noise
  "hid" an anomaly, the model's reverse step disagrees with the true posterior;
* the **RGB map** |x0_hat - x0| (the paper's ablation: worse than KL);
* the **feature map**: channel-mean squared error between the feature head's prediction from
  x_t and the backbone's features of x0, upsampled to the image size.

``score_raw`` keeps every map per timestep, so that normalisation, smoothing and the ensemble
weight alpha can be changed afterwards without running the UNet again (``anomaly_maps``).

Timesteps index the scoring schedule (the paper: a 250-step respacing of T = 1000, so
{5, 50, 100} are original steps {20, 201, 401}). ``timestep_mode="consistent"`` (default)
gives both branches the same, mapped timestep in one pass; ``"authors"`` reproduces the
official code, which embeds the raw 5/50/100 for the feature branch while x_t carries the
respaced noise, and so spends a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffad.data import to_diffusion_range
from diffad.presets import KL_STANDARDIZATIONS, NORMALIZATIONS, TIMESTEP_MODES, Preset
from diffad.smoothing import gaussian_kernel1d, smooth  # noqa: F401  (smooth is part of this API)
from diffad.checks import check_images
from diffad.device import pick_device
from diffad.models.denoiser import TrainedModel, build_diffusion, build_feature_extractor

MAP_TYPES = ("kl", "rgb", "feature")


@dataclass
class RawMaps:
    """Per-timestep maps of N images: each tensor is (N, K, H, W) for K timesteps, on the CPU."""

    timesteps: tuple[int, ...]
    kl: torch.Tensor
    rgb: torch.Tensor
    feature: torch.Tensor

    def __len__(self) -> int:
        return self.kl.shape[0]

    def get(self, kind: str) -> torch.Tensor:
        if kind not in MAP_TYPES:
            raise ValueError(f"unknown map type {kind!r}; choose from {MAP_TYPES}")
        return getattr(self, kind)

    def smoothed(self, kind: str, sigma: float) -> torch.Tensor:
        """``smooth(self.get(kind), sigma)``, blurred once per map type and sigma and kept: a sweep
        over alpha, the normalisation or subsets of the timesteps (:meth:`select`) reads the same
        blurred maps instead of blurring them again. The maps are never changed in place."""
        memo = self.__dict__.setdefault("_smoothed", {})
        key = (kind, float(sigma))
        if key not in memo:
            memo[key] = smooth(self.get(kind), sigma)
        return memo[key]

    def select(self, timesteps: tuple[int, ...]) -> "RawMaps":
        """The maps of a subset of the scored timesteps, with the blurred maps already made (each
        map is blurred on its own, so selecting first or blurring first gives the same maps)."""
        missing = [t for t in timesteps if t not in self.timesteps]
        if missing:
            raise ValueError(f"timesteps {missing} were not scored; scored: {list(self.timesteps)}")
        index = [self.timesteps.index(t) for t in timesteps]
        out = RawMaps(tuple(timesteps), self.kl[:, index], self.rgb[:, index], self.feature[:, index])
        out._smoothed = {key: maps[:, index] for key, maps in self.__dict__.get("_smoothed", {}).items()}
        return out

    def __getstate__(self) -> dict:
        """Pickled (the book's cache) without the blurred maps: they are remade on demand."""
        return {k: v for k, v in self.__dict__.items() if k != "_smoothed"}


def _noise_for(index: int, seed: int, shape, k: int) -> torch.Tensor:
    """The noise for image ``index`` at its k-th timestep: fixed by (seed, index), not by batching."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn((k,) + tuple(shape), generator=generator)


class OnePass:
    """What one UNet pass gives at one step: x_t, the diffusion output and the head's features.

    The step every score and probe of the book is built on: noise the clean x0 (N, 3, H, W) in
    [-1, 1] to step ``t_index`` of ``diffusion``'s schedule (respaced or not), run the UNet once
    with the matching original timestep, and read from that one output the KL map, the
    predicted clean image, the learned variance and the training losses.
    """

    def __init__(self, model: TrainedModel, diffusion, x0: torch.Tensor, t_index: int, noise: torch.Tensor,
                 category: str | None = None, features: bool = True, feature_grid: int | None = None):
        b = x0.shape[0]
        self.diffusion, self.x0, self.noise = diffusion, x0, noise
        self.t = torch.full((b,), t_index, device=x0.device, dtype=torch.long)
        self.x_t = diffusion.q_sample(x0, self.t, noise=noise)
        self.label = model.unet_kwargs(category, b, x0.device)
        extra = {"feature_grid": feature_grid} if features and feature_grid else {}
        out = model.unet(self.x_t, diffusion.model_timesteps(self.t), return_features=features, **extra, **self.label)
        output, feats = out if features else (out, None)
        self.output = output.float()
        self.features = feats.float() if feats is not None else None

    def kl(self) -> torch.Tensor:
        """Per-element KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) ) in bits, x0_hat clipped: (N, 3, H, W)."""
        return self.diffusion.kl_map(self.output, self.x0, self.x_t, self.t, clip_denoised=True)

    def mean_variance(self, clip: bool = True) -> dict:
        return self.diffusion.p_mean_variance_from_output(self.output, self.x_t, self.t, clip_denoised=clip)

    def pred_x0(self) -> torch.Tensor:
        """The model's one-step estimate of the clean image, clipped to [-1, 1]: (N, 3, H, W)."""
        return self.mean_variance()["pred_xstart"]

    def losses(self) -> dict:
        """The hybrid training loss terms of this pass (``mse``, ``vb``, ``loss``), per image."""
        return self.diffusion.training_losses_from_output(self.output, self.x0, self.x_t, self.t, self.noise)

    def feature_error(self, target: torch.Tensor) -> torch.Tensor:
        """Channel-mean squared error of the head's prediction against ``target``: (N, 1, h, w)."""
        return feature_error(self.features, target)


def feature_error(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Channel-mean squared error of the feature head's prediction against the backbone's: (N, 1, h, w)."""
    return (features - target).pow(2).mean(dim=1, keepdim=True)


# The preset fields score_raw reads that shape the raw per-timestep maps (with image_size); the
# others (alpha, normalisation, smoothing, top-k) are applied afterwards by anomaly_maps, and the
# batch size does not change the maps (each image has its own noise).
RAW_MAP_FIELDS = ("timestep_respacing", "test_timesteps", "timestep_mode", "test_feature_grid", "kl_standardization")


def standardize_kl_authors(kl: torch.Tensor) -> torch.Tensor:
    """The authors' KL normalisation: z-score each image's whole (3, H, W) map (``vb = (vb - vb.mean()) /
    vb.std()`` in their ``calc_bpd_loop``, test batch size 1), before the mean over RGB."""
    mean = kl.mean(dim=(1, 2, 3), keepdim=True)
    std = kl.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return (kl - mean) / std


@torch.no_grad()
def score_raw(
    model: TrainedModel,
    images: torch.Tensor,
    category: str | None = None,
    t_indices: tuple[int, ...] | None = None,
    timestep_mode: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device=None,
    extractor=None,
    progress: bool = False,
    noise_indices=None,
    known: RawMaps | None = None,
    same_pass: RawMaps | None = None,
) -> RawMaps:
    """KL, RGB and feature maps of ``images`` (N, 3, H, W) in [0, 1] at each test timestep.

    ``t_indices`` (default: the preset's ``test_timesteps``) index the scoring schedule, the
    preset's ``timestep_respacing`` of the T training steps (with "250", index 5 is original step 20).
    Image i's noise is drawn from (``seed``, i); ``noise_indices`` (one int per image) replaces i, e.g.
    all zeros so that an image's maps do not depend on the other images scored with it
    (:mod:`diffad.detector`).

    ``known``: maps of the same images, model, seed and batching at the first timesteps of
    ``t_indices`` (a narrower scoring), copied instead of computed: the pass at the j-th timestep
    draws the j-th of an image's noises, which do not depend on how many follow, so only the new
    timesteps cost UNet passes and the maps are those of a scoring from scratch.

    ``same_pass`` (the authors' ``timestep_mode`` only): maps of the same images, model, seed and
    batching in the consistent mode. Both modes make the same first pass, copied from them: only
    the authors' second, feature-only passes are computed (where the raw index is another step).
    """
    preset = model.preset
    timesteps = tuple(preset.test_timesteps if t_indices is None else t_indices)
    mode = timestep_mode or preset.timestep_mode
    _check_scoring_fields(preset, mode)
    grid = preset.test_feature_grid
    images = check_images(images, image_size=preset.image_size)
    diffusion = build_diffusion(preset, preset.timestep_respacing)
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad or not timesteps:
        raise ValueError(f"test timesteps {list(timesteps)} must lie in [0, {diffusion.num_timesteps}) "
                         f"of the {diffusion.num_timesteps}-step scoring schedule")
    device = pick_device(device)
    model.unet.to(device).eval()
    extractor = extractor if extractor is not None else build_feature_extractor(preset, device)
    model.unet_kwargs(category, 1)  # fails early, naming the categories, when a label is missing
    batch_size = batch_size or preset.score_batch_size
    n, _, h, w = images.shape
    k = len(timesteps)
    out = {kind: torch.empty(n, k, h, w) for kind in MAP_TYPES}
    done = _copy_known(known, out, timesteps, seed, images.shape[1:])
    _check_same_pass(same_pass, mode, timesteps, (n, k, h, w))
    if done == k:
        return RawMaps(timesteps, out["kl"], out["rgb"], out["feature"])
    for start in tqdm(range(0, n, batch_size), desc="score", disable=not progress, leave=False):
        x0 = to_diffusion_range(images[start:start + batch_size]).to(device)
        b = x0.shape[0]
        where = range(start, start + b) if noise_indices is None else noise_indices[start:start + b]
        noise = torch.stack([_noise_for(int(i), seed, x0.shape[1:], k) for i in where], dim=1).to(device)
        target = model.feature_target(extractor(x0, grid=(grid, grid)) if grid else extractor(x0))
        rows = slice(start, start + b)
        for j, t_index in enumerate(timesteps[done:], start=done):
            if same_pass is not None:  # the first pass is the consistent scoring's: copied
                for kind in MAP_TYPES:
                    out[kind][rows, j] = same_pass.get(kind)[rows, j]
                x_t = None
            else:
                one = OnePass(model, diffusion, x0, t_index, noise[j], category, feature_grid=grid)
                kl = one.kl()
                if preset.kl_standardization == "authors":
                    kl = standardize_kl_authors(kl)
                out["kl"][rows, j] = kl.mean(dim=1).cpu()
                out["rgb"][rows, j] = (one.pred_x0() - x0).abs().mean(dim=1).cpu()
                out["feature"][rows, j] = _feature_map(one.feature_error(target), (h, w))
                x_t = one.x_t
            if mode == "authors":
                _authors_feature_pass(model, diffusion, x0, t_index, noise[j], category, grid, target,
                                      out["feature"], rows, j, x_t)
    return RawMaps(timesteps, out["kl"], out["rgb"], out["feature"])


def _check_scoring_fields(preset: Preset, mode: str) -> None:
    """The raw-map settings ``score_raw`` reads: an error naming a wrong one."""
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}; got {mode!r}")
    if preset.kl_standardization not in KL_STANDARDIZATIONS:
        raise ValueError(f"kl_standardization must be one of {KL_STANDARDIZATIONS}; got {preset.kl_standardization!r}")
    grid = preset.test_feature_grid
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        raise ValueError(f"test_feature_grid must be None or a positive int, got {grid!r}")


def _feature_map(error: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (N, 1, h, w) feature error at the image's size, on the host: (N, H, W)."""
    return F.interpolate(error, size=size, mode="bilinear", align_corners=False)[:, 0].cpu()


def _authors_feature_pass(model: TrainedModel, diffusion, x0, t_index: int, noise, category, grid, target,
                          features_out: torch.Tensor, rows: slice, j: int, x_t=None) -> None:
    """The official code's feature branch: a second pass at the first pass's x_t with the raw index
    as the timestep, its feature map written into ``features_out[rows, j]``. Where no respacing
    maps the index to another step it would repeat the first pass: nothing is computed."""
    t = torch.full((x0.shape[0],), t_index, device=x0.device, dtype=torch.long)
    if torch.equal(diffusion.model_timesteps(t), t):
        return
    x_t = diffusion.q_sample(x0, t, noise=noise) if x_t is None else x_t
    label = model.unet_kwargs(category, x0.shape[0], x0.device)
    features = model.unet(x_t, t, return_features=True, feature_grid=grid, **label)[1].float()
    features_out[rows, j] = _feature_map(feature_error(features, target), tuple(features_out.shape[-2:]))


def _check_same_pass(same_pass: RawMaps | None, mode: str, timesteps: tuple, shape: tuple) -> None:
    """``score_raw``'s ``same_pass``: only in the authors' mode, and maps of these timesteps and images."""
    if same_pass is None:
        return
    if mode != "authors":
        raise ValueError(f"same_pass stands in for the first pass of the authors' timestep mode, not of {mode!r}")
    if tuple(same_pass.timesteps) != tuple(timesteps) or tuple(same_pass.kl.shape) != shape:
        raise ValueError(f"same_pass maps at timesteps {list(same_pass.timesteps)}, shape "
                         f"{tuple(same_pass.kl.shape)}, are not this scoring's ({list(timesteps)}, {shape})")


def _copy_known(known: RawMaps | None, out: dict, timesteps: tuple, seed: int, image_shape) -> int:
    """Copy the maps ``known`` holds at the first timesteps of a scoring into ``out`` (``score_raw``'s
    (N, K, H, W) maps) and return how many; an error when they cannot be this scoring's maps."""
    if known is None:
        return 0
    done = len(known.timesteps)
    if tuple(known.timesteps) != tuple(timesteps[:done]):
        raise ValueError(f"known maps at timesteps {list(known.timesteps)} are not the first timesteps of "
                         f"{list(timesteps)}")
    n, _, h, w = out["kl"].shape
    if tuple(known.kl.shape) != (n, done, h, w):
        raise ValueError(f"known maps have shape {tuple(known.kl.shape)}, not {(n, done, h, w)} for these images")
    # torch draws an image's noises as one tensor: check that the first ``done`` of more are the same
    if done and not torch.equal(_noise_for(0, seed, image_shape, len(timesteps))[:done],
                                _noise_for(0, seed, image_shape, done)):
        return 0  # this torch fills a longer draw differently: score every timestep
    for kind in MAP_TYPES:
        out[kind][:, :done] = known.get(kind)
    return done


@dataclass
class Normalizer:
    """Mean and std of each map type at each timestep, over normal validation images."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    @classmethod
    def fit(cls, raw: RawMaps, smoothing_sigma: float = 0.0) -> "Normalizer":
        mean, std = {}, {}
        for kind in MAP_TYPES:
            maps = raw.smoothed(kind, smoothing_sigma)
            mean[kind] = maps.mean(dim=(0, 2, 3))
            std[kind] = maps.std(dim=(0, 2, 3)).clamp_min(1e-12)
        return cls(mean, std)

    def apply(self, kind: str, maps: torch.Tensor) -> torch.Tensor:
        return (maps - self.mean[kind][None, :, None, None]) / self.std[kind][None, :, None, None]


def _zscore_per_image(maps: torch.Tensor) -> torch.Tensor:
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (maps - mean) / std


def normalized(raw: RawMaps, kind: str, normalization: str = "per_image",
               normalizer: Normalizer | None = None, smoothing_sigma: float = 0.0) -> torch.Tensor:
    """One map type, smoothed, normalised and averaged over timesteps: (N, H, W).

    ``per_image`` is the paper's choice: the pixel-level (KL, RGB) maps are z-scored within each
    image and the feature map is left raw. It discards how anomalous the whole image is.
    ``validation`` divides every map type by statistics of normal validation images, which keeps
    that information and puts the two branches on one scale. ``none`` leaves the maps raw.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    maps = raw.smoothed(kind, smoothing_sigma)
    if normalization == "per_image" and kind != "feature":
        maps = _zscore_per_image(maps)
    elif normalization == "validation":
        if normalizer is None:
            raise ValueError("normalization='validation' needs a Normalizer fitted on normal validation maps")
        maps = normalizer.apply(kind, maps)
    return maps.mean(dim=1)


def ensemble(kl: torch.Tensor, feature: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's ensemble of two normalised maps, A = alpha * KL + (1 - alpha) * feature."""
    return alpha * kl + (1.0 - alpha) * feature


def anomaly_maps(raw: RawMaps, alpha: float = 0.5, normalization: str = "per_image",
                 normalizer: Normalizer | None = None, smoothing_sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """Final maps (N, H, W): ``kl``, ``rgb``, ``feature`` and ``ensemble`` = alpha*kl + (1-alpha)*feature."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    maps = {kind: normalized(raw, kind, normalization, normalizer, smoothing_sigma) for kind in MAP_TYPES}
    maps["ensemble"] = ensemble(maps["kl"], maps["feature"], alpha)
    return maps


# The preset fields final_maps reads: all scoring fields, applied after the UNet (tests check the list).
FINAL_MAP_FIELDS = ("alpha", "normalization", "image_normalization", "smoothing_sigma", "top_k")


def final_maps(raw_test: RawMaps, raw_val: RawMaps | None, preset, alpha: float | None = None,
               normalizer: Normalizer | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Final maps (N, H, W) of every kind and each kind's image scores (N,), from one scoring run.

    Everything after the UNet, with the preset's settings in one call: smoothing, normalisation
    (statistics of the validation maps ``raw_val`` where the preset asks for them), the ensemble
    weight (``alpha`` overrides the preset's), and the image score, read from maps normalised as
    ``image_normalization`` says (the same maps when it is None). ``normalizer``: statistics fitted
    before (a detector's run keeps them), in place of fitting them on ``raw_val`` (then None).
    """
    if normalizer is None:
        normalizer = Normalizer.fit(raw_val, preset.smoothing_sigma)
    alpha = preset.alpha if alpha is None else alpha
    maps = anomaly_maps(raw_test, alpha, preset.normalization, normalizer, preset.smoothing_sigma)
    image_maps = maps
    if preset.image_normalization not in (None, preset.normalization):
        image_maps = anomaly_maps(raw_test, alpha, preset.image_normalization, normalizer, preset.smoothing_sigma)
    return maps, {kind: image_scores(image_maps[kind], preset.top_k) for kind in maps}


def image_scores(maps: torch.Tensor, top_k: int = 64) -> torch.Tensor:
    """Image score: mean of the ``top_k`` highest pixels, k given at 256x256 and scaled with the area."""
    n, h, w = maps.shape
    k = max(1, round(top_k * h * w / (256 * 256)))
    return maps.reshape(n, -1).topk(k, dim=1).values.mean(dim=1)
