"""Nuclei of one request as MONAI Label results: polygons per class for the ASAP (QuPath) and DSA writers,
and the bundle's own GeoJSON features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .regions import Region


def select(nuclei, keep: np.ndarray):
    """The nuclei where ``keep`` (``(N,)`` bool) is True, as a new ``scripts.nuclei.postprocess.Nuclei``."""
    from scripts.nuclei.postprocess import Nuclei

    index = np.flatnonzero(keep)
    return Nuclei(
        ids=nuclei.ids[index],
        types=nuclei.types[index],
        type_probs=nuclei.type_probs[index],
        centroids=nuclei.centroids[index],
        bboxes=nuclei.bboxes[index],
        contours=[nuclei.contours[i] for i in index],
    )


def in_core(nuclei, region: Region):
    """The nuclei whose centroid lies in the requested area of ``region`` (each nucleus of a slide is found in
    the context of every neighbouring tile but kept by exactly one)."""
    return select(nuclei, region.contains(nuclei.centroids) if len(nuclei) else np.zeros(0, bool))


def _to_image(points: np.ndarray, region: Region) -> list[list[float]] | list[list[int]]:
    """``(K, 2)`` (x, y) in pixels read -> level-0 image coordinates (integers when they are whole)."""
    mapped = points.astype(np.float64) * region.downsample + np.asarray(region.origin)
    if np.all(mapped == np.round(mapped)):
        return mapped.astype(np.int64).tolist()
    return np.round(mapped, 2).tolist()


def monai_label_annotation(nuclei, region: Region, class_names: Sequence[str],
                           colours: Sequence[Sequence[int]] | None = None) -> dict:
    """The ``annotation`` MONAI Label's ASAP/DSA writers read: one element per class with a contour per nucleus, the
    valid outline of the GeoJSON output (class colours: ``colours``, background first, or the bundle's palette).

    Returns:
        ``{"location", "size", "elements": [{"label", "contours"}], "labels": {name: [r, g, b]}}`` in level-0
        image coordinates.
    """
    from scripts.inference.writers import class_color, closed_rings

    lengths = [len(c) for c in nuclei.contours]
    xy = np.concatenate(nuclei.contours) if lengths else np.zeros((0, 2), np.int32)
    # the rings of the GeoJSON features: a contour touching itself becomes the largest valid part of its polygon
    rings = closed_rings(xy, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    elements: dict[int, list] = {}
    for ring, cls in zip(rings, nuclei.types):
        elements.setdefault(int(cls), []).append(_to_image(ring[:-1], region))
    names = {cls: class_names[cls] if cls < len(class_names) else f"class_{cls}" for cls in elements}
    left, top, width, height = region.core
    return {
        "location": [round(region.origin[0] + left * region.downsample),
                     round(region.origin[1] + top * region.downsample)],
        "size": [width, height],
        "elements": [{"label": names[cls], "contours": elements[cls]} for cls in sorted(elements)],
        "labels": {names[cls]: list(class_color(cls, colours)) for cls in sorted(elements)},
    }


def geojson(nuclei, region: Region, class_names: Sequence[str], colours: Sequence[Sequence[int]] | None = None
            ) -> dict:
    """The nuclei as the bundle's QuPath GeoJSON FeatureCollection (``scripts.inference.writers.nuclei_features``), in
    level-0 image coordinates."""
    from scripts.inference.writers import nuclei_features

    features = nuclei_features(nuclei, class_names, offset=region.origin, scale=region.downsample, colours=colours)
    return {"type": "FeatureCollection", "features": features}
