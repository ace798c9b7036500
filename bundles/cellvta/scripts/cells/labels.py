"""The labels a user has, turned into one class per embedded nucleus.

* the bundle's dataset layout: the type map gives each nucleus its class (:func:`type_map_labels`);
* point annotations, a CSV with columns ``x, y, label`` (QuPath and spreadsheet exports, ``class`` is accepted for
  ``label``), and QuPath GeoJSON with classified detections, annotations or points (:func:`read_points`);
  points are matched to nuclei by nearest centroid within a radius in micrometres (:func:`match_points`), and every
  point that matches no nucleus is reported with its reason, never dropped silently;
* the classes of the user's choosing, any number, with their colours (:class:`ClassTable`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from ..data.datasets import instance_types, read_label

__all__ = ["ClassTable", "PointLabels", "Matches", "read_points", "read_point_csv", "read_qupath_geojson",
           "match_points", "type_map_labels"]


@dataclass
class ClassTable:
    """The classifier's classes: names (index = class id, no background) and RGB colours (0-255)."""

    names: list[str]
    colours: list[tuple[int, int, int]]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.names}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"class names repeat: {self.names}")
        if len(self.colours) != len(self.names):
            raise ValueError(f"{len(self.names)} classes but {len(self.colours)} colours")
        self.colours = [tuple(int(c) for c in rgb) for rgb in self.colours]
        if any(len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) for rgb in self.colours):
            raise ValueError(f"colours must be RGB triples in 0..255, got {self.colours}")

    @classmethod
    def from_config(cls, classes: list) -> ClassTable:
        """From ``[{name: ..., colour: [r, g, b]}, ...]`` (``configs/classifier.yaml``)."""
        return cls([str(c["name"]) for c in classes], [tuple(c["colour"]) for c in classes])

    def to_config(self) -> list[dict]:
        return [{"name": n, "colour": list(c)} for n, c in zip(self.names, self.colours)]

    def encode(self, labels: list[str], source: str) -> np.ndarray:
        """(N,) int64 class ids of ``labels``; ValueError naming ``source`` and the unknown labels."""
        index = {n: i for i, n in enumerate(self.names)}
        unknown = sorted({lab for lab in labels if lab not in index})
        if unknown:
            raise ValueError(f"{source}: unknown class(es) {unknown}; the classifier's classes are {self.names}")
        return np.array([index[lab] for lab in labels], dtype=np.int64)


@dataclass
class PointLabels:
    """Labelled points of one image: ``xy`` (M, 2) float64 pixels, ``labels`` M class names, ``skipped`` the
    features of the file that carry no class (reported, not used)."""

    xy: np.ndarray
    labels: list[str]
    source: str
    skipped: int = 0


def read_point_csv(path: str | Path, scale: float = 1.0) -> PointLabels:
    """Read ``x, y, label`` rows (header required, case-insensitive; ``class`` may name the label column).

    Args:
        scale: multiplies the coordinates into pixels (``1 / mpp`` for a CSV in micrometres).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: point file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty point file (expected a header 'x,y,label' and one row per point)")
    header = [c.strip().lower() for c in rows[0]]
    label_col = "label" if "label" in header else "class"
    if "x" not in header or "y" not in header or label_col not in header:
        raise ValueError(f"{path}: header {rows[0]} lacks the columns x, y and label")
    ix, iy, il = header.index("x"), header.index("y"), header.index(label_col)
    xy, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        try:
            xy.append((float(row[ix]) * scale, float(row[iy]) * scale))
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}: line {line}: x, y must be numbers ({row})") from e
        label = row[il].strip() if il < len(row) else ""
        if not label:
            raise ValueError(f"{path}: line {line}: empty label")
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no points after the header")
    return PointLabels(np.asarray(xy, np.float64).reshape(-1, 2), labels, str(path))


def _feature_class(props: dict) -> str | None:
    cls = (props or {}).get("classification")
    if isinstance(cls, str):
        return cls or None
    if isinstance(cls, dict):
        if cls.get("name"):
            return str(cls["name"])
        if cls.get("names"):
            return ": ".join(map(str, cls["names"]))
    return None


def read_qupath_geojson(path: str | Path, scale: float = 1.0) -> PointLabels:
    """Read QuPath GeoJSON (a FeatureCollection, a list of features or one feature): each classified Point is a
    point, each MultiPoint its points, each (Multi)Polygon its centroid. The class is
    ``properties.classification.name`` (or ``names`` joined by ``": "``); unclassified features are counted in
    ``skipped``."""
    from shapely.geometry import shape

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GeoJSON file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else (
        data if isinstance(data, list) else [data])
    xy, labels, skipped = [], [], 0
    for k, feat in enumerate(features or []):
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            raise ValueError(f"{path}: feature {k} has no geometry")
        label = _feature_class(feat.get("properties", {}))
        if label is None:
            skipped += 1
            continue
        geom = feat["geometry"]
        try:
            if geom.get("type") == "Point":
                pts = [geom["coordinates"][:2]]
            elif geom.get("type") == "MultiPoint":
                pts = [c[:2] for c in geom["coordinates"]]
            else:
                c = shape(geom).centroid
                pts = [(c.x, c.y)]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: feature {k}: unreadable {geom.get('type')} geometry ({e})") from e
        xy += [(float(x) * scale, float(y) * scale) for x, y in pts]
        labels += [label] * len(pts)
    if not labels:
        raise ValueError(f"{path}: no classified feature ({skipped} unclassified)")
    return PointLabels(np.asarray(xy, np.float64).reshape(-1, 2), labels, str(path), skipped)


def read_points(path: str | Path, scale: float = 1.0) -> PointLabels:
    """A point CSV (``.csv``) or QuPath GeoJSON (``.geojson``/``.json``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return read_point_csv(path, scale)
    if suffix in (".geojson", ".json"):
        return read_qupath_geojson(path, scale)
    raise ValueError(f"{path}: unknown label file type {suffix!r} (expected .csv, .geojson or .json)")


@dataclass
class Matches:
    """Points matched to nuclei: ``cell`` (K,) row in the centroid array, ``point`` (K,) row in the points,
    ``labels`` K names; ``unmatched`` one dict per other point (``point``, ``x``, ``y``, ``label``, ``reason``)."""

    cell: np.ndarray
    point: np.ndarray
    labels: list[str]
    unmatched: list[dict] = field(default_factory=list)


def match_points(points: PointLabels, centroids: np.ndarray, radius_px: float,
                 image_size: tuple[int, int] | None = None) -> Matches:
    """Give each point the nearest nucleus centroid within ``radius_px`` (inclusive).

    Ties between nuclei at the same distance go to the lower row; a nucleus claimed by several points keeps the
    nearest (ties: the earlier point), the others are unmatched. ``image_size`` (H, W): points outside it are an
    error naming the file.

    Args:
        centroids: (N, 2) nucleus centres (x, y) in pixels of the same image.
    """
    xy = points.xy
    if image_size is not None:
        h, w = image_size
        outside = np.flatnonzero((xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h))
        if outside.size:
            raise ValueError(f"{points.source}: {outside.size} point(s) outside the {w}x{h} image, first at "
                             f"x={xy[outside[0], 0]:g}, y={xy[outside[0], 1]:g}")
    n = len(centroids)
    cell = np.full(len(xy), -1, np.int64)
    dist = np.full(len(xy), np.inf)
    if n:
        k = min(2, n)
        # scipy keeps neighbours strictly nearer than the bound: the next float makes the radius inclusive
        bound = np.nextafter(radius_px, np.inf)
        d, i = cKDTree(np.asarray(centroids, np.float64)).query(xy, k=k, distance_upper_bound=bound)
        d, i = d.reshape(len(xy), k), i.reshape(len(xy), k)
        cell = i[:, 0].copy()
        if k == 2:
            tie = (d[:, 0] == d[:, 1]) & (i[:, 1] < i[:, 0])
            cell[tie] = i[tie, 1]
        dist = d[:, 0]
        cell[~np.isfinite(dist)] = -1
    order = np.lexsort((np.arange(len(xy)), dist))
    taken: dict[int, int] = {}
    unmatched = []
    for p in order:
        c = int(cell[p])
        reason = None
        if c < 0:
            reason = f"no nucleus centroid within {radius_px:g} px"
        elif c in taken:
            reason = f"nucleus {c} already matched to the nearer point {taken[c]}"
        if reason:
            unmatched.append({"point": int(p), "x": float(xy[p, 0]), "y": float(xy[p, 1]),
                              "label": points.labels[p], "reason": reason})
        else:
            taken[c] = int(p)
    kept = np.array(sorted(taken.values()), np.int64)
    unmatched.sort(key=lambda u: u["point"])
    return Matches(cell[kept], kept, [points.labels[p] for p in kept], unmatched)


def type_map_labels(ids: np.ndarray, label_path: str | Path, class_names: list[str]) -> list[str | None]:
    """The dataset-layout class name of each nucleus id by the project's type vote (None when no pixel of the
    nucleus has a foreground class).

    Args:
        ids: (N,) instance ids (of the label file's ``inst_map``).
        class_names: the dataset's classes, index = class id, 0 background.
    """
    inst, types = read_label(label_path, "inst_map"), read_label(label_path, "type_map")
    known, cls = instance_types(inst, types, len(class_names))
    table = dict(zip(known.tolist(), cls.tolist()))
    missing = [int(i) for i in ids if int(i) not in table]
    if missing:
        raise ValueError(f"{label_path}: nucleus ids {missing[:5]} of the embeddings are not in its instance map")
    return [class_names[table[int(i)]] if table[int(i)] > 0 else None for i in ids]
