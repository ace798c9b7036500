"""Evaluation: predicted and ground-truth instance + type maps -> scores, JSON and Markdown tables.

Sources of maps (``pred`` and ``gt`` alike):

- a folder with one file per image, named by file stem: ``.npy`` holding ``(H, W, 2)`` or ``(2, H, W)``
  (instance, type), ``.npz`` with the two keys given by ``keys`` (default ``inst_map``, ``type_map``),
  or ``.mat`` (HoVer-Net/CoNSeP form: ``inst_map`` and ``type_map``, or ``inst_type`` listing the class
  of instance ids 1..N, optionally with ``inst_uid``);
- one ``.npy`` file of stacked ``(N, H, W, 2)`` maps (CoNIC ``labels.npy`` form), or one ``.npz`` file of
  stacked ``(N, H, W)`` maps under the two ``keys`` (names from a ``source_name`` or ``name`` key);
- in Python, arrays: a pair ``(inst (N, H, W), type (N, H, W))`` or a list of ``(inst, type)`` pairs.

Predictions and ground truth are paired by name: an image on one side only is an error listing the names
(``--pair_by_order`` of the command line, :mod:`scripts.evaluate`, pairs the two sources position by position
instead, in name order for folders). A file that cannot be read (0-byte, corrupt, pickled objects) is an error
naming it; nothing is unpickled.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.io import loadmat

from ..files import write_text_atomic
from .metrics import METRIC_KEYS, ImageScores, evaluate_image, summarize

__all__ = [
    "load_maps", "load_tissues", "class_lut", "evaluate", "json_ready", "per_image_record", "markdown_report",
    "tissue_classification", "write_report",
]

Maps = list[tuple[str, np.ndarray, np.ndarray]]
MapSource = str | Path | Sequence | tuple
DEFAULT_KEYS = ("inst_map", "type_map")


def _split_keys(keys: Sequence[str] | str) -> tuple[str, str]:
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",")]
    keys = tuple(keys)
    if len(keys) != 2:
        raise ValueError(f"keys must name the instance and the type map, got {keys}")
    return keys


def _from_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    mat = loadmat(path)
    if "inst_map" not in mat:
        raise ValueError(f"{path}: no 'inst_map' in the .mat file (it has {sorted(k for k in mat if k[0] != '_')})")
    inst = np.asarray(mat["inst_map"]).astype(np.int64)
    if "type_map" in mat:
        return inst, np.asarray(mat["type_map"]).astype(np.int64)
    if "inst_type" not in mat:
        raise ValueError(f"{path}: neither 'type_map' nor 'inst_type' in the .mat file")
    inst_type = np.asarray(mat["inst_type"]).ravel().astype(np.int64)
    uid = (np.asarray(mat["inst_uid"]).ravel().astype(np.int64) if "inst_uid" in mat
           else np.arange(1, inst_type.size + 1))
    if uid.size != inst_type.size:
        raise ValueError(f"{path}: inst_uid has {uid.size} entries and inst_type {inst_type.size}")
    lut = np.zeros(max(int(inst.max(initial=0)), int(uid.max(initial=0))) + 1, dtype=np.int64)
    lut[uid] = inst_type
    return inst, lut[inst]


def _named(read, path: Path, *args):
    """``read(path, *args)``, with any failure to read re-raised as a ValueError that names ``path``."""
    try:
        return read(path, *args)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one that names the file
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot be read as maps ({type(e).__name__}: {e})") from e


def _from_file(path: Path, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3 and arr.shape[-1] == 2:
            return arr[..., 0], arr[..., 1]
        if arr.ndim == 3 and arr.shape[0] == 2:
            return arr[0], arr[1]
        raise ValueError(f"{path}: expected (H, W, 2) or (2, H, W) instance + type maps, got shape {arr.shape}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data]
            if missing:
                raise ValueError(f"{path}: keys {missing} not found (it has {sorted(data.files)})")
            return data[keys[0]], data[keys[1]]
    if path.suffix == ".mat":
        return _from_mat(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .npy, .npz or .mat)")


def _from_stack(path: Path, keys: tuple[str, str]) -> Maps:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 4 or arr.shape[-1] != 2:
            raise ValueError(f"{path}: expected stacked (N, H, W, 2) instance + type maps, got shape {arr.shape}")
        return [(f"{i:05d}", arr[i, ..., 0], arr[i, ..., 1]) for i in range(arr.shape[0])]
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"{path}: keys {missing} not found (it has {sorted(data.files)})")
        inst, types = data[keys[0]], data[keys[1]]
        name_key = next((k for k in ("source_name", "name") if k in data), None)
        names = [str(n) for n in data[name_key]] if name_key else [f"{i:05d}" for i in range(len(inst))]
    if inst.ndim != 3 or inst.shape != types.shape:
        raise ValueError(f"{path}: {keys} must be stacked (N, H, W) maps of one shape, got {inst.shape}, {types.shape}")
    return [(names[i], inst[i], types[i]) for i in range(inst.shape[0])]


def load_maps(source: MapSource, keys: Sequence[str] | str = DEFAULT_KEYS) -> Maps:
    """Read instance and type maps from a folder, a stacked file or arrays.

    Args:
        source: folder, ``.npy``/``.npz`` stacked file, ``(inst (N,H,W), type (N,H,W))`` or list of pairs.
        keys: the instance-map and type-map keys of ``.npz`` files (a pair or ``"inst,type"``).

    Returns:
        list of ``(name, inst (H, W), type (H, W))`` in name order for folders, file order otherwise.
    """
    keys = _split_keys(keys)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix not in (".npy", ".npz"):
                raise ValueError(f"{path}: a single file must be a stacked .npy or .npz, got {path.suffix!r}")
            return _named(_from_stack, path, keys)
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz", ".mat"))
        if not files:
            raise ValueError(f"{path}: no .npy, .npz or .mat files in the folder")
        stems = [p.stem for p in files]
        if len(set(stems)) != len(stems):
            raise ValueError(f"{path}: several files share a stem: {sorted({s for s in stems if stems.count(s) > 1})}")
        return [(p.stem, *_named(_from_file, p, keys)) for p in files]
    if isinstance(source, tuple) and len(source) == 2 and np.ndim(source[0]) == 3:
        inst, types = np.asarray(source[0]), np.asarray(source[1])
        if inst.shape != types.shape:
            raise ValueError(f"instance and type arrays differ in shape: {inst.shape} vs {types.shape}")
        return [(f"{i:05d}", inst[i], types[i]) for i in range(inst.shape[0])]
    return [(f"{i:05d}", np.asarray(inst), np.asarray(types)) for i, (inst, types) in enumerate(source)]


def load_tissues(source: str | Path | Mapping | Sequence | None, names: Sequence[str]) -> list:
    """Tissue label of each image: from a sequence aligned with ``names``, a mapping name -> tissue, a
    ``.json`` file holding such a mapping or a ``.csv`` file with ``name`` and ``tissue`` columns."""
    if source is None:
        return [None] * len(names)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tissue file not found")
        if path.suffix == ".json":
            source = json.loads(path.read_text())
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and not {"name", "tissue"} <= set(rows[0]):
                raise ValueError(f"{path}: the CSV needs 'name' and 'tissue' columns, got {sorted(rows[0])}")
            source = {row["name"]: row["tissue"] for row in rows}
        else:
            raise ValueError(f"{path}: tissues must be a .json mapping or a .csv with name,tissue columns")
    if isinstance(source, Mapping):
        missing = [n for n in names if n not in source]
        if missing:
            raise ValueError(f"no tissue given for {len(missing)} images, e.g. {missing[:3]}")
        return [source[n] for n in names]
    source = list(source)
    if len(source) != len(names):
        raise ValueError(f"{len(source)} tissue labels for {len(names)} images")
    return source


def class_lut(pred_classes: Sequence[str], class_names: Sequence[str], class_map: Mapping[str, str] | None = None,
              source: str = "predictions") -> np.ndarray:
    """The ids in ``class_names`` of predicted type ids whose classes are ``pred_classes``.

    Args:
        pred_classes: the predictions' class names for type ids 1..K (background excluded; a cell classifier's).
        class_names: all class names, background first (the dataset's).
        class_map: {predicted class: name in ``class_names``}, every predicted class listed; None: the two lists
            must hold the same classes (background excluded), matched by name.
        source: what the predictions are, for the error message.

    Returns:
        (K + 1,) int64: ``lut[predicted id]`` is the id in ``class_names`` (0 stays background).

    Raises:
        ValueError: naming both lists, when a predicted class has no class (or the lists differ, without a map).
    """
    pred_classes, targets = list(pred_classes), list(class_names)[1:]
    if class_map is None and sorted(pred_classes) != sorted(targets):
        raise ValueError(f"{source}: classes {pred_classes} are not the dataset's {targets} (background excluded): "
                         "give a class map {predicted class: dataset class}")
    mapped = [name if class_map is None else class_map.get(name) for name in pred_classes]
    bad = [p for p, m in zip(pred_classes, mapped) if m not in targets]
    if bad:
        raise ValueError(f"{source}: classes {bad} are mapped to no class of the dataset's {targets} (class map "
                         f"{dict(class_map or {})}, predicted classes {pred_classes})")
    return np.array([0] + [targets.index(m) + 1 for m in mapped], np.int64)


def _listed(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _pair(pred: Maps, gt: Maps, pair_by_order: bool = False) -> list[tuple[str, tuple, tuple]]:
    """``(name, (pred inst, pred type), (gt inst, gt type))`` per image: by name, or by position if asked.

    Raises ValueError listing the images found on one side only (by name), or the two counts (by order).
    """
    if pair_by_order:
        if len(pred) != len(gt):
            raise ValueError(f"pairing by order: {len(pred)} predictions but {len(gt)} ground-truth images")
        return [(g[0], p[1:], g[1:]) for p, g in zip(pred, gt)]
    by_name = {n: m for n, *m in pred}
    gt_names = {n for n, *_ in gt}
    no_pred = [n for n, *_ in gt if n not in by_name]
    no_gt = [n for n, *_ in pred if n not in gt_names]
    if no_pred or no_gt:
        problems = []
        if no_pred:
            problems.append(f"{len(no_pred)} ground-truth images without a prediction: {_listed(no_pred)}")
        if no_gt:
            problems.append(f"{len(no_gt)} predictions without ground truth: {_listed(no_gt)}")
        raise ValueError("images are paired by name; " + "; ".join(problems)
                         + " (pair_by_order / --pair_by_order pairs them by position instead)")
    return [(name, tuple(by_name[name]), (inst, types)) for name, inst, types in gt]


def json_ready(value: object) -> object:
    """``value`` with numpy arrays and scalars turned into lists and Python numbers, NaN into None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def per_image_record(score: ImageScores) -> dict[str, object]:
    """The per-image scores as a flat dict (classes 1..C-1 in the per-class arrays)."""
    dq, sq, pq = score.binary_quality
    return {
        "name": score.name,
        "tissue": score.tissue,
        "bpq": pq,
        "bdq": dq,
        "bsq": sq,
        "aji": score.aji,
        "aji_plus": score.aji_plus,
        "dice": score.dice,
        "jaccard": score.jaccard,
        "binary_tp_fp_fn_iou": score.binary_counts,
        "dq_sq_pq_per_class": score.class_quality,
        "tp_fp_fn_iou_per_class": score.class_counts,
    }


def evaluate(
    pred: MapSource,
    gt: MapSource,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    tissues: str | Path | Mapping | Sequence | None = None,
    pred_keys: Sequence[str] | str = DEFAULT_KEYS,
    gt_keys: Sequence[str] | str = DEFAULT_KEYS,
    iou_threshold: float = 0.5,
    radius_um: float = 3.0,
    pixel_size_um: float = 0.25,
    dummy_points: bool = False,
    pair_by_order: bool = False,
    pred_classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """Score predictions against ground truth.

    Args:
        pred, gt: map sources (see :func:`load_maps`); images are paired by name (an image on one side only
            is an error listing the names).
        num_classes: classes including background; default ``len(class_names)`` or 1 + the largest class
            found in either source.
        class_names: all class names, background first.
        tissues: see :func:`load_tissues`; images are grouped by it in ``summary["per_tissue"]``.
        pred_keys, gt_keys: ``.npz`` keys of the instance and type maps.
        iou_threshold: PQ matching threshold.
        radius_um, pixel_size_um: detection radius (3 µm at 0.25 µm/px = 12 px, the reference's 40× value).
        dummy_points: reproduce the reference's dummy (0, 0) detection point in images without nuclei.
        pair_by_order: pair the two sources position by position (in name order for folders) instead.
        pred_classes: the predictions' own classes for type ids 1..K (a cell classifier's, background excluded):
            their type maps are brought to the ids of ``class_names`` by name or ``class_map``
            (:func:`class_lut`); None: the predictions already use the ids of ``class_names``.
        class_map: {predicted class: name in ``class_names``}, with ``pred_classes``.

    Returns:
        JSON-ready dict ``{"config", "summary", "per_image"}`` (NaN written as None).
    """
    if pixel_size_um <= 0 or radius_um <= 0:
        raise ValueError(f"radius_um and pixel_size_um must be positive, got {radius_um}, {pixel_size_um}")
    predictions = load_maps(pred, pred_keys)
    if pred_classes is not None:
        if class_names is None:
            raise ValueError("pred_classes needs class_names (the ground truth's classes) to map them to")
        lut = class_lut(pred_classes, class_names, class_map)
        for name, _, types in predictions:
            if int(np.max(types, initial=0)) >= len(lut):
                raise ValueError(f"image {name!r}: type id {int(np.max(types))} beyond the {len(lut) - 1} predicted "
                                 f"classes {list(pred_classes)}")
        predictions = [(name, inst, lut[np.asarray(types, np.int64)]) for name, inst, types in predictions]
    pairs = _pair(predictions, load_maps(gt, gt_keys), pair_by_order)
    if not pairs:
        raise ValueError("no images to evaluate")
    if num_classes is None:
        largest = max(max(int(np.max(p[1], initial=0)), int(np.max(g[1], initial=0))) for _, p, g in pairs)
        num_classes = len(class_names) if class_names is not None else largest + 1
    tissue_of = load_tissues(tissues, [name for name, _, _ in pairs])
    radius_px = radius_um / pixel_size_um
    scores = []
    for (name, (p_inst, p_type), (g_inst, g_type)), tissue in zip(pairs, tissue_of):
        try:
            scores.append(
                evaluate_image(
                    g_inst, g_type, p_inst, p_type, num_classes, iou_threshold, radius_px, dummy_points, name, tissue
                )
            )
        except ValueError as err:
            raise ValueError(f"image {name!r}: {err}") from err
    config = {
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "iou_threshold": iou_threshold,
        "detection_radius_um": radius_um,
        "pixel_size_um": pixel_size_um,
        "detection_radius_px": radius_px,
        "dummy_points": dummy_points,
    }
    summary = summarize(scores, num_classes, class_names)
    return json_ready({"config": config, "summary": summary, "per_image": [per_image_record(s) for s in scores]})


def tissue_classification(true: Sequence, predicted: Sequence, names: Sequence[str] | None = None) -> dict:
    """Tissue accuracy and confusion matrix of per-image tissue labels.

    Args:
        true, predicted: one label per image, in one order: tissue names, or indices into ``names``.
        names: the tissue classes in order; None: the sorted labels found on either side.

    Returns:
        ``{"n_images", "accuracy", "classes", "confusion_matrix", "per_class"}``: ``confusion_matrix[i][j]`` counts
        the images of true class ``classes[i]`` predicted as ``classes[j]``; ``per_class`` gives each class's
        ``n_images`` (true), ``recall`` and ``precision`` (None when undefined).

    Raises:
        ValueError: the two lists differ in length, or a label is not one of ``names``.
    """
    true, predicted = list(true), list(predicted)
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true and {len(predicted)} predicted tissue labels")
    names = [str(n) for n in (sorted({str(t) for t in true + predicted}) if names is None else names)]

    def index(label: object) -> int:
        if isinstance(label, (int, np.integer)) and 0 <= int(label) < len(names):
            return int(label)
        if str(label) not in names:
            raise ValueError(f"tissue label {label!r} is not one of the tissue classes {names}")
        return names.index(str(label))

    matrix = np.zeros((len(names), len(names)), np.int64)
    for t, p in zip(true, predicted):
        matrix[index(t), index(p)] += 1
    total = int(matrix.sum())
    per_class = {}
    for i, name in enumerate(names):
        n_true, n_pred = int(matrix[i].sum()), int(matrix[:, i].sum())
        per_class[name] = {"n_images": n_true, "recall": matrix[i, i] / n_true if n_true else None,
                           "precision": matrix[i, i] / n_pred if n_pred else None}
    return {"n_images": total, "accuracy": np.trace(matrix) / total if total else None, "classes": names,
            "confusion_matrix": matrix.tolist(), "per_class": per_class}


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


_LABELS = {
    "bpq": "bPQ", "bdq": "bDQ", "bsq": "bSQ", "mpq": "mPQ (PanNuke, per image)", "mdq": "mDQ", "msq": "mSQ",
    "mpq_plus": "mPQ+ (CoNIC, aggregated)", "aji": "AJI", "aji_plus": "AJI+", "dice": "Dice", "jaccard": "Jaccard",
    "detection_f1": "Detection F1", "detection_precision": "Detection precision",
    "detection_recall": "Detection recall",
}


def markdown_report(result: Mapping[str, object]) -> str:
    """Markdown tables of an :func:`evaluate` result: overall, per class and per tissue."""
    summary = result["summary"]
    parts = [
        "## Overall",
        f"{summary['n_images']} images, {summary['n_images_with_nuclei']} with ground-truth nuclei.",
        _table(["metric", "value"], [[_LABELS[k], summary.get(k)] for k in METRIC_KEYS]),
        "## Per class",
        _table(
            ["class", "PQ", "DQ", "SQ", "PQ+", "det. P", "det. R", "det. F1"],
            [
                [c["name"], c["pq"], c["dq"], c["sq"], c["pq_plus"], c.get("detection_precision"),
                 c.get("detection_recall"), c.get("detection_f1")]
                for c in summary["per_class"]
            ],
        ),
    ]
    if summary["per_tissue"]:
        parts += [
            "## Per tissue",
            _table(
                ["tissue", "images", "bPQ", "mPQ", "mPQ+", "AJI", "Dice", "det. F1"],
                [
                    [name, t["n_images"], t["bpq"], t["mpq"], t["mpq_plus"], t["aji"], t["dice"], t.get("detection_f1")]
                    for name, t in summary["per_tissue"].items()
                ],
            ),
        ]
    tissue = summary.get("tissue_classification")
    if tissue:
        parts += [
            "## Tissue classification",
            f"{tissue['n_images']} images, accuracy {_fmt(tissue['accuracy'])}. Confusion matrix (rows: true tissue, "
            "columns: predicted):",
            _table(["true / predicted", *tissue["classes"], "recall"],
                   [[name, *row, tissue["per_class"][name]["recall"]]
                    for name, row in zip(tissue["classes"], tissue["confusion_matrix"])]),
        ]
    return "\n\n".join(parts) + "\n"


def write_report(result: Mapping[str, object], output_dir: str | Path, stem: str = "metrics") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``output_dir``; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(result, indent=1, allow_nan=False))
    write_text_atomic(md_path, markdown_report(result))
    return json_path, md_path
