"""Dataset layout of the bundle: reading, writing and listing samples.

Every dataset the bundle trains or evaluates on lives in one folder::

    <root>/dataset.json           description of the dataset (see below)
    <root>/images/<name>.png      RGB uint8 tile, H x W x 3
    <root>/labels/<name>.npz      ``inst_map`` int32 (H, W), 0 background, 1..N unique nucleus ids
                                  ``type_map`` uint8 (H, W), 0 background, 1..C-1 class of each nucleus

``dataset.json``::

    {
      "name": "consep",
      "classes": ["background", "other", "inflammatory", ...],   # index = class id, 0 is background
      "tissues": ["colon"],                                       # index = tissue id
      "magnification": 40,
      "samples": [
        {"name": "train_1_000", "split": "train", "tissue": 0, "group": "train_1",
         "cell_counts": [0, 3, 12, 5, 9]},                         # nuclei per class id (index 0 unused)
        ...
      ]
    }

``split`` is a free string (``train``/``val``/``test``, or ``fold1``.. for PanNuke); ``group`` is the
unit that must not be split across train and test (patient, source tile). ``scripts.data.prepare`` writes
this layout from the public datasets, from a folder of the user's own images, or synthetic demo data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from monai.utils import optional_import

from ..files import atomic_path, write_text_atomic
from ..nuclei.primitives import class_histogram, vote_types
from ..nuclei.primitives import relabel_sequential as relabel_sequential  # the converters' relabelling

tifffile, _has_tifffile = optional_import("tifffile")

DATASET_JSON = "dataset.json"
IMAGE_DIR = "images"
LABEL_DIR = "labels"
_TIFF_SUFFIXES = {".tif", ".tiff"}


@dataclass
class DatasetInfo:
    """Content of ``dataset.json``: class and tissue names, magnification and the sample table."""

    name: str
    classes: list[str]
    tissues: list[str]
    magnification: int
    samples: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of nuclear classes, background included."""
        return len(self.classes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": self.classes,
            "tissues": self.tissues,
            "magnification": self.magnification,
            "samples": self.samples,
        }


def read_info(root: str | Path) -> DatasetInfo:
    """Read and check ``<root>/dataset.json``."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset description not found (write it with scripts.data.prepare)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = {"classes", "tissues", "magnification", "samples"} - set(raw)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    if not raw["classes"] or raw["classes"][0].lower() != "background":
        raise ValueError(f"{path}: 'classes' must start with 'background' (class id 0), got {raw['classes'][:1]}")
    if not raw["tissues"]:
        raise ValueError(f"{path}: 'tissues' must name at least one tissue")
    return DatasetInfo(
        name=str(raw.get("name", Path(root).name)),
        classes=list(raw["classes"]),
        tissues=list(raw["tissues"]),
        magnification=int(raw["magnification"]),
        samples=list(raw["samples"]),
    )


def save_class_table(info: DatasetInfo, model_dir: str | Path) -> Path:
    """Write ``<model_dir>/dataset.json``: the class and tissue names and magnification of ``info``, no samples.

    ``read_info(model_dir)`` reads it back, so inference and export configs point their
    ``dataset_info`` at the model folder.
    """
    table = {**info.to_json(), "samples": []}
    return write_text_atomic(Path(model_dir) / DATASET_JSON, json.dumps(table, indent=1))


def class_names(root: str | Path, include_background: bool = True) -> list[str]:
    """Class names of the dataset at ``root``; index = class id."""
    names = read_info(root).classes
    return names if include_background else names[1:]


def tissue_names(root: str | Path) -> list[str]:
    """Tissue names of the dataset at ``root``; index = tissue id."""
    return read_info(root).tissues


def dataset_list(root: str | Path, split: str | Sequence[str] | None = None) -> list[dict]:
    """List the samples of one or several splits as dicts for MONAI datasets.

    Args:
        root: dataset folder in the layout of this module.
        split: a split name, a list of names (e.g. ``["fold1", "fold2"]``), or None for all samples.

    Returns:
        one dict per sample with ``image`` (png path), ``inst_map`` and ``type_map`` (the same npz path,
        read by key), ``tissue`` (int), ``name`` (str), ``split`` and ``cell_counts`` (list of int, per class id).
    """
    root = Path(root)
    info = read_info(root)
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    known = {s["split"] for s in info.samples}
    if wanted is not None and not wanted <= known:
        raise ValueError(f"{root / DATASET_JSON}: unknown split(s) {sorted(wanted - known)}; known: {sorted(known)}")
    items = []
    for s in info.samples:
        if wanted is not None and s["split"] not in wanted:
            continue
        label = str(root / LABEL_DIR / f"{s['name']}.npz")
        items.append(
            {
                "image": str(root / IMAGE_DIR / f"{s['name']}.png"),
                "inst_map": label,
                "type_map": label,
                "tissue": int(s.get("tissue", 0)),
                "name": s["name"],
                "split": s["split"],
                "cell_counts": list(s.get("cell_counts", [])),
            }
        )
    return items


def as_rgb_uint8(image: np.ndarray, source: str) -> np.ndarray:
    """Check an image is RGB uint8 (H, W, 3); RGBA (H, W, 4) is converted by dropping the alpha channel.

    Raises ValueError naming ``source`` for grayscale, other channel counts or other dtypes.
    """
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f"{source}: grayscale image {image.shape}, expected RGB (H, W, 3)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{source}: image of shape {image.shape}, expected RGB (H, W, 3) or RGBA (H, W, 4)")
    if image.dtype != np.uint8:
        raise ValueError(f"{source}: image dtype {image.dtype}, expected uint8 (8-bit RGB)")
    return np.ascontiguousarray(image[..., :3])


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB uint8 image (H, W, 3) from PNG/JPEG/TIFF; RGBA loses its alpha channel."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        if not _has_tifffile:
            raise ImportError(f"{path}: reading TIFF needs the 'tifffile' package")
        image = tifffile.imread(path)
    else:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        if image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return as_rgb_uint8(image, str(path))


def image_digest(image: np.ndarray) -> str:
    """SHA-256 (hex) of an image's pixels and shape: the same picture under any name, path or file format has
    the same digest, and a changed one (re-cropped, re-normalised) another."""
    pixels = np.ascontiguousarray(image)
    return hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode() + pixels.tobytes()).hexdigest()


def image_digests(items: Iterable[dict]) -> dict[str, str]:
    """``{name: image_digest}`` of the images of dataset items (:func:`dataset_list`), reading each."""
    return {item["name"]: image_digest(read_image(item["image"])) for item in items}


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image ``(H, W, 3)`` as PNG, atomically; a failed write raises naming the file."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: could not write the PNG")


def read_label(path: str | Path, key: str) -> np.ndarray:
    """Read ``inst_map`` or ``type_map`` (H, W) from a label npz of the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    with np.load(path) as z:
        if key not in z:
            raise ValueError(f"{path}: no '{key}' array (found {sorted(z.files)})")
        return z[key]


def check_labels(
    image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, num_classes: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check a sample's label maps against its image and class table.

    Args:
        image: (H, W, 3) uint8.
        inst_map: (H, W) integer instance ids, 0 background.
        type_map: (H, W) integer class ids in [0, num_classes).
        num_classes: number of classes including background.
        source: file or sample name used in error messages.

    Returns:
        ``inst_map`` as int32 and ``type_map`` as uint8.
    """
    for key, arr in (("instance map", inst_map), ("type map", type_map)):
        if arr.shape != image.shape[:2]:
            raise ValueError(f"{source}: {key} of shape {arr.shape} differs from image size {image.shape[:2]}")
        if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{source}: {key} has non-integer values (dtype {arr.dtype})")
    if inst_map.min() < 0 or inst_map.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{source}: instance ids out of range [0, 2**31)")
    bad = np.setdiff1d(np.unique(type_map), np.arange(num_classes))
    if bad.size:
        raise ValueError(f"{source}: unknown class ids {bad.tolist()} in type map (known 0..{num_classes - 1})")
    return inst_map.astype(np.int32), type_map.astype(np.uint8)


def instance_types(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (N,) of the instances in (H, W) ``inst_map`` and their class (N,) by the project's type vote
    (:func:`scripts.nuclei.primitives.vote_types`: background only when no pixel has a foreground class)."""
    fg = np.flatnonzero(inst_map)
    labels = inst_map.ravel()[fg]
    ids = np.unique(labels)
    counts = class_histogram(labels, type_map.ravel()[fg].astype(np.int64), num_classes, ids)
    return ids, vote_types(counts)


def cell_counts(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> list[int]:
    """Number of nuclei per class id (length ``num_classes``; index 0 counts nuclei typed background)."""
    _, types = instance_types(inst_map, type_map, num_classes)
    return np.bincount(types, minlength=num_classes).astype(int).tolist()


class DatasetWriter:
    """Write samples into the layout of this module and ``dataset.json`` on :meth:`close`.

    Args:
        root: output folder (created).
        name: dataset name.
        classes: class names, index 0 must be ``background``.
        tissues: tissue names.
        magnification: objective magnification of the tiles (20 or 40).
    """

    def __init__(
        self, root: str | Path, name: str, classes: Sequence[str], tissues: Sequence[str], magnification: int
    ) -> None:
        if not classes or classes[0].lower() != "background":
            raise ValueError(f"classes must start with 'background', got {list(classes)[:1]}")
        self.root = Path(root)
        (self.root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / LABEL_DIR).mkdir(parents=True, exist_ok=True)
        self.info = DatasetInfo(name, list(classes), list(tissues), int(magnification))
        self._names: set[str] = set()

    def add(
        self,
        name: str,
        image: np.ndarray,
        inst_map: np.ndarray,
        type_map: np.ndarray,
        split: str,
        tissue: int = 0,
        group: str | None = None,
        source: str | None = None,
    ) -> None:
        """Check and write one sample: image (H, W, 3|4) uint8, inst_map and type_map (H, W) integers."""
        source = source or name
        if name in self._names:
            raise ValueError(f"{source}: duplicate sample name '{name}'")
        if not 0 <= tissue < len(self.info.tissues):
            raise ValueError(f"{source}: tissue id {tissue} outside 0..{len(self.info.tissues) - 1}")
        image = as_rgb_uint8(image, source)
        inst_map, type_map = check_labels(image, inst_map, type_map, self.info.num_classes, source)
        write_png(self.root / IMAGE_DIR / f"{name}.png", image)
        with atomic_path(self.root / LABEL_DIR / f"{name}.npz") as tmp:
            np.savez_compressed(tmp, inst_map=inst_map, type_map=type_map)
        self._names.add(name)
        self.info.samples.append(
            {
                "name": name,
                "split": split,
                "tissue": int(tissue),
                "group": group or name,
                "cell_counts": cell_counts(inst_map, type_map, self.info.num_classes),
            }
        )

    def close(self) -> Path:
        """Write ``dataset.json`` and return its path."""
        return write_text_atomic(self.root / DATASET_JSON, json.dumps(self.info.to_json(), indent=1))

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def split_groups(groups: Iterable[str], fractions: dict[str, float], seed: int = 19) -> dict[str, str]:
    """Assign whole groups (patients, source tiles) to splits with the given fractions.

    Args:
        groups: group name of every sample (repeats allowed).
        fractions: split name -> fraction of the groups; fractions must sum to 1.
        seed: seed of the shuffle.

    Returns:
        group name -> split name.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = np.round(np.cumsum(list(fractions.values())) * len(unique)).astype(int)
    result, start = {}, 0
    for split, stop in zip(fractions, bounds):
        for i in order[start:stop]:
            result[unique[i]] = split
        start = stop
    return result


def patch_origins(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets covering ``size`` with windows ``patch`` every ``stride``; the last is flush with the end."""
    if size <= patch:
        return [0]
    origins = list(range(0, size - patch + 1, stride))
    if origins[-1] != size - patch:
        origins.append(size - patch)
    return origins
