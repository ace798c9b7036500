"""The app's inputs: image tiles and regions of whole-slide images, found in the input path and read one by one.

The input path (``-i``) is a file or a folder of files:

* a **tile** is a PNG, JPEG or TIFF image (RGB uint8), read whole;
* a **region request** is a ``.json`` file naming a region of a slide::

      {"slide": "case1.svs", "location": [x, y], "size": [width, height], "level": 0}

  ``slide`` is relative to the request's folder (or absolute); ``location`` is the region's top-left corner in
  level-0 pixels; ``size`` is in pixels of ``level`` (default 0); optional ``mpp`` gives the slide's level-0
  microns per pixel, for a file that records none or records a wrong one (it overrides the file's, as a cohort
  CSV's ``mpp`` column does for whole-slide inference); optional ``backend`` is ``auto`` (default), ``openslide``
  or ``tifffile`` (``scripts.slides.readers.open_slide``). Files named by a request are slides, not tiles.

The pixels of a region must have the resolution the network was trained at (0.25 µm/px at 40x): a level whose
resolution differs by more than 15% is refused, naming the level that fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scripts.data.datasets import read_image
from scripts.slides.readers import open_slide

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
REQUEST_SUFFIX = ".json"
BACKENDS = ("auto", "openslide", "tifffile")
#: microns per pixel at 1x: a 40x image has 0.25 µm/px
MICRONS_AT_1X = 10.0
MPP_TOLERANCE = 0.15
_REQUEST_KEYS = {"slide", "location", "size", "level", "mpp", "backend"}


@dataclass(frozen=True)
class RegionRequest:
    """A region of a slide, as a request file gives it.

    Attributes:
        source: the request file.
        slide: the slide file.
        location: ``(x, y)`` top-left corner in level-0 pixels.
        size: ``(width, height)`` in pixels of ``level``.
        level: pyramid level read.
        mpp: level-0 microns per pixel stated by the request (overriding the slide's), or None.
        backend: slide reader (``auto``, ``openslide``, ``tifffile``).
    """

    source: Path
    slide: Path
    location: tuple[int, int]
    size: tuple[int, int]
    level: int
    mpp: float | None
    backend: str


@dataclass(frozen=True)
class InputItem:
    """One image to analyse: a tile file, or a region request (``region`` set; ``error`` when the request is bad)."""

    name: str
    path: Path
    region: RegionRequest | None = None
    error: str | None = None


@dataclass
class LoadedImage:
    """An image ready for the network, and where it lies.

    Attributes:
        name: output file stem.
        source: the tile or request file.
        image: (H, W, 3) uint8 RGB.
        origin: ``(x, y)`` of the image's top-left pixel in level-0 pixels ((0, 0) for a tile).
        downsample: level-0 pixels per image pixel (1 for a tile).
        error: why the input could not be read (``image`` is then None); the other inputs go on.
    """

    name: str
    source: Path
    image: np.ndarray | None
    origin: tuple[float, float] = (0.0, 0.0)
    downsample: float = 1.0
    error: str | None = None


def _pair(value: object, key: str, source: Path, positive: bool) -> tuple[int, int]:
    ok = (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in value))
    if not ok or any(v < (1 if positive else 0) for v in value):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{source}: '{key}' must be two {kind} integers [x, y] / [width, height], got {value!r}")
    return int(value[0]), int(value[1])


def read_region_request(path: Path) -> RegionRequest:
    """Read and check a region request file.

    Raises:
        ValueError: not JSON, unknown or missing keys, values of the wrong kind; the message names the file.
        FileNotFoundError: the slide it names does not exist.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON region request ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a region request is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _REQUEST_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(_REQUEST_KEYS)})")
    missing = sorted({"slide", "location", "size"} - set(raw))
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if not isinstance(raw["slide"], str) or not raw["slide"]:
        raise ValueError(f"{path}: 'slide' must be a file name, got {raw['slide']!r}")
    level = raw.get("level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ValueError(f"{path}: 'level' must be a non-negative integer, got {level!r}")
    mpp = raw.get("mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or mpp <= 0):
        raise ValueError(f"{path}: 'mpp' must be a positive number of microns per pixel, got {mpp!r}")
    backend = raw.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{path}: 'backend' must be one of {list(BACKENDS)}, got {backend!r}")
    slide = (path.parent / raw["slide"]).resolve()
    if not slide.is_file():
        raise FileNotFoundError(f"{path}: slide {slide} not found")
    return RegionRequest(source=path, slide=slide, location=_pair(raw["location"], "location", path, False),
                         size=_pair(raw["size"], "size", path, True), level=level,
                         mpp=None if mpp is None else float(mpp), backend=backend)


def scan_inputs(path: Path) -> list[InputItem]:
    """The tiles and region requests of the input path, sorted by name.

    A bad region request becomes an item with its ``error`` (the other inputs are still analysed).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: nothing to analyse, a file of another kind given directly, or two inputs with the same name.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    requests = [p for p in files if p.suffix.lower() == REQUEST_SUFFIX]
    items = []
    for request in requests:
        try:
            items.append(InputItem(request.stem, request, read_region_request(request)))
        except (ValueError, FileNotFoundError) as err:
            items.append(InputItem(request.stem, request, error=str(err)))
    slides = {item.region.slide for item in items if item.region is not None}
    items += [InputItem(p.stem, p) for p in files if p.suffix.lower() in TILE_SUFFIXES and p.resolve() not in slides]
    if path.is_file() and not items:
        raise ValueError(f"{path}: not a tile ({', '.join(TILE_SUFFIXES)}) or a region request ({REQUEST_SUFFIX})")
    if not items:
        raise ValueError(f"{path}: no tiles ({', '.join(TILE_SUFFIXES)}) or region requests ({REQUEST_SUFFIX}) found")
    by_name: dict[str, Path] = {}
    for item in items:
        if item.name in by_name:
            raise ValueError(f"{item.path} and {by_name[item.name]} would write the same outputs '{item.name}.*'")
        by_name[item.name] = item.path
    return sorted(items, key=lambda item: item.name)


def read_region(request: RegionRequest, magnification: int) -> LoadedImage:
    """Read the region of a request, checking that its pixels have the network's resolution.

    Args:
        request: the region.
        magnification: the network's magnification (its microns per pixel are ``10 / magnification``).

    Raises:
        ValueError (``scripts.slides.readers.SlideError``): the slide cannot be read, the level does not exist, the
            region lies outside the slide, the resolution is unknown or does not match; the message names the request.
    """
    with open_slide(request.slide, request.backend) as slide:
        levels = len(slide.level_dimensions)
        if request.level >= levels:
            raise ValueError(f"{request.source}: level {request.level} does not exist ({request.slide} has {levels})")
        downsample = slide.level_downsamples[request.level]
        mpp0 = request.mpp if request.mpp is not None else slide.mpp
        if mpp0 is None:
            raise ValueError(f"{request.source}: {request.slide} does not record its microns per pixel; "
                             "state the level-0 resolution with \"mpp\"")
        wanted = MICRONS_AT_1X / magnification
        if abs(mpp0 * downsample / wanted - 1.0) > MPP_TOLERANCE:
            fits = [i for i, d in enumerate(slide.level_downsamples) if abs(mpp0 * d / wanted - 1) <= MPP_TOLERANCE]
            hint = f"level {fits[0]} fits" if fits else "no level of the slide fits"
            raise ValueError(f"{request.source}: level {request.level} has {mpp0 * downsample:.4g} µm/px but the "
                             f"network expects {wanted:.4g} µm/px ({magnification}x); {hint}")
        x, y = (round(v / downsample) for v in request.location)
        (width, height), (lw, lh) = request.size, slide.level_dimensions[request.level]
        if x + width > lw or y + height > lh:
            raise ValueError(f"{request.source}: the region at {list(request.location)} of {width} x {height} pixels "
                             f"at level {request.level} reaches beyond the slide ({lw} x {lh} pixels at that level)")
        image = slide.read_region(x, y, width, height, request.level)
    return LoadedImage(name=request.source.stem, source=request.source, image=image,
                       origin=(x * downsample, y * downsample), downsample=downsample)


def load_item(item: InputItem, magnification: int) -> LoadedImage:
    """Read a tile, or the region of a request (see :func:`read_region`).

    Raises:
        ValueError / OSError: the input's problem (a bad request found by :func:`scan_inputs`, an unreadable
            image or region), naming the file.
    """
    if item.error is not None:
        raise ValueError(item.error)
    if item.region is not None:
        return read_region(item.region, magnification)
    return LoadedImage(name=item.name, source=item.path, image=read_image(item.path))
