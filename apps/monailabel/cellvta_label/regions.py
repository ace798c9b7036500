"""Reading the pixels of a request: a whole tile, or a region of a tile or a slide with context around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def open_image_slide(path: str | Path):
    """The file as a ``scripts.slides.readers.Slide``, or None for a tile (PNG, JPEG, or a TIFF that is not an
    8-bit RGB pyramid)."""
    from scripts.slides.readers import SlideError, open_slide

    if not is_slide(path):
        return None
    try:
        return open_slide(path)
    except SlideError:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            return None
        raise


def image_extent(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image or of a slide's level 0."""
    from scripts.data.datasets import read_image

    path = Path(path)
    slide = open_image_slide(path)
    if slide is not None:
        with slide:
            return tuple(slide.dimensions)
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
        slide = open_image_slide(image)
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
    """The request's window of a ``scripts.slides.readers.Slide`` at ``level``."""
    levels = len(slide.level_dimensions)
    if not 0 <= level < levels:
        raise ValueError(f"{source}: level {level} requested, the slide has levels 0..{levels - 1}")
    downsample = float(slide.level_downsamples[level])
    level_location = None if location is None else (int(location[0] / downsample), int(location[1] / downsample))
    (x0, y0, x1, y1), core = _window(tuple(slide.level_dimensions[level]), level_location, size, margin)
    pixels = slide.read_region(x0, y0, x1 - x0, y1 - y0, level)
    return np.ascontiguousarray(pixels), Region((x0 * downsample, y0 * downsample), downsample, core)


def check_slide_request(path: str | Path, level: int, location: Sequence[int], size: Sequence[int],
                        network_mpp: float, tolerance: float) -> str | None:
    """Refuse a slide-region request that cannot be analysed as asked.

    Args:
        path: the slide. level: pyramid level of ``size``. location: ``(x, y)`` level-0 top-left corner.
        size: ``(width, height)`` in pixels of ``level``.
        network_mpp: microns per pixel the network was trained at. tolerance: accepted relative difference.

    Returns:
        A warning when the slide does not record its resolution (the level is then taken as asked), else None.

    Raises:
        ValueError: a level the slide does not have, a negative location, an empty size, a region not inside
            the slide, or a level whose resolution is not the network's (naming the level that is).
    """
    x, y = (int(v) for v in _pair(location, "location"))
    width, height = (int(v) for v in _pair(size, "size"))
    slide = open_image_slide(path)
    name = Path(path).stem
    if slide is None:
        if level != 0:
            raise ValueError(f"{name}: level {level} requested, but a tile has only level 0")
        return None
    with slide:
        levels = len(slide.level_dimensions)
        if not 0 <= level < levels:
            raise ValueError(f"{name}: level {level} requested, the slide has levels 0..{levels - 1}")
        if x < 0 or y < 0:
            raise ValueError(f"{name}: location ({x}, {y}) is negative; give the region's top-left corner in "
                             "level-0 pixels")
        if width <= 0 or height <= 0:
            raise ValueError(f"{name}: size ({width}, {height}) must be positive")
        downsample = float(slide.level_downsamples[level])
        full_w, full_h = slide.dimensions
        if x + width * downsample > full_w or y + height * downsample > full_h:
            raise ValueError(f"{name}: region at ({x}, {y}) of {width} x {height} pixels at level {level} reaches "
                             f"beyond the slide ({full_w} x {full_h} level-0 pixels)")
        if slide.mpp is None:
            return (f"{name}: the slide does not record its resolution; level {level} is analysed as if it had "
                    f"the network's {network_mpp:g} um/px")
        mpps = [slide.mpp * d for d in slide.level_downsamples]
    if abs(mpps[level] / network_mpp - 1) > tolerance:
        fits = [i for i, m in enumerate(mpps) if abs(m / network_mpp - 1) <= tolerance]
        hint = (f"level {fits[0]} has it" if fits else
                "no level has it (rescan or resample the slide at the network's resolution)")
        raise ValueError(f"{name}: level {level} is {mpps[level]:.3g} um/px but the network was trained at "
                         f"{network_mpp:g} um/px (within {tolerance:.0%}); {hint}")
    return None
