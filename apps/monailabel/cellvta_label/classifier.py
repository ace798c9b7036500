"""The MONAI Label cell-classifier task: a small classifier on the served network's frozen cell embeddings, trained
in seconds on the datastore's point and polygon labels with the bundle's adaptation loop (``scripts.cells``:
embeddings of the detected nuclei, labels matched to them by nearest centroid, ``run_training``), published as
``classifier.pt`` beside the served model; the next inference request types every nucleus with it."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from .bundle import BundleModel
from .config import CLASSIFIER_CONFIGS, CLASSIFIER_FILE, AppConfig
from .dataset import LabelledImage
from .labels import MAP_SUFFIXES, label_points
from .regions import image_extent, is_slide, read_region

STATS_FILE = "classifier_stats.json"
# request key -> key of configs/classifier.yaml giving its default
CONFIG_KEYS = {
    "epochs": "classifier_epochs",
    "hidden": "classifier_hidden",
    "dropout": "classifier_dropout",
    "learning_rate": "classifier_lr",
    "weight_decay": "classifier_weight_decay",
    "batch_size": "classifier_batch_size",
    "val_split": "classifier_val_fraction",
    "patience": "classifier_patience",
    "seed": "classifier_seed",
    "match_radius_um": "match_radius_um",
}


def classifier_config(bundle: Path) -> dict[str, Any]:
    """The values of ``configs/classifier.yaml`` the app uses: the request defaults (``CONFIG_KEYS``), the embedding
    ``source`` and ``branch`` and the ``mpp`` of the images (the network's resolution)."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in CLASSIFIER_CONFIGS])
    values = {key: parser.get_parsed_content(name) for key, name in CONFIG_KEYS.items()}
    values.update(source=parser.get_parsed_content("embedding_source"),
                  branch=parser.get_parsed_content("embedding_branch"), mpp=float(parser.get_parsed_content("mpp")))
    return values


def _class_list(value: Any, found: list[str]) -> list[str]:
    """The request's ``classes`` (a list or comma-separated names), else the label names sorted."""
    names = value if isinstance(value, list) else str(value or "").split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    return names or sorted(set(found), key=str.lower)


def _points_csv(xy: np.ndarray, labels: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["x", "y", "label"])
    writer.writerows([f"{x:.2f}", f"{y:.2f}", name] for (x, y), name in zip(xy.tolist(), labels))
    return buf.getvalue()


def _labelled_area(item: LabelledImage, xy: np.ndarray, pad: int, max_side: int
                   ) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Where to read ``item``'s image: the whole of a tile (or small slide), else the labelled points' bounding box
    ``pad`` pixels wider. Returns the ``(x, y)`` location and the ``(w, h)`` size (None: the whole image)."""
    extent = image_extent(item.image)
    if not is_slide(item.image) or max(extent) <= max_side:
        return (0, 0), None
    x0, y0 = np.maximum(np.floor(xy.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(xy.max(0)).astype(int) + pad + 1, extent)
    if max(x1 - x0, y1 - y0) > max_side:
        raise ValueError(f"{item.label}: the labelled area ({x1 - x0} x {y1 - y0} pixels) is larger than {max_side} "
                         "pixels per side; save labels of smaller regions")
    return (int(x0), int(y0)), (int(x1 - x0), int(y1 - y0))


class CellClassifierTrain(TrainTask):
    """Train the cell classifier on every image of the datastore with a point or polygon label.

    Each labelled image (a slide: the labelled points' bounding box) is written to the run folder with its labels
    as points (a polygon counts as its centroid); the served network embeds the nuclei it detects there
    (``scripts.cells.workflow.run_embedding``, source and branch of ``configs/classifier.yaml``) and
    ``scripts.cells.workflow.run_training`` matches the points to them and trains the classifier (defaults from
    ``configs/classifier.yaml``, each overridable in the request; ``classes``: the class list, default the
    label names sorted). The classifier replaces the served one (``AppConfig.classifier``). Each run lives in
    ``<work_dir>/classifier_<time>/`` (``images/``, ``labels/``, ``embeddings/``, ``models/``: the classifier, its
    metrics JSON and Markdown and confusion matrix). The run's record (``classifier_stats.json``) keeps the
    request it ran with, so that :meth:`retrain` can fit the classifier again to newly published weights.

    Args:
        model: the served bundle.
        config: the app's settings.
    """

    def __init__(self, model: BundleModel, config: AppConfig) -> None:
        super().__init__("Train a cell classifier on the served network's embeddings of the datastore's labelled cells")
        self.model = model
        self.app_config = config
        self.defaults = {**classifier_config(config.bundle), "classes": ""}

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in self.defaults.items() if k in CONFIG_KEYS or k == "classes"}

    def stats(self) -> dict[str, Any]:
        path = self.app_config.model_dir / STATS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def trained_here(self) -> bool:
        """True when the served classifier is the one this app's last run wrote (its record holds the request)."""
        classifier = self.app_config.classifier
        return classifier is not None and classifier.is_file() and "request" in self.stats()

    def retrain(self, datastore: Datastore) -> dict[str, Any]:
        """Train the classifier again with its last run's request, on the embeddings of the weights just published
        (a classifier of the previous weights no longer fits them). Returns the new run's record."""
        return self(self.stats()["request"], datastore)

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        from scripts.cells.workflow import run_embedding, run_training
        from scripts.data.datasets import write_png
        from scripts.data.stain import NormalizeStaind
        from scripts.files import write_bytes_atomic, write_text_atomic
        from scripts.inference.writers import class_color

        params = {**self.defaults, **{k: v for k, v in request.items() if k in CONFIG_KEYS or k == "classes"}}
        started = time.time()
        rows = datastore.local_datalist() if hasattr(datastore, "local_datalist") else datastore.datalist()
        items = [LabelledImage(Path(d["image"]), Path(d["label"])) for d in rows
                 if Path(d["label"]).suffix.lower() not in MAP_SUFFIXES]
        if not items:
            raise ValueError("the datastore has no point or polygon labels: save labels with PUT /datastore/label "
                             "first")
        run_dir = self.app_config.new_run_dir("classifier")
        # the images the embeddings are taken from are normalised as inference normalises them
        stain = next((t for t in self.model.preprocessing() if isinstance(t, NormalizeStaind)), lambda d: d)
        found: list[str] = []
        images = []
        for item in items:
            points = label_points(item.label)
            location, size = _labelled_area(item, points.xy, self.app_config.margin, self.app_config.max_side)
            pixels = stain({"image": read_region(item.image, location if size else None, size)[0]})["image"]
            image = run_dir / "images" / f"{item.name}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            write_png(image, pixels)
            write_text_atomic(run_dir / "labels" / f"{item.name}.csv",
                              _points_csv(points.xy - np.asarray(location, np.float64), points.labels))
            found += points.labels
            images.append({"image": str(image), "name": item.name})

        network = self.model.build_network()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_embedding(network, images, str(run_dir / "embeddings"), params["source"], params["branch"], device,
                      int(self.model.magnification()))
        names = _class_list(params["classes"], found)
        summary = run_training(
            str(run_dir / "embeddings"), [{"name": n, "colour": list(class_color(i + 1))} for i, n in enumerate(names)],
            str(run_dir / "models"), "points", str(run_dir / "labels"),
            match_radius_um=float(params["match_radius_um"]), mpp=params["mpp"], point_units="px",
            hidden=int(params["hidden"]), dropout=float(params["dropout"]), epochs=int(params["epochs"]),
            lr=float(params["learning_rate"]),
            weight_decay=float(params["weight_decay"]), batch_size=int(params["batch_size"]),
            val_fraction=float(params["val_split"]), patience=int(params["patience"]), seed=int(params["seed"]),
            branch=params["branch"])
        write_bytes_atomic(self.app_config.classifier, (run_dir / "models" / CLASSIFIER_FILE).read_bytes())
        metrics = summary["metrics"]
        stats = {
            "run": run_dir.name,
            "images": [i["name"] for i in images],
            "classes": summary["classes"],
            "source": summary["source"],
            "train_cells": summary["train_cells"],
            "val_images": summary["val_images"],
            "epochs": summary["epochs"],
            "metrics": {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")},
            "labels": {name: {k: (len(v) if k == "unmatched" else v) for k, v in report.items()}
                       for name, report in summary["labels"].items()},
            "seconds": round(time.time() - started, 1),
            "request": {k: params[k] for k in (*CONFIG_KEYS, "classes")},
        }
        write_text_atomic(self.app_config.model_dir / STATS_FILE, json.dumps(stats, indent=1))
        return stats
