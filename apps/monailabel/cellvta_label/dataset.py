"""The datastore's labelled images -> a dataset folder in the bundle's layout (``scripts.data.datasets``)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .labels import MAP_SUFFIXES, NucleusPolygon, bounds, rasterize, read_maps, read_polygons
from .regions import image_extent, is_slide, read_region


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image of the datastore: ``image`` (tile or slide) and its ``label`` file."""

    image: Path
    label: Path

    @property
    def name(self) -> str:
        return self.image.stem


def label_names(items: Sequence[LabelledImage]) -> set[str]:
    """Every class name used by the polygon labels of ``items``."""
    names: set[str] = set()
    for item in items:
        if item.label.suffix.lower() not in MAP_SUFFIXES:
            names.update(p.name for p in read_polygons(item.label))
    return names


def _sample(item: LabelledImage, classes: Sequence[str], pad: int, max_side: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``(H, W, 3)`` uint8, instance and type maps ``(H, W)`` of one labelled image.

    Polygon labels of a slide cover the polygons' bounding box plus ``pad`` pixels (at most ``max_side`` per side);
    of a tile, the whole tile.
    """
    if item.label.suffix.lower() in MAP_SUFFIXES:
        image, _ = read_region(item.image)
        inst, types = read_maps(item.label, image.shape[:2], len(classes))
        return image, inst, types
    polygons: list[NucleusPolygon] = read_polygons(item.label)
    if not polygons:
        raise ValueError(f"{item.label}: no labelled nuclei")
    if is_slide(item.image) and max(image_extent(item.image)) > max_side:
        x, y, w, h = bounds(polygons, pad, image_extent(item.image))
        if max(w, h) > max_side:
            raise ValueError(f"{item.label}: the labelled area ({w} x {h} pixels) is larger than {max_side} pixels "
                             "per side; save labels of smaller regions")
        image, _ = read_region(item.image, (x, y), (w, h))
        origin = (x, y)
    else:
        image, _ = read_region(item.image)
        origin = (0, 0)
    inst, types = rasterize(polygons, image.shape[:2], classes, origin)
    return image, inst, types


def split(names: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Names per split: ``val`` gets ``round(val_fraction * n)`` images (at least one), ``train`` the rest;
    a single image is used for both."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    if len(order) == 1:
        return {"train": order, "val": order}
    n_val = min(max(1, round(val_fraction * len(order))), len(order) - 1)
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def patches(image: np.ndarray, inst: np.ndarray, types: np.ndarray, size: int
            ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cut a sample into ``size`` x ``size`` patches (the network's training size) covering it, the last row and
    column flush with its end; a side shorter than ``size`` is padded (white image, no nuclei).

    Returns:
        ``(image (size, size, 3), inst_map, type_map)`` per patch, instance ids made consecutive.
    """
    from scripts.data.datasets import patch_origins, relabel_sequential

    pad_h, pad_w = max(size - image.shape[0], 0), max(size - image.shape[1], 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
        inst = np.pad(inst, ((0, pad_h), (0, pad_w)))
        types = np.pad(types, ((0, pad_h), (0, pad_w)))
    out = []
    for top in patch_origins(image.shape[0], size, size):
        for left in patch_origins(image.shape[1], size, size):
            window = (slice(top, top + size), slice(left, left + size))
            out.append((image[window], relabel_sequential(inst[window]), types[window]))
    return out


def write_dataset(items: Sequence[LabelledImage], out: Path, classes: Sequence[str], tissues: Sequence[str],
                  magnification: int, patch_size: int, val_fraction: float, seed: int, pad: int = 32,
                  max_side: int = 4096) -> dict[str, list[str]]:
    """Write ``items`` cut into ``patch_size`` patches as a dataset of the bundle's layout (splits ``train`` and
    ``val``, by image) to ``out``.

    Every sample gets tissue 0 (the datastore has no tissue labels; the run gives the tissue loss no weight).

    Returns:
        The image names per split.
    """
    from scripts.data.datasets import DatasetWriter

    by_name: Mapping[str, LabelledImage] = {item.name: item for item in items}
    if len(by_name) != len(items):
        raise ValueError(f"labelled images with the same name: {sorted(i.name for i in items)}")
    splits = split(list(by_name), val_fraction, seed)
    with DatasetWriter(out, "monailabel", classes, tissues, magnification) as writer:
        for split_name, names in splits.items():
            for name in names:
                item = by_name[name]
                prefix = f"{name}__val" if split_name == "val" and name in splits["train"] else name
                for k, (image, inst, types) in enumerate(patches(*_sample(item, classes, pad, max_side), patch_size)):
                    writer.add(f"{prefix}_{k:03d}", image, inst, types, split_name, group=name,
                               source=str(item.label))
    return splits
