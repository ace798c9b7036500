"""Labels saved in the datastore -> instance and type maps for training.

Accepted label files (by suffix):

* ``.xml``: ASAP annotations, as QuPath's MONAI Label extension submits them and as ``/infer/wsi_v2?output=asap``
  returns them: one ``Annotation`` polygon per nucleus, its class in ``PartOfGroup`` (or ``Name``); coordinates
  in pixels of the image the label is saved for.
* ``.geojson`` / ``.json``: a GeoJSON FeatureCollection (QuPath's export, the bundle's inference output): one
  ``Polygon`` (or ``MultiPolygon``) per nucleus, its class in ``properties.classification.name``.
* ``.npz``: ``inst_map`` and ``type_map`` arrays of the image's size, class ids of the served class table.
* ``.csv``: point labels, ``x, y, label`` rows (``scripts.cells.labels.read_point_csv``); a GeoJSON label may also
  hold classified ``Point``/``MultiPoint`` features instead of polygons (QuPath's point annotations).

Outlines (polygons, maps) train the segmentation network; every label but ``.npz`` maps also trains the cell
classifier, as points (:func:`label_points`: a polygon counts as its centroid).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

POLYGON_SUFFIXES = (".xml", ".geojson", ".json")
MAP_SUFFIXES = (".npz",)
POINT_SUFFIXES = (".csv",)
LABEL_SUFFIXES = POLYGON_SUFFIXES + MAP_SUFFIXES + POINT_SUFFIXES


@dataclass(frozen=True)
class NucleusPolygon:
    """One labelled nucleus: its class name and its outline ``points`` ``(K, 2)`` (x, y), K >= 3."""

    name: str
    points: np.ndarray


def read_polygons(path: str | Path) -> list[NucleusPolygon]:
    """The labelled nuclei of an ASAP XML or GeoJSON label file.

    Raises:
        ValueError: unreadable file, unsupported suffix, or a polygon without a class, naming the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return _read_asap(path)
    if suffix in (".geojson", ".json"):
        return _read_geojson(path)
    raise ValueError(f"{path}: unsupported label format {suffix!r} (expected {LABEL_SUFFIXES})")


def _read_asap(path: Path) -> list[NucleusPolygon]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not valid XML ({err})") from err
    polygons = []
    for i, annotation in enumerate(root.iter("Annotation")):
        name = (annotation.get("PartOfGroup") or "").strip()
        if not name or name == "None":
            name = (annotation.get("Name") or "").strip()
        if not name:
            raise ValueError(f"{path}: annotation {i} has no class (PartOfGroup or Name)")
        try:
            points = [(float(c.get("X")), float(c.get("Y"))) for c in annotation.iter("Coordinate")]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: annotation {i} has a coordinate without numeric X/Y ({err})") from err
        if len(points) >= 3:
            polygons.append(NucleusPolygon(name, np.asarray(points, np.float64)))
    return polygons


def _feature_name(feature: dict) -> str:
    props = feature.get("properties") or {}
    classification = props.get("classification") or {}
    name = classification.get("name") if isinstance(classification, dict) else None
    return str(name or props.get("name") or props.get("label") or "").strip()


def _read_geojson(path: Path) -> list[NucleusPolygon]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    polygons = []
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            continue
        name = _feature_name(feature)
        if not name:
            raise ValueError(f"{path}: feature {i} has no class (properties.classification.name)")
        try:
            parts = [geometry["coordinates"]] if kind == "Polygon" else list(geometry["coordinates"])
            rings = [np.asarray(part[0], np.float64) for part in parts]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: feature {i} has malformed {kind} coordinates ({err})") from err
        for ring in rings:
            if ring.ndim != 2 or ring.shape[1] < 2:
                raise ValueError(f"{path}: feature {i} has a ring that is not a list of [x, y] points")
            if len(ring) >= 3:
                polygons.append(NucleusPolygon(name, ring[:, :2]))
    return polygons


def class_table(current: Sequence[str] | None, names: Iterable[str], requested: Sequence[str] | None = None,
                source: str = "labels") -> list[str]:
    """The class table to train with, background first.

    Args:
        current: the served model's classes (background first), or None when there is no model yet.
        names: the class names found in the labels.
        requested: an explicit class list (the user's own classes); every label name must be in it.
        source: what the names come from, for error messages.

    Returns:
        ``requested`` (with ``background`` prepended if absent) when given; else ``current`` followed by the
        label names it does not have (matched case-insensitively), in sorted order.
    """
    found = {n.strip() for n in names}
    if requested:
        table = list(requested) if requested[0].lower() == "background" else ["background", *requested]
        known = {n.lower() for n in table}
        unknown = sorted(n for n in found if n.lower() not in known)
        if unknown:
            raise ValueError(f"{source}: class names {unknown} are not in the requested classes {table}")
        return table
    table = list(current) if current else ["background"]
    known = {n.lower() for n in table}
    return table + sorted({n for n in found if n.lower() not in known}, key=str.lower)


def rasterize(polygons: Sequence[NucleusPolygon], shape: tuple[int, int], classes: Sequence[str],
              origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps of the labelled nuclei in the ``shape`` = (H, W) window at ``origin`` = (x, y).

    Every polygon is filled (boundary included) with a new instance id; where polygons overlap the later one
    wins. Instances left with no pixel in the window are dropped and ids are made consecutive.

    Returns:
        ``inst_map`` (H, W) int32 (0 background, 1..N) and ``type_map`` (H, W) uint8 (class ids of ``classes``).
    """
    from scripts.data.datasets import relabel_sequential

    ids = {name.lower(): i for i, name in enumerate(classes)}
    inst = np.zeros(shape, np.int32)
    cls_of = np.zeros(len(polygons) + 1, np.uint8)
    for k, polygon in enumerate(polygons, start=1):
        if polygon.name.lower() not in ids:
            raise ValueError(f"class {polygon.name!r} is not in the class table {list(classes)}")
        points = np.rint(polygon.points - np.asarray(origin, np.float64)).astype(np.int32)
        cv2.fillPoly(inst, [points.reshape(-1, 1, 2)], k)
        cls_of[k] = ids[polygon.name.lower()]
    type_map = cls_of[inst]
    return relabel_sequential(inst), type_map


def bounds(polygons: Sequence[NucleusPolygon], pad: int, extent: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` around all polygons, ``pad`` pixels wider on every side, inside ``extent``."""
    if not polygons:
        raise ValueError("no labelled nuclei")
    points = np.concatenate([p.points for p in polygons])
    x0, y0 = np.floor(points.min(0)).astype(int) - pad
    x1, y1 = np.ceil(points.max(0)).astype(int) + pad + 1
    x0, y0 = max(int(x0), 0), max(int(y0), 0)
    x1, y1 = min(int(x1), extent[0]), min(int(y1), extent[1])
    return x0, y0, x1 - x0, y1 - y0


def read_maps(path: str | Path, shape: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``inst_map`` and ``type_map`` of an ``.npz`` label, checked against the image ``shape`` and class count."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a label npz (a zip of inst_map and type_map arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = dict(npz)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable label npz ({err})") from err
    missing = {"inst_map", "type_map"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)} (found {sorted(arrays)})")
    inst, types = arrays["inst_map"], arrays["type_map"]
    if inst.shape != tuple(shape) or types.shape != tuple(shape):
        raise ValueError(f"{path}: label maps {inst.shape}/{types.shape} differ from the image size {tuple(shape)}")
    if types.size and int(types.max()) >= num_classes:
        raise ValueError(f"{path}: class id {int(types.max())} outside the class table of {num_classes} classes")
    return inst.astype(np.int32), types.astype(np.uint8)


def has_outlines(path: str | Path) -> bool:
    """True when a label file outlines nuclei (``.npz`` maps, or at least one polygon): it can train the
    segmentation network. Point labels cannot."""
    suffix = Path(path).suffix.lower()
    return suffix in MAP_SUFFIXES or (suffix in POLYGON_SUFFIXES and bool(read_polygons(path)))


def label_points(path: str | Path):
    """The labelled nuclei of a polygon or point label file as points for the cell classifier: one
    ``scripts.cells.labels.PointLabels`` (``xy`` (M, 2) pixels, a class name per point) where every polygon counts as
    its centroid (as ``scripts.cells.labels.read_qupath_geojson`` reads GeoJSON and point CSV files).

    Raises:
        ValueError: an ``.npz`` label (maps hold no class names), no labelled nucleus, or an unreadable file, naming it.
    """
    from scripts.cells.labels import PointLabels, read_points
    from shapely.geometry import Polygon

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MAP_SUFFIXES:
        raise ValueError(f"{path}: label maps give no class names to points; save point or polygon labels")
    if suffix != ".xml":
        return read_points(path)
    polygons = read_polygons(path)
    if not polygons:
        raise ValueError(f"{path}: no labelled nuclei (polygons with at least 3 points)")
    centroids = [Polygon(p.points).centroid for p in polygons]
    return PointLabels(np.array([(c.x, c.y) for c in centroids], np.float64), [p.name for p in polygons], str(path))


def validate_label(path: str | Path, extent: tuple[int, int], num_classes: int) -> None:
    """Check a label file before it is stored for an image of ``extent`` = (width, height) level-0 pixels.

    Polygon labels must parse, name a class for every nucleus, hold at least one nucleus and lie on the image
    (every polygon's bounding box overlaps it); point labels (``.csv``, or a GeoJSON of classified points) must
    parse, hold at least one point and lie on the image; ``.npz`` maps must have the image's size and ids of the
    ``num_classes`` served classes.

    Raises:
        ValueError: the problem, naming the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MAP_SUFFIXES:
        read_maps(path, (extent[1], extent[0]), num_classes)
        return
    polygons = read_polygons(path) if suffix not in POINT_SUFFIXES else []  # other suffixes: refused there
    if not polygons and suffix != ".xml":
        _validate_points(path, extent)
        return
    if not polygons:
        raise ValueError(f"{path}: no labelled nuclei (polygons with at least 3 points)")
    width, height = extent
    for i, polygon in enumerate(polygons):
        (x0, y0), (x1, y1) = polygon.points.min(0), polygon.points.max(0)
        if not np.isfinite(polygon.points).all() or x1 < 0 or y1 < 0 or x0 >= width or y0 >= height:
            raise ValueError(f"{path}: nucleus {i} ({polygon.name}) at x {x0:g}..{x1:g}, y {y0:g}..{y1:g} lies "
                             f"outside the image of {width} x {height} pixels")


def _validate_points(path: Path, extent: tuple[int, int]) -> None:
    """A point label (CSV or GeoJSON without polygons) must hold classified points on the image."""
    try:
        points = label_points(path)
    except ValueError as err:
        raise ValueError(f"{path}: no labelled nuclei (polygons with at least 3 points, or classified points): "
                         f"{str(err).replace(f'{path}: ', '')}") from err
    width, height = extent
    xy = points.xy
    outside = np.flatnonzero(~np.isfinite(xy).all(1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width)
                             | (xy[:, 1] >= height))
    if outside.size:
        k = int(outside[0])
        raise ValueError(f"{path}: point {k} ({points.labels[k]}) at x {xy[k, 0]:g}, y {xy[k, 1]:g} lies outside the "
                         f"image of {width} x {height} pixels")
