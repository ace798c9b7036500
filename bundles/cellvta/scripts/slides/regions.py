"""Regions of interest: the part of a slide to analyse, from an annotation file or a mask image.

Accepted files (coordinates in level-0 pixels of the slide):

* QuPath GeoJSON (``.geojson``, ``.json``): a FeatureCollection, a list of Features, a Feature or a geometry;
  every Polygon and MultiPolygon counts (holes excluded), other geometries are ignored;
* ASAP XML (``.xml``): every ``Annotation`` with at least three ``Coordinate`` elements (taken in ``Order``);
* a binary mask image (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``) covering the whole slide at any
  resolution: non-zero pixels are the region.

A tile is analysed when it meets the region (and tissue); a nucleus is kept when its centroid lies inside.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
import shapely.geometry
from shapely.geometry.base import BaseGeometry

__all__ = ["ANNOTATION_SUFFIXES", "MASK_SUFFIXES", "Region", "find_region", "read_region"]

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Region:
    """A region of a ``width`` x ``height`` (level-0 pixels) slide.

    Attributes:
        source: the file it was read from.
        width, height: the slide's level-0 size.
        geometry: polygons in level-0 pixels, or None for a mask.
        mask: (h, w) bool covering the whole slide, or None for polygons.
    """

    source: Path
    width: int
    height: int
    geometry: BaseGeometry | None = None
    mask: np.ndarray | None = None

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """(N,) bool: which of the (N, 2) level-0 ``(x, y)`` points lie inside."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if self.geometry is not None:
            return shapely.contains_xy(self.geometry, xy[:, 0], xy[:, 1])
        h, w = self.mask.shape
        cols = np.clip(np.floor(xy[:, 0] * w / self.width), 0, w - 1).astype(np.int64)
        rows = np.clip(np.floor(xy[:, 1] * h / self.height), 0, h - 1).astype(np.int64)
        return self.mask[rows, cols]

    def raster(self, shape: tuple[int, int], scale: float) -> np.ndarray:
        """(H, W) bool of the region drawn at ``scale`` level-0 pixels per pixel (e.g. on a thumbnail)."""
        if self.mask is not None:
            resized = cv2.resize(self.mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
            return resized.astype(bool)
        canvas = np.zeros(shape, bool)
        for polygon in shapely.get_parts(self.geometry):
            # each polygon with its holes on its own patch: a hole never erases another polygon (an island in it)
            rings = [np.round(np.asarray(r.coords) / scale - 0.5).astype(np.int32)
                     for r in (polygon.exterior, *polygon.interiors)]
            x0, y0 = np.maximum(rings[0].min(axis=0), 0)
            x1, y1 = np.minimum(rings[0].max(axis=0) + 1, (shape[1], shape[0]))
            if x1 <= x0 or y1 <= y0:
                continue
            patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(patch, [(ring - (x0, y0)).reshape(-1, 1, 2) for ring in rings], 1)
            canvas[y0:y1, x0:x1] |= patch.astype(bool)
        return canvas


def _polygons(geometries: list[BaseGeometry], path: Path) -> BaseGeometry:
    parts = [g for g in geometries if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not parts:
        raise ValueError(f"{path}: no polygon in the region file")
    geometry = shapely.union_all([shapely.make_valid(g) for g in parts])
    geometry = shapely.union_all([g for g in shapely.get_parts(geometry) if g.geom_type == "Polygon"])
    shapely.prepare(geometry)
    return geometry


def _geojson(path: Path) -> BaseGeometry:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a GeoJSON file ({err})") from err
    items = data.get("features", [data]) if isinstance(data, dict) else data
    geometries = []
    for k, item in enumerate(items if isinstance(items, list) else []):
        geometry = item.get("geometry", item) if isinstance(item, dict) else None
        try:
            geometries.append(shapely.geometry.shape(geometry))
        except (AttributeError, TypeError, ValueError, shapely.errors.GEOSException) as err:
            raise ValueError(f"{path}: feature {k} has no readable geometry ({err})") from err
    return _polygons(geometries, path)


def _asap(path: Path) -> BaseGeometry:
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise ValueError(f"{path}: not an ASAP XML annotation file ({err})") from err
    geometries = []
    for annotation in root.iter("Annotation"):
        try:
            points = sorted(((int(c.get("Order", k)), float(c.get("X")), float(c.get("Y")))
                             for k, c in enumerate(annotation.iter("Coordinate"))))
        except (TypeError, ValueError) as err:
            name = annotation.get("Name", "")
            raise ValueError(f"{path}: annotation {name!r} has a coordinate without a numeric X, Y or Order "
                             f"({err})") from err
        if len(points) >= 3:
            geometries.append(shapely.geometry.Polygon([(x, y) for _, x, y in points]))
    return _polygons(geometries, path)


def read_region(path: str | Path, width: int, height: int) -> Region:
    """The region of ``path`` on a ``width`` x ``height`` slide (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable or empty region, one that lies outside the slide, or a mask whose shape does
            not match the slide's (aspect ratios differing by more than 2%).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: region file not found")
    suffix = path.suffix.lower()
    if suffix in MASK_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None or image.size == 0:
            raise ValueError(f"{path}: not a readable mask image")
        h, w = image.shape
        if abs((w / h) / (width / height) - 1) > 0.02:
            raise ValueError(f"{path}: mask of {w} x {h} does not match the slide's {width} x {height} (aspect ratio)")
        if not image.any():
            raise ValueError(f"{path}: the mask is empty")
        return Region(path, width, height, mask=image > 0)
    if suffix not in ANNOTATION_SUFFIXES:
        raise ValueError(f"{path}: unknown region format (expected {', '.join(ANNOTATION_SUFFIXES + MASK_SUFFIXES)})")
    geometry = _asap(path) if suffix == ".xml" else _geojson(path)
    if not geometry.intersects(shapely.geometry.box(0, 0, width, height)):
        x0, y0, x1, y1 = (round(v) for v in geometry.bounds)
        raise ValueError(f"{path}: the region ({x0}, {y0})-({x1}, {y1}) lies outside the slide ({width} x {height})")
    return Region(path, width, height, geometry=geometry)


def find_region(roi: str | Path, slide: str | Path) -> Path:
    """The region file for ``slide``: ``roi`` itself, or in the folder ``roi`` the file named after the slide
    (``<slide file name><suffix>`` or ``<slide name without its extension><suffix>``).

    Raises:
        FileNotFoundError: the folder holds no region file for the slide, or several.
    """
    roi, slide = Path(roi), Path(slide)
    if not roi.is_dir():
        return roi
    names = {slide.name, slide.stem}
    found = sorted(p for p in roi.iterdir() if p.suffix.lower() in ANNOTATION_SUFFIXES + MASK_SUFFIXES
                   and p.name[: -len(p.suffix)] in names)
    if len(found) != 1:
        what = "no region file" if not found else f"{len(found)} region files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{slide}: {what} named after the slide in {roi}")
    return found[0]
