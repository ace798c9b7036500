"""Writers of per-image nuclei: QuPath GeoJSON, instance/type maps and overlay PNGs, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .postprocess import Nuclei

# class colours (RGB) by class index; background first
PALETTE = [(0, 0, 0), (255, 0, 0), (34, 221, 77), (35, 92, 236), (254, 255, 0), (255, 159, 68), (35, 255, 255),
           (255, 0, 255), (128, 0, 128), (0, 128, 128)]


def class_color(index: int) -> tuple[int, int, int]:
    """RGB colour of class ``index`` (cycles through ``PALETTE`` after its end)."""
    return PALETTE[index] if index < len(PALETTE) else PALETTE[1 + (index - 1) % (len(PALETTE) - 1)]


def replace_atomically(tmp: Path, path: Path) -> None:
    """Move a finished temporary file over ``path`` in one step."""
    os.replace(tmp, path)


def nuclei_features(nuclei: Nuclei, class_names: Sequence[str], offset: tuple[float, float] = (0.0, 0.0),
                    scale: float = 1.0) -> list[dict]:
    """One QuPath detection Feature per nucleus: closed polygon, classification and measurements.

    Args:
        nuclei: post-processing output.
        class_names: all class names, background first.
        offset: ``(x, y)`` added to every coordinate after scaling (tile origin in level-0 pixels).
        scale: multiplier of the coordinates (level-0 pixels per pixel of the analysed image).
    """
    features = []
    for i in range(len(nuclei)):
        ring = nuclei.contours[i].astype(np.float64) * scale + np.asarray(offset)
        ring = np.vstack([ring, ring[:1]]).round(2).tolist()
        cls = int(nuclei.types[i])
        name = class_names[cls] if cls < len(class_names) else f"class_{cls}"
        cx, cy = (nuclei.centroids[i] * scale + np.asarray(offset)).tolist()
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": list(class_color(cls))},
                "measurements": {"type_probability": round(float(nuclei.type_probs[i]), 4),
                                 "centroid_x": round(cx, 2), "centroid_y": round(cy, 2)},
            },
        })
    return features


def write_geojson(path: Path, nuclei: Nuclei, class_names: Sequence[str]) -> None:
    """A GeoJSON FeatureCollection of the nuclei (QuPath: File > Import objects)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": nuclei_features(nuclei, class_names)}))
    replace_atomically(tmp, path)


def overlay(image: np.ndarray, nuclei: Nuclei) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB image with every nucleus outlined in its class colour."""
    canvas = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    for contour, cls in zip(nuclei.contours, nuclei.types):
        cv2.polylines(canvas, [contour.reshape(-1, 1, 2).astype(np.int32)], True, class_color(int(cls)), 1)
    return canvas


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    replace_atomically(tmp, path)


def write_maps(path: Path, inst_map: np.ndarray, type_map: np.ndarray) -> None:
    """``inst_map`` (int32) and ``type_map`` (uint8) of one image as a compressed ``.npz``."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, inst_map=inst_map.astype(np.int32), type_map=type_map.astype(np.uint8))
    replace_atomically(tmp, path)
