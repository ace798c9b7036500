"""Converters from the public datasets' distribution formats to the bundle's layout (see ``scripts.data.datasets``).

Command line (from ``bundles/cellvta``)::

    python -m scripts.data.prepare synthetic --out data/synthetic --n 300
    python -m scripts.data.prepare pannuke   --src PanNuke/ --out data/pannuke [--download]
    python -m scripts.data.prepare conic     --src CoNIC/ --out data/conic
    python -m scripts.data.prepare consep    --src CoNSeP/ --out data/consep
    python -m scripts.data.prepare monuseg   --src MoNuSeg/ --out data/monuseg --split train
    python -m scripts.data.prepare folder    --images imgs/ --instances inst/ [--types types/ --classes a,b] \\
        --out data/mine
    python -m scripts.data.prepare arrays    --src tiles.npz --out data/mine --classes a,b

Every converter checks its input (missing files, label size different from the image, images that
are not RGB uint8, unknown class ids) and raises an error naming the file and the problem. Label maps are
checked before anything is relabelled: non-integer values (e.g. an instance map resized with interpolation),
NaN or infinite values and negative ids are refused (:func:`label_ids`); nothing is rounded or converted.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from monai.utils import optional_import

from .datasets import DatasetWriter, as_rgb_uint8, patch_origins, read_image, relabel_sequential, split_groups

loadmat, _ = optional_import("scipy.io", name="loadmat")
tifffile, _ = optional_import("tifffile")

PANNUKE_CLASSES = ["background", "neoplastic", "inflammatory", "connective", "dead", "epithelial"]
PANNUKE_URL = "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke/fold_{fold}.zip"
CONIC_CLASSES = ["background", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"]
CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
CONSEP_MERGE = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
SYNTHETIC_CLASSES = ["background", "epithelial", "inflammatory", "connective", "dead"]
SYNTHETIC_TISSUES = ["synthetic-epithelial", "synthetic-inflamed"]


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if path.suffix == ".json" and path.is_file():
            return list(json.loads(path.read_text()))
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _with_background(classes: list[str]) -> list[str]:
    return classes if classes[0].lower() == "background" else ["background", *classes]


def _patches(
    image: np.ndarray, inst: np.ndarray, types: np.ndarray, patch_size: int | None, stride: int | None
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Cut (image, inst, types) into patches; yields (suffix, image, relabelled inst, types)."""
    if patch_size is None:
        yield "", image, relabel_sequential(inst), types
        return
    stride = stride or patch_size
    h, w = inst.shape
    k = 0
    for top in patch_origins(h, patch_size, stride):
        for left in patch_origins(w, patch_size, stride):
            win = (slice(top, top + patch_size), slice(left, left + patch_size))
            yield f"_{k:03d}", image[win], relabel_sequential(inst[win]), types[win]
            k += 1


def label_ids(arr: np.ndarray, source: str, what: str) -> np.ndarray:
    """A label map's ids as int64 after checking they are finite non-negative integers (of any numeric dtype).

    Args:
        arr: instance or class ids, any shape.
        source: the file (and index) named in errors.
        what: the kind of map named in errors, e.g. ``"instance map"``.

    Raises:
        ValueError: naming ``source``: a non-numeric dtype, NaN/infinite values, non-integer values, negative ids.
    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(f"{source}: {what} has {int((~finite).sum())} NaN or infinite values")
        fractional = arr != np.round(arr)
        if fractional.any():
            raise ValueError(f"{source}: {what} has {int(fractional.sum())} non-integer values (e.g. "
                             f"{arr[fractional].flat[0]:g}); ids must be whole numbers (resize label maps with "
                             "nearest-neighbour interpolation)")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{source}: {what} of dtype {arr.dtype}, expected integer ids")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{source}: {what} has negative ids (min {arr.min():g}); 0 is background, ids are >= 0")
    return arr.astype(np.int64)


def _read_map(path: Path) -> np.ndarray:
    """Read a 2-D label map from .npy, .npz (first array), .png or .tif."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path)
    elif suffix == ".npz":
        with np.load(path) as z:
            arr = z[z.files[0]]
    elif suffix in (".tif", ".tiff"):
        arr = tifffile.imread(path)
    else:
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ValueError(f"{path}: not a readable label image")
    if arr.ndim != 2:
        raise ValueError(f"{path}: label map of shape {arr.shape}, expected a 2-D (H, W) map")
    return arr


def synthetic(
    out: str, n: int = 300, size: int = 256, seed: int = 0, splits: Sequence[float] = (0.7, 0.15, 0.15)
) -> str:
    """Write a synthetic H&E-like demo dataset (not real tissue).

    Pink stroma with hematoxylin-coloured elliptical nuclei of four classes (epithelial: large, pale;
    inflammatory: small, round, dark; connective: elongated; dead: tiny, very dark, rare) and two
    tissues with different class mixtures. Deterministic for a given seed.

    Args:
        out: output folder.
        n: number of tiles.
        size: tile side in pixels.
        seed: random seed.
        splits: fractions of train, val and test tiles.
    """
    rng = np.random.default_rng(seed)
    n_train, n_val = round(splits[0] * n), round(splits[1] * n)
    colours = np.array([[0, 0, 0], [125, 75, 165], [55, 30, 105], [95, 55, 145], [35, 15, 60]], dtype=np.float32)
    mixtures = np.array([[0.6, 0.15, 0.2, 0.05], [0.15, 0.6, 0.2, 0.05]])
    with DatasetWriter(out, "synthetic", SYNTHETIC_CLASSES, SYNTHETIC_TISSUES, 40) as writer:
        for i in range(n):
            tissue = int(rng.integers(len(SYNTHETIC_TISSUES)))
            image, inst, types = _synthetic_tile(rng, size, mixtures[tissue], colours)
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            writer.add(f"synthetic_{i:05d}", image, inst, types, split, tissue=tissue)
    return out


def _synthetic_tile(
    rng: np.random.Generator, size: int, mixture: np.ndarray, colours: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.uint8)
    axes_by_class = {1: ((7, 11), (5, 8)), 2: ((4, 6), (4, 6)), 3: ((9, 15), (2, 4)), 4: ((2, 4), (2, 3))}
    next_id = 1
    for _ in range(int(rng.integers(15, 60))):
        cls = int(rng.choice(4, p=mixture)) + 1
        (a_lo, a_hi), (b_lo, b_hi) = axes_by_class[cls]
        a, b = int(rng.integers(a_lo, a_hi + 1)), int(rng.integers(b_lo, b_hi + 1))
        cx, cy = int(rng.integers(0, size)), int(rng.integers(0, size))
        r = max(a, b) + 1
        top, left = max(cy - r, 0), max(cx - r, 0)
        local = np.zeros((min(cy + r + 1, size) - top, min(cx + r + 1, size) - left), np.uint8)
        cv2.ellipse(local, (cx - left, cy - top), (a, b), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        window = (slice(top, top + local.shape[0]), slice(left, left + local.shape[1]))
        if local.sum() < 6 or (inst[window][local > 0] > 0).any():
            continue
        inst[window][local > 0] = next_id
        types[window][local > 0] = cls
        next_id += 1
    low = cv2.resize(rng.normal(0, 1, (size // 16, size // 16)).astype(np.float32), (size, size))
    stroma = np.array([232, 170, 205], np.float32) + low[..., None] * np.array([10, 18, 10], np.float32)
    grain = rng.normal(0, 1, (size, size)).astype(np.float32)
    nuclei = colours[types] * (1 + 0.12 * grain[..., None])
    image = np.where((types > 0)[..., None], nuclei, stroma + 6 * grain[..., None])
    image = cv2.GaussianBlur(image, (0, 0), 0.8)
    return np.clip(image, 0, 255).astype(np.uint8), inst, types


def pannuke_instances(masks: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge a PanNuke mask (H, W, 6) (five class channels of instance ids, then background) into
    an instance map with unique ids 1..N and a type map (class = channel + 1).

    Nuclei counted in the class channels and in the merged map are compared; nuclei lost to overlapping
    class channels (a later channel wins) are reported with a warning naming ``source``.
    """
    if masks.ndim != 3 or masks.shape[2] != 6:
        raise ValueError(f"{source}: PanNuke mask of shape {masks.shape}, expected (H, W, 6)")
    inst = np.zeros(masks.shape[:2], np.int32)
    types = np.zeros(masks.shape[:2], np.uint8)
    before = 0
    for c in range(5):
        channel = label_ids(masks[..., c], source, f"channel {c} of the mask")
        ids, compact = np.unique(channel, return_inverse=True)
        compact = compact.reshape(channel.shape)
        fg = channel > 0
        n = int((ids > 0).sum())
        shift = 0 if ids[0] == 0 else 1
        inst[fg] = compact[fg] + shift + before
        types[fg] = c + 1
        before += n
    after = np.unique(inst[inst > 0]).size
    if after != before:
        warnings.warn(
            f"{source}: {before} nuclei in the class channels but {after} after merging (overlaps)", stacklevel=2
        )
    return relabel_sequential(inst), types


def _find_fold_file(src: Path, filename: str, fold: int) -> Path:
    pattern = re.compile(rf"fold[ _]?{fold}\b", re.IGNORECASE)
    hits = [p for p in src.rglob(filename) if any(pattern.search(part) for part in p.parts)]
    if not hits:
        raise FileNotFoundError(f"{src}: no {filename} found in a 'fold{fold}' / 'Fold {fold}' folder")
    return min(hits, key=lambda p: len(p.parts))


def _download(url: str, folder: Path, md5: str | None) -> None:
    download_and_extract, _ = optional_import("monai.apps", name="download_and_extract")
    archive = folder / Path(url).name
    download_and_extract(url, filepath=str(archive), output_dir=str(folder), hash_val=md5, hash_type="md5")


def pannuke(
    src: str, out: str, folds: Sequence[int] = (1, 2, 3), download: bool = False, md5: dict | None = None
) -> str:
    """Convert PanNuke (``Fold k/images/foldk/{images,types}.npy`` and ``Fold k/masks/foldk/masks.npy``).

    Splits are ``fold1``, ``fold2``, ``fold3``; tissues are the sorted names found in ``types.npy``.

    Args:
        src: folder holding the fold folders (or where to download them).
        out: output folder.
        folds: fold numbers to convert.
        download: fetch ``fold_k.zip`` from the official site into ``src`` first.
        md5: fold number -> md5 of its zip, verified after download when given.
    """
    src_path = Path(src)
    if download:
        src_path.mkdir(parents=True, exist_ok=True)
        for fold in folds:
            _download(PANNUKE_URL.format(fold=fold), src_path, (md5 or {}).get(fold))
    files = {}
    for fold in folds:
        images = _find_fold_file(src_path, "images.npy", fold)
        types = images.parent / "types.npy"
        if not types.is_file():
            raise FileNotFoundError(f"{types}: tissue types of fold {fold} not found")
        files[fold] = (images, _find_fold_file(src_path, "masks.npy", fold), types)
    tissue_of = {fold: np.load(t, allow_pickle=False).astype(str) for fold, (_, _, t) in files.items()}
    tissues = sorted({str(t) for v in tissue_of.values() for t in v})
    with DatasetWriter(out, "pannuke", PANNUKE_CLASSES, tissues, 40) as writer:
        for fold, (img_file, mask_file, _) in files.items():
            images = np.load(img_file, mmap_mode="r")
            masks = np.load(mask_file, mmap_mode="r")
            if len(images) != len(masks) or len(images) != len(tissue_of[fold]):
                raise ValueError(
                    f"{img_file}: {len(images)} images, {len(masks)} masks in {mask_file}, "
                    f"{len(tissue_of[fold])} tissue types"
                )
            for i in range(len(images)):
                source = f"{img_file}[{i}]"
                image = np.asarray(images[i])
                if image.dtype != np.uint8:
                    if image.min() < 0 or image.max() > 255:
                        raise ValueError(f"{source}: values outside [0, 255] in a {image.dtype} image")
                    image = np.rint(image).astype(np.uint8)
                if masks[i].shape[:2] != image.shape[:2]:
                    raise ValueError(
                        f"{mask_file}[{i}]: mask size {masks[i].shape[:2]} differs from image {image.shape[:2]}"
                    )
                inst, types = pannuke_instances(np.asarray(masks[i]), f"{mask_file}[{i}]")
                tissue = tissues.index(str(tissue_of[fold][i]))
                writer.add(f"fold{fold}_{i:05d}", image, inst, types, f"fold{fold}", tissue, source=source)
    return out


def conic(src: str, out: str, seed: int = 19, test_fraction: float = 0.2, val_fraction: float = 0.2) -> str:
    """Convert CoNIC (``images.npy`` (N,256,256,3) uint8, ``labels.npy`` (N,256,256,2) instance + class,
    ``patch_info.csv``) at 20x, split by patient (the source image named before the last '-' of the
    patch name): ``test_fraction`` of the patients for test, then ``val_fraction`` of the rest for val.
    """
    src_path = Path(src)
    paths = [src_path / f for f in ("images.npy", "labels.npy", "patch_info.csv")]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: CoNIC file not found")
    images = np.load(paths[0], mmap_mode="r")
    labels = np.load(paths[1], mmap_mode="r")
    with paths[2].open() as f:
        rows = [r for r in csv.reader(f) if r]
    names = [r[0] for r in rows[1:]] if rows and not re.search(r"\d", rows[0][0]) else [r[0] for r in rows]
    if not len(images) == len(labels) == len(names):
        raise ValueError(f"{src_path}: {len(images)} images, {len(labels)} labels, {len(names)} patch_info rows")
    if labels.ndim != 4 or labels.shape[-1] != 2:
        raise ValueError(f"{paths[1]}: labels of shape {labels.shape}, expected (N, H, W, 2)")
    groups = [n.rsplit("-", 1)[0] for n in names]
    outer = split_groups(groups, {"train": 1 - test_fraction, "test": test_fraction}, seed)
    inner = split_groups(
        [g for g in groups if outer[g] == "train"], {"train": 1 - val_fraction, "val": val_fraction}, seed
    )
    with DatasetWriter(out, "conic", CONIC_CLASSES, ["colon"], 20) as writer:
        for i, (name, group) in enumerate(zip(names, groups)):
            split = inner.get(group, "test") if outer[group] == "train" else "test"
            inst = relabel_sequential(label_ids(labels[i, ..., 0], f"{paths[1]}[{i}]", "instance map"))
            writer.add(
                name,
                np.asarray(images[i]),
                inst,
                label_ids(labels[i, ..., 1], f"{paths[1]}[{i}]", "class map"),
                split,
                group=group,
                source=f"{paths[0]}[{i}]",
            )
    return out


def _split_dirs(src: Path) -> dict[str, Path]:
    found = {d.name.lower(): d for d in src.iterdir() if d.is_dir()} if src.is_dir() else {}
    dirs = {s: found[s] for s in ("train", "test") if s in found}
    if not dirs:
        raise FileNotFoundError(f"{src}: no Train/ or Test/ folder (CoNSeP layout: Train/Images, Train/Labels)")
    return dirs


def consep_labels(mat_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CoNSeP ``.mat`` label: ``inst_map`` and ``inst_type`` (7 labels) -> instance map and the
    HoVer-Net 4-class type map (epithelial = 3, 4; spindle-shaped = 5, 6, 7)."""
    if not mat_file.is_file():
        raise FileNotFoundError(f"{mat_file}: CoNSeP label file not found")
    mat = loadmat(str(mat_file))
    for key in ("inst_map", "inst_type"):
        if key not in mat:
            raise ValueError(f"{mat_file}: no '{key}' in the .mat file")
    inst = label_ids(mat["inst_map"], str(mat_file), "inst_map").astype(np.int32)
    inst_type = label_ids(np.asarray(mat["inst_type"]).reshape(-1), str(mat_file), "inst_type")
    if inst.max() > inst_type.size:
        raise ValueError(f"{mat_file}: instance id {inst.max()} but only {inst_type.size} entries in inst_type")
    unknown = sorted(set(inst_type.tolist()) - set(CONSEP_MERGE))
    if unknown:
        raise ValueError(f"{mat_file}: unknown CoNSeP class ids {unknown} (known 1..7)")
    lut = np.zeros(inst_type.size + 1, np.uint8)
    lut[1:] = [CONSEP_MERGE[t] for t in inst_type]
    return inst, lut[inst]


def consep(
    src: str,
    out: str,
    patch_size: int | None = 256,
    stride: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 19,
) -> str:
    """Convert CoNSeP (``Train|Test/Images/*.png`` RGBA or RGB, ``Train|Test/Labels/*.mat``).

    Tiles are cut into ``patch_size`` patches (None keeps whole tiles); splits ``train`` and ``test``,
    and ``val`` from ``val_fraction`` of the training tiles (whole tiles, never single patches).
    """
    dirs = _split_dirs(Path(src))
    with DatasetWriter(out, "consep", CONSEP_CLASSES, ["colon"], 40) as writer:
        for split, folder in dirs.items():
            images = sorted((folder / "Images").glob("*.png"))
            if not images:
                raise FileNotFoundError(f"{folder / 'Images'}: no PNG images")
            to_val = (
                split_groups([p.stem for p in images], {"train": 1 - val_fraction, "val": val_fraction}, seed)
                if split == "train" and val_fraction > 0
                else {}
            )
            for img_file in images:
                image = read_image(img_file)
                inst, types = consep_labels(folder / "Labels" / f"{img_file.stem}.mat")
                if inst.shape != image.shape[:2]:
                    raise ValueError(
                        f"{folder / 'Labels' / img_file.stem}.mat: label size {inst.shape} "
                        f"differs from image {image.shape[:2]} of {img_file}"
                    )
                for suffix, img, ins, typ in _patches(image, inst, types, patch_size, stride):
                    writer.add(
                        f"{img_file.stem}{suffix}",
                        img,
                        ins,
                        typ,
                        to_val.get(img_file.stem, split),
                        group=img_file.stem,
                        source=str(img_file),
                    )
    return out


def monuseg_instances(xml_file: Path, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the polygons of a MoNuSeg (Aperio XML) annotation into an (H, W) int32 instance map."""
    if not xml_file.is_file():
        raise FileNotFoundError(f"{xml_file}: annotation file not found")
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{xml_file}: not valid XML ({err})") from err
    inst = np.zeros(shape, np.int32)
    k = 0
    for region in root.iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) < 3:
            continue
        k += 1
        cv2.fillPoly(inst, [np.rint(np.array(pts)).astype(np.int32)], k)
    return relabel_sequential(inst)


def monuseg(
    src: str,
    out: str,
    test_src: str | None = None,
    val_fraction: float = 0.2,
    patch_size: int | None = None,
    stride: int | None = None,
    seed: int = 19,
) -> str:
    """Convert MoNuSeg: ``*.tif`` images with ``*.xml`` polygon annotations of the same name anywhere under
    the folder; one class, ``nucleus``.

    Args:
        src: training data (e.g. ``MoNuSeg 2018 Training Data``); ``val_fraction`` of its images become ``val``.
        test_src: optional test data (``MoNuSegTestData``), written as split ``test``.
        patch_size, stride: cut the 1000x1000 images into patches (None keeps whole images).
    """
    sources = {"train": Path(src)} | ({"test": Path(test_src)} if test_src else {})
    with DatasetWriter(out, "monuseg", ["background", "nucleus"], ["multi-organ"], 40) as writer:
        for split, folder_path in sources.items():
            images = sorted(folder_path.rglob("*.tif"))
            if not images:
                raise FileNotFoundError(f"{folder_path}: no .tif images")
            xmls = {p.stem: p for p in folder_path.rglob("*.xml")}
            assignment = (
                split_groups([p.stem for p in images], {"train": 1 - val_fraction, "val": val_fraction}, seed)
                if split == "train"
                else {p.stem: split for p in images}
            )
            for img_file in images:
                if img_file.stem not in xmls:
                    raise FileNotFoundError(f"{img_file}: no annotation {img_file.stem}.xml under {folder_path}")
                image = read_image(img_file)
                inst = monuseg_instances(xmls[img_file.stem], image.shape[:2])
                types = (inst > 0).astype(np.uint8)
                for suffix, img, ins, typ in _patches(image, inst, types, patch_size, stride):
                    writer.add(
                        f"{img_file.stem}{suffix}",
                        img,
                        ins,
                        typ,
                        assignment[img_file.stem],
                        group=img_file.stem,
                        source=str(img_file),
                    )
    return out


def _find_label(folder: Path, stem: str, what: str) -> Path:
    for suffix in (".npy", ".npz", ".png", ".tif", ".tiff"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"{folder / stem}.*: no {what} for image '{stem}' (.npy, .npz, .png or .tif)")


def folder(
    images: str,
    instances: str,
    out: str,
    types: str | None = None,
    classes: str | Sequence[str] | None = None,
    fractions: dict[str, float] | None = None,
    tissue: str = "tissue",
    magnification: int = 40,
    name: str = "custom",
    patch_size: int | None = None,
    stride: int | None = None,
    seed: int = 19,
) -> str:
    """Convert a folder of the user's own images and instance maps (same file stem).

    Args:
        images: folder of PNG/JPEG/TIFF RGB images.
        instances: folder of instance maps (.npy, .npz, .png or .tif; 0 background).
        types: optional folder of type maps (class id per pixel); without it every nucleus is class 1.
        classes: class names, comma separated or a JSON list file; ``background`` is prepended if absent.
        fractions: split name -> fraction of the images, e.g. ``{"train": 0.7, "val": 0.15, "test": 0.15}``
            (the default); patches of one image always share its split.
        tissue, magnification, name: recorded in ``dataset.json``.
        patch_size, stride: cut images into patches.
    """
    image_files = sorted(
        p for p in Path(images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")
    )
    if not image_files:
        raise FileNotFoundError(f"{images}: no images (.png, .jpg, .tif)")
    class_list = _with_background(_names(classes) or ["nucleus"])
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    assignment = split_groups([p.stem for p in image_files], fractions, seed)
    with DatasetWriter(out, name, class_list, [tissue], magnification) as writer:
        for img_file in image_files:
            image = read_image(img_file)
            inst_file = _find_label(Path(instances), img_file.stem, "instance map")
            inst = label_ids(_read_map(inst_file), str(inst_file), "instance map")
            if inst.shape != image.shape[:2]:
                raise ValueError(f"{inst_file}: instance map size {inst.shape} differs from image {image.shape[:2]}")
            if types is None:
                type_map = (inst > 0).astype(np.uint8)
            else:
                type_file = _find_label(Path(types), img_file.stem, "type map")
                type_map = label_ids(_read_map(type_file), str(type_file), "type map")
                if type_map.shape != image.shape[:2]:
                    raise ValueError(f"{type_file}: type map size {type_map.shape} differs from image "
                                     f"{image.shape[:2]} of {img_file}")
                bad = np.setdiff1d(np.unique(type_map), np.arange(len(class_list)))
                if bad.size:
                    raise ValueError(f"{type_file}: unknown class ids {bad.tolist()} (classes {class_list})")
            for suffix, img, ins, typ in _patches(image, inst, type_map, patch_size, stride):
                writer.add(
                    f"{img_file.stem}{suffix}",
                    img,
                    ins,
                    typ,
                    assignment[img_file.stem],
                    group=img_file.stem,
                    source=str(inst_file),
                )
    return out


def arrays(
    src: str,
    out: str,
    classes: str | Sequence[str],
    tissue: str = "tissue",
    magnification: int = 40,
    name: str = "arrays",
    group_key: str | None = None,
    name_key: str | None = None,
    fractions: dict | None = None,
    seed: int = 19,
) -> str:
    """Convert an npz of stacked tiles: ``images`` (N,H,W,3) uint8, ``inst_map`` and ``type_map`` (N,H,W).

    Args:
        classes: class names (comma separated, JSON file or list); ``background`` is prepended if absent.
        group_key: array of group names (e.g. ``tile``) for splitting by group; default one group per tile.
        name_key: array of sample names; default ``<name>_<index>``.
        fractions: split name -> fraction of the groups (default all ``train``).
    """
    src_path = Path(src)
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path}: array file not found")
    with np.load(src_path) as z:
        missing = {"images", "inst_map", "type_map"} - set(z.files)
        if missing:
            raise ValueError(f"{src_path}: missing arrays {sorted(missing)} (found {sorted(z.files)})")
        data = {k: z[k] for k in z.files}
    n = len(data["images"])
    names = [str(v) for v in data[name_key]] if name_key else [f"{name}_{i:05d}" for i in range(n)]
    groups = [str(v) for v in data[group_key]] if group_key else names
    assignment = split_groups(groups, fractions or {"train": 1.0}, seed)
    with DatasetWriter(out, name, _with_background(_names(classes)), [tissue], magnification) as writer:
        for i in range(n):
            image = as_rgb_uint8(data["images"][i], f"{src_path}[images][{i}]")
            writer.add(
                names[i],
                image,
                label_ids(data["inst_map"][i], f"{src_path}[inst_map][{i}]", "instance map"),
                label_ids(data["type_map"][i], f"{src_path}[type_map][{i}]", "type map"),
                assignment[groups[i]],
                group=groups[i],
                source=f"{src_path}[{i}]",
            )
    return out


if __name__ == "__main__":
    fire, _ = optional_import("fire")
    fire.Fire(
        {
            "synthetic": synthetic,
            "pannuke": pannuke,
            "conic": conic,
            "consep": consep,
            "monuseg": monuseg,
            "folder": folder,
            "arrays": arrays,
        }
    )
