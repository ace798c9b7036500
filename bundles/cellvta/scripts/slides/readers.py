"""Whole-slide images: open a slide, know its pyramid and resolution, read only the region needed.

Two readers give the same interface (:class:`Slide`):

* :class:`OpenSlideSlide` reads every format OpenSlide knows (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM,
  ...) through MONAI's ``WSIReader(backend="openslide")``;
* :class:`TiffSlide` reads plain and OME-TIFF files with tifffile, decoding only the tiles (or strips) that
  intersect the requested region. MONAI's own tifffile backend decodes a whole level for every patch, which is
  unusable on a slide of 100k x 100k pixels.

:func:`open_slide` picks the reader (``backend="auto"``: tifffile for ``.tif/.tiff`` files that it can read
region-wise, OpenSlide otherwise). Every reading error names the file.

A DICOM whole-slide image is a series of ``.dcm`` files (one per pyramid level, plus label and overview images),
opened by OpenSlide from any one of them. It is named by its folder, which must hold the ``.dcm`` files of exactly
one series with pyramid (``VOLUME``) images (:func:`dicom_series`), or by one of its ``.dcm`` files.

Coordinates: ``(x, y)`` in pixels of the level named, ``x`` along the width; regions that reach beyond the slide
are filled with white (255), the colour of glass, and so are the areas a slide leaves unscanned (the missing tiles
of sparse DICOM or MRXS slides, transparent in OpenSlide's RGBA: :func:`over_white`).
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

try:  # both are requirements; without one, the other reader still works
    import tifffile
except ImportError:
    tifffile = None
try:
    import openslide
except ImportError:
    openslide = None
_has_tifffile, _has_openslide = tifffile is not None, openslide is not None

__all__ = ["DICOM_SUFFIX", "OpenSlideSlide", "Slide", "SlideError", "TiffSlide", "dicom_series", "open_slide"]

BACKGROUND = 255
DICOM_SUFFIX = ".dcm"
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class SlideError(ValueError):
    """A slide that cannot be opened or read; the message names the file."""


class Slide(ABC):
    """A pyramidal RGB image.

    Attributes:
        path: the file (a DICOM series: its folder).
        files: the files the slide is made of (``[path]`` but for a DICOM series).
        level_dimensions: ``(width, height)`` of every level, level 0 the largest.
        level_downsamples: level-0 pixels per pixel of every level.
        mpp: microns per level-0 pixel, or None when the file does not say.
    """

    path: Path
    files: list[Path]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self.level_dimensions[0]

    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """``(height, width, 3)`` uint8 RGB of the region whose top-left is ``(x, y)`` in pixels of ``level``.

        Parts outside the slide are white.
        """
        lw, lh = self.level_dimensions[level]
        out = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(x0, y0, x1 - x0, y1 - y0, level)
        return out

    def best_level(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed ``downsample`` (1% tolerance)."""
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most ``max_size``, and its level-0 pixels per pixel."""
        width, height = self.dimensions
        downsample = max(1.0, max(width, height) / max_size)
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        image = self.read_region(0, 0, lw, lh, level)
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        if (lw, lh) != size:
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image, width / size[0]

    @abstractmethod
    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        """The in-bounds region as ``(height, width, 3)`` uint8 RGB."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def over_white(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA (not premultiplied, as OpenSlide returns it) laid over white: ``(H, W, 3)`` RGB.

    Transparent pixels (the tiles a sparse slide lacks) become the white of glass, not black.
    """
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((rgba[..., :3] * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide through MONAI's ``WSIReader(backend="openslide")``.

    Args:
        path: the slide: a file, or the folder of a DICOM series (:func:`dicom_series`).
    """

    def __init__(self, path: str | Path) -> None:
        if not _has_openslide:
            raise SlideError(f"{path}: openslide-python is not installed (pip install openslide-python openslide-bin)")
        from monai.data import WSIReader

        self.path = Path(path)
        dicom = self.path.is_dir() or self.path.suffix.lower() == DICOM_SUFFIX
        self.files = dicom_series(self.path) if dicom else [self.path]
        self._reader = WSIReader(backend="openslide", level=0, channel_dim=-1)
        try:
            self._wsi = self._reader.read(str(self.path if self.path.is_file() else self.files[0]))
        except Exception as err:  # OpenSlide raises its own error types for unknown or corrupt files
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({type(err).__name__}: {err})") from err
        count = self._reader.get_level_count(self._wsi)
        self.level_dimensions = [tuple(self._reader.get_size(self._wsi, i))[::-1] for i in range(count)]
        self.level_downsamples = [float(self._reader.get_downsample_ratio(self._wsi, i)) for i in range(count)]
        try:
            self.mpp = float(self._reader.get_mpp(self._wsi, 0)[1])
        except ValueError:
            self.mpp = None

    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        scale = self.level_downsamples[level]
        try:
            data, _ = self._reader.get_data(self._wsi, location=(round(y * scale), round(x * scale)),
                                            size=(height, width), level=level, mode="RGBA")
        except Exception as err:
            raise SlideError(f"{self.path}: cannot read region x={x} y={y} {width}x{height} at level {level} "
                             f"({type(err).__name__}: {err})") from err
        return over_white(np.asarray(data, dtype=np.uint8))

    def close(self) -> None:
        self._wsi.close()


class TiffSlide(Slide):
    """A tiled or stripped RGB(A) TIFF / OME-TIFF read with tifffile, one segment at a time.

    Levels are those of tifffile's first series (SubIFD or consecutive-IFD pyramids). Only 8-bit images with
    interleaved samples are supported.
    """

    def __init__(self, path: str | Path) -> None:
        if not _has_tifffile:
            raise SlideError(f"{path}: tifffile is not installed")
        self.path = Path(path)
        self.files = [self.path]
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as err:
            raise SlideError(f"{self.path}: not a readable TIFF ({type(err).__name__}: {err})") from err
        self._pages = [level.keyframe for level in series.levels]
        for i, page in enumerate(self._pages):
            if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4) or page.planarconfig != 1:
                raise SlideError(f"{self.path}: level {i} is not 8-bit interleaved RGB(A) (dtype {page.dtype}, "
                                 f"{page.samplesperpixel} samples, planar configuration {page.planarconfig})")
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        width = self.level_dimensions[0][0]
        self.level_downsamples = [width / w for w, _ in self.level_dimensions]
        self.mpp = _tiff_mpp(self._tif, self._pages[0])
        self._lock = threading.Lock()

    def _read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        page = self._pages[level]
        seg_h, seg_w = page.chunks[0], page.chunks[1]
        across = page.chunked[1]
        out = np.empty((height, width, 3), dtype=np.uint8)
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                index = row * across + col
                segment = self._segment(page, index)
                top, left = row * seg_h, col * seg_w
                r0, r1 = max(y, top), min(y + height, top + segment.shape[0])
                c0, c1 = max(x, left), min(x + width, left + segment.shape[1])
                out[r0 - y : r1 - y, c0 - x : c1 - x] = segment[r0 - top : r1 - top, c0 - left : c1 - left, :3]
        return out

    def _segment(self, page: tifffile.TiffPage, index: int) -> np.ndarray:
        """Decoded segment ``index`` of ``page`` as ``(rows, cols, samples)``; white where the file has none."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return np.full((page.chunks[0], page.chunks[1], page.samplesperpixel), BACKGROUND, np.uint8)
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        try:
            segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as err:
            raise SlideError(f"{self.path}: segment {index} of level {self._pages.index(page)} cannot be decoded "
                             f"({type(err).__name__}: {err})") from err
        if segment is None:
            raise SlideError(f"{self.path}: segment {index} is truncated or empty")
        return segment.reshape(shape[1:])

    def close(self) -> None:
        self._tif.close()


def _tiff_mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """Microns per pixel from OME-XML, an Aperio description or the TIFF resolution tags, if any."""
    if tif.is_ome and tif.ome_metadata:
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
        if pixels is not None and pixels.get("PhysicalSizeX"):
            return float(pixels.get("PhysicalSizeX")) * _OME_UNITS_UM.get(pixels.get("PhysicalSizeXUnit", "µm"), 1.0)
    match = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if unit in _UM_PER_UNIT and num > 0 and den > 0:
            return _UM_PER_UNIT[unit] * den / num
    return None


def dicom_series(path: str | Path) -> list[Path]:
    """The ``.dcm`` files of a DICOM whole-slide series (sorted by name), read header-only: for a folder, those of
    the one series in it with a pyramid (``VOLUME``) image; for a ``.dcm`` file, those of its series in its folder.

    A series holding no pyramid image (an overview or label stored as a series of its own) does not count.

    Raises:
        SlideError: naming the folder or file: no ``.dcm`` file, a file that is not DICOM, no whole-slide pyramid,
            or pyramids of several series in a folder (each series must be a folder of its own, or be named by one
            of its files).
    """
    import pydicom

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == DICOM_SUFFIX
                   and (not p.name.startswith(".") or p.name == path.name))
    if not files:
        raise SlideError(f"{folder}: no {DICOM_SUFFIX} files (a folder is a slide when it holds a DICOM series)")
    series: dict[str, list[Path]] = {}
    pyramids: list[str] = []
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True,
                                     specific_tags=["SOPClassUID", "SeriesInstanceUID", "ImageType"])
        except Exception as err:  # InvalidDicomError, EOFError, ... on files that are not DICOM
            raise SlideError(f"{file}: not a readable DICOM file ({type(err).__name__}: {err})") from err
        uid = str(header.get("SeriesInstanceUID", ""))
        series.setdefault(uid, []).append(file)
        image_type = [str(t).upper() for t in header.get("ImageType", [])]
        if str(header.get("SOPClassUID", "")) == _WSI_SOP_CLASS and image_type[2:3] == ["VOLUME"]:
            pyramids += [uid] if uid not in pyramids else []
    if not path.is_dir():
        return next(found for found in series.values() if any(f.name == path.name for f in found))
    if not pyramids:
        raise SlideError(f"{folder}: no DICOM whole-slide pyramid (VL Whole Slide Microscopy VOLUME image) "
                         f"among its {len(files)} {DICOM_SUFFIX} files")
    if len(pyramids) > 1:
        listing = "; ".join(f"series {uid}: {', '.join(p.name for p in series[uid])}" for uid in pyramids)
        raise SlideError(f"{folder}: holds {len(pyramids)} DICOM whole-slide series ({listing}); put each series "
                         f"in a folder of its own, or name the slide by one of its {DICOM_SUFFIX} files")
    return series[pyramids[0]]


def open_slide(path: str | Path, backend: str = "auto") -> Slide:
    """Open ``path`` with ``backend`` ``"openslide"``, ``"tifffile"`` or ``"auto"``.

    ``auto`` reads ``.tif``/``.tiff``/``.ome.tif`` files with tifffile (vendor TIFFs that tifffile cannot read
    region-wise, such as JPEG-2000 SVS, go to OpenSlide) and every other format, DICOM series folders included,
    with OpenSlide.

    Raises:
        SlideError: the file is missing, unknown or corrupt.
    """
    path = Path(path)
    if backend not in {"auto", "openslide", "tifffile"}:
        raise SlideError(f"{path}: unknown slide backend {backend!r} (auto, openslide, tifffile)")
    if path.is_dir():
        if backend == "tifffile":
            raise SlideError(f"{path}: a folder (DICOM series) is read with OpenSlide, not the tifffile backend")
        return OpenSlideSlide(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such slide file")
    if backend == "openslide":
        return OpenSlideSlide(path)
    if backend == "tifffile":
        return TiffSlide(path)
    if path.suffix.lower() not in {".tif", ".tiff"}:
        return OpenSlideSlide(path)
    try:
        return TiffSlide(path)
    except SlideError as tiff_error:
        try:
            return OpenSlideSlide(path)
        except SlideError as openslide_error:
            raise SlideError(f"{tiff_error}; {openslide_error}") from openslide_error
