"""Anomaly maps over images, the figures a run writes for a person to look at: the paper's Fig. 4/6
(``reproduce``'s ``overlays.png``) and the heat map with the defect outline over a photo (``predict``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["overlay_figure", "overlay_image", "pick_examples", "to_numpy_image", "outline"]


def to_numpy_image(image) -> np.ndarray:
    """(3, H, W) or (H, W) tensor in [0, 1] -> (H, W, 3) or (H, W) numpy array for imshow."""
    if torch.is_tensor(image):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = np.moveaxis(image, 0, -1)
        if image.shape[-1] == 1:
            image = image[..., 0]
    return np.clip(image, 0, 1) if image.ndim == 3 else image


def _rescale(maps: np.ndarray) -> np.ndarray:
    """Maps to [0, 1] with one scale for all of them (robust 1st-99.5th percentile)."""
    lo, hi = np.percentile(maps, [1, 99.5])
    return np.clip((maps - lo) / max(hi - lo, 1e-12), 0, 1)


def outline(ax, mask, color="lime") -> None:
    """Draw the ground-truth defect outline on an axis."""
    mask = mask.numpy() if torch.is_tensor(mask) else np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[0]
    if mask.any():
        ax.contour(mask > 0.5, levels=[0.5], colors=color, linewidths=0.8)


def pick_examples(labels, defect_types=None, n: int = 4) -> list[int]:
    """Indices of ``n`` defective images, one per defect type first."""
    labels = np.asarray(labels)
    defective = [i for i in range(len(labels)) if labels[i]]
    if defect_types is None:
        return defective[:n]
    chosen, seen = [], set()
    for i in defective:
        if defect_types[i] not in seen:
            chosen.append(i)
            seen.add(defect_types[i])
    chosen += [i for i in defective if i not in chosen]
    return chosen[:n]


def overlay_figure(data, maps: dict, n: int = 4, indices=None, pixel_key: str = "kl",
                   feature_key: str = "feature", final_key: str = "ensemble"):
    """The paper's Fig. 4/6: image, ground truth, pixel-level map, feature-level map, overlay.

    ``data`` has ``test_images``, ``test_masks``, ``test_labels`` and ``defect_types``
    (:class:`diffad.evaluate.CategoryData`); ``maps`` maps a name to (N, H, W) maps.
    """
    if indices is None:
        indices = pick_examples(data.test_labels, data.defect_types, n)
    columns = [("image", None), ("ground truth", None), ("pixel-level (KL)", pixel_key),
               ("feature-level", feature_key), ("final, overlaid", final_key)]
    scaled = {key: _rescale(maps[key].numpy() if torch.is_tensor(maps[key]) else maps[key])
              for _, key in columns if key is not None}
    fig, axes = plt.subplots(len(indices), len(columns), figsize=(2.0 * len(columns), 2.0 * len(indices)),
                             squeeze=False)
    for row, i in enumerate(indices):
        image = to_numpy_image(data.test_images[i])
        for col, (title, key) in enumerate(columns):
            ax = axes[row, col]
            ax.axis("off")
            if row == 0:
                ax.set_title(title, fontsize=8)
            if title == "image":
                ax.imshow(image)
                ax.text(2, 8, data.defect_types[i], color="white", fontsize=7,
                        bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
            elif title == "ground truth":
                ax.imshow(np.asarray(data.test_masks[i]), cmap="gray", vmin=0, vmax=1)
            elif key == final_key:
                ax.imshow(image)
                ax.imshow(scaled[key][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                outline(ax, data.test_masks[i], color="white")
            else:
                ax.imshow(scaled[key][i], cmap="inferno", vmin=0, vmax=1)
    fig.tight_layout()
    return fig


def overlay_image(picture, anomaly_map, threshold: float, heat_range: tuple[float, float], outline: bool = True,
                  cmap: str = "inferno", strength: float = 0.65, outline_color=(0, 255, 0)) -> np.ndarray:
    """The heat map over a photo, and the defect outline at ``threshold``: (H, W, 3) uint8, no figure.

    ``picture``: (H, W, 3) uint8 (any size: the map, (h, w), is resized to it bilinearly);
    ``heat_range``: the map values shown as the coldest and the hottest colour (one scale for every
    image of a run, so colours compare across images); the colour's opacity grows with the value, so
    normal parts show the photo. The outline (``outline_color``, 1-2 pixels wide) is the edge of
    where the map exceeds ``threshold``. Built with numpy and PIL alone: a run writes hundreds of these.
    """
    from PIL import Image
    from scipy.ndimage import binary_dilation, binary_erosion

    picture = np.asarray(picture, dtype=np.uint8)
    height, width = picture.shape[:2]
    values = np.asarray(anomaly_map, dtype=np.float32)
    values = np.asarray(Image.fromarray(values, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    low, high = heat_range
    level = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    colours = (plt.get_cmap(cmap)(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    heat = colours[np.round(level * 255).astype(np.intp)]
    alpha = (strength * level)[..., None]
    out = picture.astype(np.float32) * (1 - alpha) + heat * alpha
    if outline:
        region = values > threshold
        edge = binary_dilation(region & ~binary_erosion(region, border_value=0), iterations=max(1, width // 256))
        out[edge] = outline_color
    return np.round(out).clip(0, 255).astype(np.uint8)
