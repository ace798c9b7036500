"""The adaptation loop as bundle workflows (``configs/classifier.yaml``): embed, train a classifier, classify.

* :func:`run_embedding`: one cache file per image (``scripts.cells.embeddings``), for the nuclei of a dataset in
  the bundle's layout (ground truth) or those the network detects on a folder of images;
* :func:`run_training`: labels (dataset type maps or point files, ``scripts.cells.labels``) joined to the cached
  embeddings, a classifier trained and validated on held-out images, ``classifier.pt`` + metrics JSON/Markdown +
  confusion-matrix PNG + the label report (every unmatched point), wall/CPU time (and GPU energy with NVML);
* :func:`run_classifying`: every cached image's nuclei re-typed by the classifier: ``<name>_cells.csv`` and
  ``<name>_cells.geojson`` (QuPath points with the new class names and colours).

Per-file errors are collected; a run reports them all at the end and fails (nothing else is lost).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import dataset_list, read_image, read_info
from ..files import write_bytes_atomic, write_text_atomic
from .classifier import load_classifier, predict, save_classifier, train_classifier
from .embeddings import CellEmbedder, CellEmbeddings, embed_files
from .labels import ClassTable, match_points, read_points, type_map_labels

__all__ = ["CellsWorkflowError", "dataset_items", "image_items", "run_embedding", "run_training", "run_classifying"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class CellsWorkflowError(RuntimeError):
    """One or more files failed; the message lists each with its problem."""


def _fail_on(errors: list[str], what: str) -> None:
    if errors:
        raise CellsWorkflowError(f"{what}: {len(errors)} file(s) failed:\n" + "\n".join(errors))


def dataset_items(dataset_dir: str, split: str | list[str] | None = None) -> list[dict]:
    """The samples of a dataset in the bundle's layout (their ground-truth nuclei get embedded)."""
    return [{"image": s["image"], "inst_map": s["inst_map"], "name": s["name"]}
            for s in dataset_list(dataset_dir, split)]


def image_items(input_dir: str) -> list[dict]:
    """The images of a folder (the network's detected nuclei get embedded)."""
    paths = sorted(p for p in Path(input_dir).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{input_dir}: no image ({', '.join(IMAGE_SUFFIXES)})")
    return [{"image": str(p), "name": p.stem} for p in paths]


def run_embedding(network: torch.nn.Module, items: list[dict], embedding_dir: str, source: str = "vit",
                  branch: str = "nuclei_type_map", device: str | torch.device = "cpu",
                  magnification: int = 40) -> list[Path]:
    """Embed every item into ``embedding_dir`` (cached files of the same model and source are kept)."""
    with CellEmbedder(network, source, device, branch, magnification) as embedder:
        paths, errors = embed_files(embedder, items, embedding_dir)
    _fail_on(errors, f"embedding into {embedding_dir}")
    return paths


def _gpu_energy_mj() -> float | None:
    """Total energy (mJ) drawn by GPU 0 since the driver loaded (NVML), or None without an NVIDIA GPU/NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0)))
    except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: energy is not measured
        return None


def _labelled(embedding_dir: str, classes: ClassTable, label_source: str, label_dir: str | None,
              dataset_classes: list[str] | None, class_map: dict | None, match_radius_um: float, mpp: float,
              point_units: str) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], dict, str, str, dict[str, str],
                                         list[str]]:
    """Per cached image: (name, embeddings of the labelled nuclei, their class ids); the label report; the
    embeddings' source and fingerprint; ``{name: pixel digest}`` of the cached images; the per-file errors."""
    files = sorted(Path(embedding_dir).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{embedding_dir}: no cached embeddings (run the 'embedding' workflow first)")
    out, report, errors, ids, digests = [], {}, [], set(), {}
    for path in files:
        try:
            cache = CellEmbeddings.load(path)
            ids.add((cache.source, cache.fingerprint))
            digests[path.stem] = cache.image_digest
            if label_source == "dataset":
                names = type_map_labels(cache.ids, Path(label_dir) / "labels" / f"{path.stem}.npz", dataset_classes)
                mapped = [None if n is None else (class_map or {}).get(n, n if class_map is None else None)
                          for n in names]
                rows = np.array([i for i, n in enumerate(mapped) if n is not None], np.int64)
                y = classes.encode([mapped[i] for i in rows], str(path))
                report[path.stem] = {"nuclei": len(names), "labelled": int(rows.size)}
            elif label_source == "points":
                candidates = [Path(label_dir) / f"{path.stem}{s}" for s in (".csv", ".geojson", ".json")]
                found = [c for c in candidates if c.is_file()]
                if not found:
                    report[path.stem] = {"nuclei": len(cache.ids), "labelled": 0, "points": 0}
                    continue
                scale = 1.0 / mpp if point_units == "um" else 1.0
                points = read_points(found[0], scale)
                size = None
                if cache.image and Path(cache.image).is_file():
                    size = read_image(cache.image).shape[:2]
                match = match_points(points, cache.centroids, match_radius_um / mpp, size)
                rows = match.cell
                y = classes.encode(match.labels, str(found[0]))
                report[path.stem] = {"nuclei": len(cache.ids), "points": len(points.labels),
                                     "labelled": int(rows.size), "unclassified_features": points.skipped,
                                     "unmatched": match.unmatched}
            else:
                raise ValueError(f"unknown label_source {label_source!r} (dataset or points)")
            if rows.size:
                out.append((path.stem, cache.embeddings[rows], y))
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{path}: {e}" if str(path) not in str(e) else str(e))
    if len(ids) > 1:
        errors.append(f"{embedding_dir}: embeddings of different models or sources mixed: {sorted(ids)}")
    source, fingerprint = next(iter(ids)) if ids else ("", "")
    return out, report, source, fingerprint, digests, errors


def _confusion_png(confusion: list[list[int]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _markdown(summary: dict) -> str:
    m = summary["metrics"]
    lines = [f"# Cell classifier ({summary['source']} embeddings, model {summary['fingerprint']})", "",
             f"Validation: {m['n']} nuclei of {len(summary['val_images'])} held-out image(s); trained on "
             f"{summary['train_cells']} nuclei in {summary['epochs']} epochs, {summary['wall_s']:.1f} s wall, "
             f"{summary['cpu_s']:.1f} s CPU.", "",
             f"accuracy {m['accuracy']:.3f} | balanced accuracy {m['balanced_accuracy']:.3f} | "
             f"macro-F1 {m['macro_f1']:.3f}", "", "| class | precision | recall | F1 | support |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
              for n, c in m["per_class"].items()]
    return "\n".join(lines) + "\n"


def run_training(embedding_dir: str, classes: list[dict], output_dir: str, label_source: str = "dataset",
                 label_dir: str | None = None, dataset_classes: list[str] | None = None,
                 class_map: dict | None = None, match_radius_um: float = 3.0, mpp: float = 0.25,
                 point_units: str = "px", hidden: int = 0, dropout: float = 0.0, epochs: int = 200,
                 lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, val_fraction: float = 0.2,
                 patience: int = 20, seed: int = 0, tracking_uri: str | None = None,
                 branch: str = "nuclei_type_map", held_out_splits: Sequence[str] = ()) -> dict:
    """Train ``<output_dir>/classifier.pt`` on the cached embeddings and their labels.

    Args:
        classes: the new classes, ``[{name, colour: [r, g, b]}, ...]``.
        label_source: ``dataset`` (type maps of the dataset in ``label_dir``; ``dataset_classes`` its class
            table, ``class_map`` {dataset class: new class} or None for the same names) or ``points`` (files
            ``<label_dir>/<image name>.csv|.geojson`` matched within ``match_radius_um``, ``mpp`` micrometres per
            pixel; ``point_units`` of their coordinates, ``px`` or ``um``).
        hidden ... seed: the classifier's (:func:`.classifier.train_classifier`); ``val_fraction`` of the images
            (seeded) is held out for validation, or of the nuclei when there is a single image.
        tracking_uri: an MLflow tracking URI to log parameters, metrics and outputs to (None: no tracking).
        branch: the decoder branch the ``decoder`` source's embeddings were read from (recorded in the file).
        held_out_splits: with the ``dataset`` label source, the splits whose images neither train nor validate the
            classifier (the test split evaluation scores it on), whatever the embedding cache holds. The
            validation images are then drawn by the dataset's ``group`` (patches of one tile stay together).

    Returns:
        The summary written to ``classifier_metrics.json``.
    """
    wall, cpu, energy = time.perf_counter(), time.process_time(), _gpu_energy_mj()
    table = ClassTable.from_config(classes)
    per_image, report, source, fingerprint, digests, errors = _labelled(
        embedding_dir, table, label_source, label_dir, dataset_classes, class_map, match_radius_um, mpp, point_units)
    _fail_on(errors, f"labels for {embedding_dir}")
    if not per_image:
        raise ValueError(f"{embedding_dir}: no labelled nucleus (label report: {report})")
    group_of = {n: n for n, _, _ in per_image}
    if label_source == "dataset":
        samples = {s["name"]: s for s in read_info(label_dir).samples}
        per_image = [p for p in per_image if samples.get(p[0], {}).get("split") not in set(held_out_splits)]
        group_of = {n: str(samples.get(n, {}).get("group", n)) for n, _, _ in per_image}
        if not per_image:
            raise ValueError(f"{embedding_dir}: no labelled nucleus outside the held-out splits "
                             f"{list(held_out_splits)}")
    rng = np.random.default_rng(seed)
    names = [n for n, _, _ in per_image]
    groups = sorted(set(group_of.values()))
    if len(groups) > 1:  # whole groups (images, or a dataset's tiles) are held out
        order = rng.permutation(len(groups))
        held = {groups[i] for i in order[:max(1, int(round(val_fraction * len(groups))))]}
        val = {n for n in names if group_of[n] in held}
    else:
        val = set()
    x = np.concatenate([e for n, e, _ in per_image if n not in val])
    y = np.concatenate([c for n, _, c in per_image if n not in val])
    x_val = np.concatenate([e for n, e, _ in per_image if n in val]) if val else None
    y_val = np.concatenate([c for n, _, c in per_image if n in val]) if val else None
    result = train_classifier(x, y, table.names, hidden, dropout, epochs, lr, weight_decay, batch_size,
                              val_fraction, patience, seed, x_val, y_val)
    out = Path(output_dir)
    model_path = save_classifier(out / "classifier.pt", result.model, table, source, fingerprint, branch,
                                 {name: digests[name] for name in names})
    end_energy = _gpu_energy_mj()
    summary = {"classifier": str(model_path), "source": source, "branch": branch, "fingerprint": fingerprint,
               "classes": table.to_config(), "train_cells": int(len(x)), "val_images": sorted(val),
               "held_out_splits": list(held_out_splits),
               "epochs": result.epochs, "metrics": result.metrics, "history": result.history,
               "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "gpu_energy_j": None if energy is None or end_energy is None else (end_energy - energy) / 1000,
               "labels": report}
    write_text_atomic(out / "classifier_metrics.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "classifier_metrics.md", _markdown(summary))
    _confusion_png(result.metrics["confusion"], table.names, out / "classifier_confusion.png")
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_name="cell_classifier"):
            mlflow.log_params({"source": source, "fingerprint": fingerprint, "hidden": hidden, "dropout": dropout,
                               "lr": lr, "epochs": epochs, "label_source": label_source})
            mlflow.log_metrics({k: summary["metrics"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
                               | {"wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"]})
            mlflow.log_artifacts(str(out))
    return summary


def run_classifying(embedding_dir: str, classifier_path: str, output_dir: str) -> list[Path]:
    """Re-type every cached image's nuclei: ``<name>_cells.csv`` (id, x, y, class, probability) and
    ``<name>_cells.geojson`` (QuPath points classified with the classifier's names and colours)."""
    written, errors = [], []
    files = sorted(Path(embedding_dir).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{embedding_dir}: no cached embeddings (run the 'embedding' workflow first)")
    model = table = None
    for path in files:
        try:
            cache = CellEmbeddings.load(path)
            if model is None:
                model, table, _ = load_classifier(classifier_path, cache.source, cache.fingerprint)
            else:
                load_classifier(classifier_path, cache.source, cache.fingerprint)
            probs = predict(model, cache.embeddings)
            cls = probs.argmax(1)
            prob = probs[np.arange(len(cls)), cls]
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["id", "x", "y", "class", "probability"])
            for i, c, p, (x, y) in zip(cache.ids, cls, prob, cache.centroids):
                w.writerow([int(i), f"{x:.2f}", f"{y:.2f}", table.names[c], f"{p:.4f}"])
            features = [{"type": "Feature", "id": int(i),
                         "geometry": {"type": "Point", "coordinates": [float(x), float(y)]},
                         "properties": {"objectType": "detection", "probability": float(p),
                                        "classification": {"name": table.names[c], "color": list(table.colours[c])}}}
                        for i, c, p, (x, y) in zip(cache.ids, cls, prob, cache.centroids)]
            out = Path(output_dir)
            written.append(write_text_atomic(out / f"{path.stem}_cells.csv", buf.getvalue()))
            written.append(write_text_atomic(out / f"{path.stem}_cells.geojson",
                                             json.dumps({"type": "FeatureCollection", "features": features})))
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"{path}: {e}" if str(path) not in str(e) else str(e))
    _fail_on(errors, f"classifying {embedding_dir}")
    return written
