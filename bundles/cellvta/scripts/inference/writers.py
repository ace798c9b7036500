"""Writers of per-image nuclei: QuPath GeoJSON, instance/type maps and overlay PNGs, written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import shapely

from ..files import atomic_path, write_text_atomic
from ..nuclei.postprocess import Nuclei

# class colours (RGB) by class index; background first
PALETTE = [(0, 0, 0), (255, 0, 0), (34, 221, 77), (35, 92, 236), (254, 255, 0), (255, 159, 68), (35, 255, 255),
           (255, 0, 255), (128, 0, 128), (0, 128, 128)]


Colours = Sequence[Sequence[int]] | None


def class_color(index: int, colours: Colours = None) -> tuple[int, int, int]:
    """RGB colour of class ``index``: ``colours[index]`` (a cell classifier's, background first) when given,
    else ``PALETTE``'s (cycling after its end)."""
    if colours is not None and index < len(colours):
        return tuple(int(c) for c in colours[index])
    return PALETTE[index] if index < len(PALETTE) else PALETTE[1 + (index - 1) % (len(PALETTE) - 1)]


def class_name(class_names: Sequence[str], index: int) -> str:
    """Name of class ``index`` (``class_<index>`` beyond the table)."""
    return class_names[index] if index < len(class_names) else f"class_{index}"


def closed_rings(xy: np.ndarray, start: np.ndarray, scale: float = 1.0, offset: Sequence[float] = (0.0, 0.0)
                 ) -> list[np.ndarray]:
    """Valid closed polygon rings of contours, scaled then shifted.

    A traced contour runs twice through a one-pixel neck, which makes a self-touching ring that GIS tools
    reject; such a ring is replaced by the outline of the largest valid part of its polygon.

    Args:
        xy: (M, 2) ``(x, y)`` vertices of all contours, one after the other.
        start: (N + 1,) contour ``i`` is ``xy[start[i]:start[i+1]]`` (at least 3 vertices).
        scale, offset: ``xy * scale + offset``.

    Returns:
        N float64 arrays (K + 1, 2), first vertex repeated at the end.
    """
    if len(start) < 2:
        return []
    coords = xy.astype(np.float64) * scale + np.asarray(offset, dtype=np.float64)
    counts = np.diff(start)
    firsts = start[:-1]
    closing = np.cumsum(counts)  # insert each ring's first vertex after its last
    coords = np.insert(coords, closing, coords[firsts], axis=0)
    bounds = np.concatenate([[0], closing + np.arange(1, counts.size + 1)])
    polygons = shapely.polygons(shapely.linearrings(coords, indices=np.repeat(np.arange(counts.size), counts + 1)))
    rings = [coords[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    for i in np.flatnonzero(~shapely.is_valid(polygons)):
        pieces = shapely.get_parts(shapely.get_parts(shapely.make_valid(polygons[i])))  # collections of multi-parts
        parts = [g for g in pieces if g.geom_type == "Polygon"]
        if parts:
            rings[i] = np.asarray(max(parts, key=lambda g: g.area).exterior.coords)
    return rings


def detection_feature(ring: np.ndarray, cls: int, class_names: Sequence[str], measurements: dict[str, float],
                      colours: Colours = None) -> dict:
    """A QuPath detection Feature: the closed polygon ``ring`` ((K + 1, 2) x, y), its class (colour from
    ``colours``, see :func:`class_color`) and measurements."""
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring.round(2).tolist()]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": class_name(class_names, cls), "color": list(class_color(cls, colours))},
            "measurements": measurements,
        },
    }


def nuclei_features(nuclei: Nuclei, class_names: Sequence[str], offset: tuple[float, float] = (0.0, 0.0),
                    scale: float = 1.0, colours: Colours = None) -> list[dict]:
    """One QuPath detection Feature per nucleus: closed polygon, classification and measurements.

    Args:
        nuclei: post-processing output.
        class_names: all class names, background first.
        offset: ``(x, y)`` added to every coordinate after scaling (tile origin in level-0 pixels).
        scale: multiplier of the coordinates (level-0 pixels per pixel of the analysed image).
        colours: class colours, background first (:func:`class_color`).
    """
    lengths = [len(c) for c in nuclei.contours]
    xy = np.concatenate(nuclei.contours) if lengths else np.zeros((0, 2))
    rings = closed_rings(xy, np.concatenate([[0], np.cumsum(lengths)]), scale, offset)
    features = []
    for i, ring in enumerate(rings):
        cx, cy = (nuclei.centroids[i] * scale + np.asarray(offset)).tolist()
        measurements = {"type_probability": round(float(nuclei.type_probs[i]), 4),
                        "centroid_x": round(cx, 2), "centroid_y": round(cy, 2)}
        features.append(detection_feature(ring, int(nuclei.types[i]), class_names, measurements, colours))
    return features


def write_geojson(path: Path, nuclei: Nuclei, class_names: Sequence[str], colours: Colours = None) -> None:
    """A GeoJSON FeatureCollection of the nuclei (QuPath: File > Import objects)."""
    features = nuclei_features(nuclei, class_names, colours=colours)
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}))


def overlay(image: np.ndarray, nuclei: Nuclei, colours: Colours = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB image with every nucleus outlined in its class colour (:func:`class_color`)."""
    canvas = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    for contour, cls in zip(nuclei.contours, nuclei.types):
        cv2.polylines(canvas, [contour.reshape(-1, 1, 2).astype(np.int32)], True, class_color(int(cls), colours), 1)
    return canvas


def write_maps(path: Path, inst_map: np.ndarray, type_map: np.ndarray, tissue: np.ndarray | None = None) -> None:
    """``inst_map`` (int32) and ``type_map`` (uint8) of one image as a compressed ``.npz``, with the (T,) tissue
    probabilities as ``tissue_probabilities`` (float32) when given."""
    extra = {} if tissue is None else {"tissue_probabilities": np.asarray(tissue, np.float32)}
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, inst_map=inst_map.astype(np.int32), type_map=type_map.astype(np.uint8), **extra)
