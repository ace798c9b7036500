"""Reading the pixels of a request: a whole tile, or a region of a tile or a slide with context around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.utils import optional_import

openslide, has_openslide = optional_import("openslide")

SLIDE_SUFFIXES = (".bif", ".mrxs", ".ndpi", ".scn", ".svs", ".svslide", ".tif", ".tiff", ".vms", ".vmu")


@dataclass(frozen=True)
class Region:
    """Where the pixels handed to the network come from.

    Attributes:
        origin: ``(x, y)`` of the first pixel read, in level-0 pixels of the image.
        downsample: level-0 pixels per pixel read (1 at level 0).
        core: ``(left, top, width, height)`` of the requested area inside the pixels read (the rest is context).
    """

    origin: tuple[float, float]
    downsample: float
    core: tuple[int, int, int, int]

    def contains(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` (x, y) in pixels read -> ``(N,)`` bool: inside the core area."""
        left, top, width, height = self.core
        x, y = points[:, 0], points[:, 1]
        return (x >= left) & (x < left + width) & (y >= top) & (y < top + height)


def _pair(value: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"'{name}' must be two integers (x, y) or (width, height), got {list(value)}")
    return int(value[0]), int(value[1])


def _window(extent: tuple[int, int], location: tuple[int, int] | None, size: tuple[int, int] | None,
            margin: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The box read and the core inside it, both clipped to an image of ``extent`` = (width, height).

    Returns:
        ``(x0, y0, x1, y1)`` read (max exclusive) and the core ``(left, top, width, height)`` relative to it.
    """
    width, height = extent
    if size is None or size[0] <= 0 or size[1] <= 0:
        return (0, 0, width, height), (0, 0, width, height)
    x, y = location or (0, 0)
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"location ({x}, {y}) is outside the image of {width} x {height} pixels")
    cx1, cy1 = min(x + size[0], width), min(y + size[1], height)
    x0, y0 = max(x - margin, 0), max(y - margin, 0)
    x1, y1 = min(cx1 + margin, width), min(cy1 + margin, height)
    return (x0, y0, x1, y1), (x - x0, y - y0, cx1 - x, cy1 - y)


def is_slide(path: str | Path) -> bool:
    """True for the file types MONAI Label hands to OpenSlide (and tiles over for ``/infer/wsi_v2``)."""
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def _open_slide(path: Path):
    """An OpenSlide handle, or None when OpenSlide cannot read the file (e.g. a plain, untiled TIFF)."""
    if not has_openslide:
        raise ImportError(f"{path}: reading slides needs the 'openslide-python' and 'openslide-bin' packages")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError:
        return None


def image_extent(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image or of a slide's level 0."""
    from scripts.data.datasets import read_image

    path = Path(path)
    slide = _open_slide(path) if is_slide(path) else None
    if slide is not None:
        with slide:
            return slide.dimensions
    image = read_image(path)
    return image.shape[1], image.shape[0]


def read_region(
    image: str | Path | np.ndarray,
    location: Sequence[int] | None = None,
    size: Sequence[int] | None = None,
    level: int = 0,
    margin: int = 0,
) -> tuple[np.ndarray, Region]:
    """Read the requested area plus up to ``margin`` pixels of context on every side (clipped to the image).

    Args:
        image: a tile (PNG/JPEG/TIFF), a slide (any OpenSlide format) or an ``(H, W, 3)`` uint8 array.
        location: ``(x, y)`` of the area's top-left corner in level-0 pixels; None for the whole image.
        size: ``(width, height)`` of the area in pixels of ``level``; None or zeros for the whole image.
        level: pyramid level of a slide (0 for tiles and arrays).
        margin: context in pixels of ``level``.

    Returns:
        ``(H, W, 3)`` uint8 RGB pixels and their :class:`Region`.
    """
    from scripts.data.datasets import as_rgb_uint8, read_image

    location, size = _pair(location, "location"), _pair(size, "size")
    if isinstance(image, np.ndarray):
        pixels, source = as_rgb_uint8(image, "request image"), "request image"
    else:
        source = str(image)
        slide = _open_slide(Path(image)) if is_slide(image) else None
        if slide is not None:
            with slide:
                return _read_slide(slide, source, location, size, level, margin)
        pixels = read_image(image)
    if level != 0:
        raise ValueError(f"{source}: level {level} requested, but a tile has only level 0")
    (x0, y0, x1, y1), core = _window((pixels.shape[1], pixels.shape[0]), location, size, margin)
    return np.ascontiguousarray(pixels[y0:y1, x0:x1]), Region((float(x0), float(y0)), 1.0, core)


def _read_slide(slide, source: str, location: tuple[int, int] | None, size: tuple[int, int] | None, level: int,
                margin: int) -> tuple[np.ndarray, Region]:
    if not 0 <= level < slide.level_count:
        raise ValueError(f"{source}: level {level} requested, the slide has levels 0..{slide.level_count - 1}")
    downsample = float(slide.level_downsamples[level])
    level_location = None if location is None else (int(location[0] / downsample), int(location[1] / downsample))
    (x0, y0, x1, y1), core = _window(slide.level_dimensions[level], level_location, size, margin)
    origin = (round(x0 * downsample), round(y0 * downsample))
    rgba = np.asarray(slide.read_region(origin, level, (x1 - x0, y1 - y0)))
    return np.ascontiguousarray(rgba[..., :3]), Region((float(origin[0]), float(origin[1])), downsample, core)
