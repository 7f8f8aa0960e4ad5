"""One registry of the methods that diffad runs beside the diffusion model: SPADE, PaDiM, PatchCore,
and any method added later.

A method is an object with the baselines' two calls (anomalib's short API)::

    method.fit(train_images)                    # (N, 3, H, W) normal images in [0, 1]
    maps, scores = method.predict(test_images)  # (N, H, W) maps, (N,) image scores

``fit`` may do anything a method needs, training a network of its own included; ``predict``
returns maps at image size, higher where a defect is more likely. A method is registered once
with :func:`register`: its name (the ``method`` of ``results.csv``), its label in Table 1, and
how it is built from the run's preset, the preset's backbone and the device. ``reproduce``,
``evaluate_category``, the command line's ``--method`` and Table 1 read :func:`registered`.

Adding one, say ``diffad/baselines/mine.py`` with a class ``Mine``, takes one line here::

    register("mine", "Mine (ours)", lambda preset, extractor, device: Mine(device=device))

The diffusion model is not in the registry: one trained model gives four maps at once
(:data:`DIFFUSION_MAPS`), scored by :mod:`diffad.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from diffad.baselines import SPADE, PaDiM, PatchCore

__all__ = ["Method", "DIFFUSION_MAPS", "register", "unregister", "registered", "names", "get"]

# The maps of the diffusion model, each a row of results.csv: the ensemble (the paper's method) and its parts.
DIFFUSION_MAPS = ("ensemble", "kl", "rgb", "feature")


@dataclass(frozen=True)
class Method:
    """A registered method: ``build(preset, extractor, device)`` returns an object with ``fit`` and
    ``predict``; ``extractor`` is the preset's frozen backbone, built once per category and shared
    (a method that brings its own network may ignore it)."""

    name: str
    label: str
    build: Callable[[Any, Any, Any], Any]


_REGISTRY: dict[str, Method] = {}


def register(name: str, label: str, build: Callable[[Any, Any, Any], Any]) -> Method:
    """Add a method under ``name`` (a new row of every table from now on); a taken name is an error."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method's name is a short identifier such as 'padim', got {name!r}")
    if name in _REGISTRY or name in DIFFUSION_MAPS:
        raise ValueError(f"a method named {name!r} is registered already")
    method = Method(name, label, build)
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (a test's toy method, say)."""
    get(name)
    del _REGISTRY[name]


def registered() -> tuple[Method, ...]:
    """Every registered method, in the order of registration (the order of the tables' rows)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The method registered as ``name``, else a ValueError listing those there are."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


register("spade", "SPADE (ours)", lambda preset, extractor, device: SPADE(extractor=extractor, device=device))
register("padim", "PaDiM (ours)", lambda preset, extractor, device: PaDiM(extractor=extractor, device=device))
register("patchcore", "PatchCore (ours)",
         lambda preset, extractor, device: PatchCore(extractor=extractor, device=device))
