"""Ignite metrics over post-processed nuclei, for MONAI evaluators (``key_val_metric``/``additional_metrics``).

Each metric scores every image as it arrives (:func:`.metrics.evaluate_image`, a millisecond per
256² tile) and keeps only the per-image scores; ``compute`` gathers them across processes and
summarises the dataset (:func:`.metrics.summarize`). ``summary`` then holds every number, per class
and per tissue, for :class:`NucleiMetricsSaver` to write.

Input, after ``output_transform``: ``(y_pred, y)`` or ``(y_pred, y, tissues)``, where ``y_pred`` and ``y``
are ``(B, 2, H, W)`` arrays/tensors or sequences of ``(2, H, W)`` maps (channel 0 instance ids,
channel 1 classes; MONAI's ``PanopticQualityMetric`` layout). The default output transform,
:class:`NucleiMapsFromOutput`, reads them from the decollated output of a MONAI evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from .evaluation import json_ready, per_image_record, tissue_classification, write_report
from .metrics import METRIC_KEYS, ImageScores, evaluate_image, summarize

__all__ = [
    "NucleiMapsFromOutput",
    "NucleiMetric",
    "BinaryPQ",
    "MultiPQ",
    "MultiPQPlus",
    "AJI",
    "TissueAccuracy",
    "NucleiMetricsSaver",
]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _squeeze(x: Any, what: str) -> np.ndarray:
    arr = _numpy(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (1, H, W), got shape {arr.shape}")
    return arr


class NucleiMapsFromOutput:
    """Output transform: MONAI evaluator output -> ``(y_pred, y, tissues)`` for the metrics here.

    Works on the decollated output (a list of per-sample dicts) and on a batched dict. The predicted
    maps live in ``output[pred_key][pred_inst_key]`` (or ``output[pred_inst_key]`` when ``pred_key`` is
    None), the labels in ``output[label_inst_key]`` and ``output[label_type_key]``; maps may be
    ``(H, W)`` or ``(1, H, W)``.

    Args:
        pred_key: key of the post-processed prediction dict, or None when its keys are top-level.
        pred_inst_key, pred_type_key: keys of the predicted instance and type maps.
        label_inst_key, label_type_key: keys of the ground-truth maps (the training samples' keys).
        tissue_key: key of the tissue label, or None.
    """

    def __init__(
        self,
        pred_key: str | None = "pred",
        pred_inst_key: str = "inst_map",
        pred_type_key: str = "type_map",
        label_inst_key: str = "inst_map",
        label_type_key: str = "nuclei_type_map",
        tissue_key: str | None = None,
    ) -> None:
        self.pred_key = pred_key
        self.pred_inst_key = pred_inst_key
        self.pred_type_key = pred_type_key
        self.label_inst_key = label_inst_key
        self.label_type_key = label_type_key
        self.tissue_key = tissue_key

    def _one(self, sample: Mapping) -> tuple[np.ndarray, np.ndarray, Any]:
        pred = sample[self.pred_key] if self.pred_key is not None else sample
        maps = []
        for source, inst_key, type_key, what in (
            (pred, self.pred_inst_key, self.pred_type_key, "prediction"),
            (sample, self.label_inst_key, self.label_type_key, "label"),
        ):
            missing = [k for k in (inst_key, type_key) if k not in source]
            if missing:
                raise KeyError(f"{what} keys {missing} not in the evaluator output (it has {sorted(map(str, source))})")
            inst = _squeeze(source[inst_key], f"{what} {inst_key}")
            maps.append(np.stack([inst, _squeeze(source[type_key], f"{what} {type_key}")]))
        tissue = None
        if self.tissue_key is not None:
            tissue = _numpy(sample[self.tissue_key]).item()
        return maps[0], maps[1], tissue

    def __call__(self, output: Sequence[Mapping] | Mapping) -> tuple[list, list, list]:
        if isinstance(output, Mapping):
            first = output[self.pred_key] if self.pred_key is not None else output
            batch = len(first[self.pred_inst_key])
            samples = []
            for b in range(batch):
                sample = {k: v[b] for k, v in output.items() if k != self.pred_key and _is_batched(v, batch)}
                if self.pred_key is not None:
                    sample[self.pred_key] = {k: v[b] for k, v in first.items() if _is_batched(v, batch)}
                samples.append(sample)
            output = samples
        results = [self._one(s) for s in output]
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]


def _is_batched(value: Any, batch: int) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, Mapping)) and len(value) == batch


def _maps(x: Any, what: str) -> list[np.ndarray]:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        arr = _numpy(x)
        if arr.ndim != 4 or arr.shape[1] != 2:
            raise ValueError(f"{what} must be (B, 2, H, W) (instance, class), got shape {arr.shape}")
        return list(arr)
    maps = [_numpy(m) for m in x]
    for m in maps:
        if m.ndim != 3 or m.shape[0] != 2:
            raise ValueError(f"each {what} map must be (2, H, W) (instance, class), got shape {m.shape}")
    return maps


class NucleiMetric(Metric):
    """One number of the PQ family over a dataset, from per-image instance and type maps.

    Args:
        metric_name: one of :data:`.metrics.METRIC_KEYS` (``"bpq"``, ``"mpq"``, ``"mpq_plus"``, ``"aji"``,
            ``"detection_f1"``, ...).
        num_classes: classes including background (the network's type channels); 1 ignores the type maps.
        class_names: all class names, background first (used in ``summary``).
        iou_threshold: PQ matching threshold.
        radius_um, pixel_size_um: detection radius (3 µm at 0.25 µm/px = 12 px).
        dummy_points: reproduce the reference's dummy detection point in images without nuclei.
        with_detection: also pair centroids (about 1 ms per 256² tile) so that ``summary`` holds detection
            scores; always on for the detection metrics.
        output_transform: engine output -> ``(y_pred, y[, tissues])``; default :class:`NucleiMapsFromOutput`.
        device: ignite's metric device (the scores are kept on the host).
    """

    def __init__(
        self,
        metric_name: str = "bpq",
        num_classes: int = 1,
        class_names: Sequence[str] | None = None,
        iou_threshold: float = 0.5,
        radius_um: float = 3.0,
        pixel_size_um: float = 0.25,
        dummy_points: bool = False,
        with_detection: bool = False,
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if metric_name not in METRIC_KEYS:
            raise ValueError(f"metric_name must be one of {METRIC_KEYS}, got {metric_name!r}")
        if pixel_size_um <= 0 or radius_um <= 0:
            raise ValueError(f"radius_um and pixel_size_um must be positive, got {radius_um}, {pixel_size_um}")
        self.metric_name = metric_name
        self.num_classes = num_classes
        self.class_names = class_names
        self.iou_threshold = iou_threshold
        self.radius_px = radius_um / pixel_size_um
        self.dummy_points = dummy_points
        self.with_detection = with_detection or metric_name.startswith("detection")
        self.summary: dict[str, Any] = {}
        self._scores: list[ImageScores] = []
        super().__init__(output_transform=output_transform or NucleiMapsFromOutput(), device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores = []

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        if len(output) not in (2, 3):
            raise ValueError(f"expected (y_pred, y) or (y_pred, y, tissues), got {len(output)} items")
        preds, labels = _maps(output[0], "y_pred"), _maps(output[1], "y")
        tissues = list(output[2]) if len(output) == 3 and output[2] is not None else [None] * len(preds)
        if not len(preds) == len(labels) == len(tissues):
            raise ValueError(f"{len(preds)} predictions, {len(labels)} labels and {len(tissues)} tissues in a batch")
        detect = self.radius_px if self.with_detection else None
        offset = len(self._scores)
        for i, (pred, label, tissue) in enumerate(zip(preds, labels, tissues)):
            gt_type, pred_type = (label[1], pred[1]) if self.num_classes > 1 else (label[1] * 0, pred[1] * 0)
            self._scores.append(
                evaluate_image(
                    label[0], gt_type, pred[0], pred_type, self.num_classes, self.iou_threshold, detect,
                    self.dummy_points, name=str(offset + i), tissue=tissue,
                )
            )

    def compute(self) -> float:
        scores = self._scores
        if idist.get_world_size() > 1:
            scores = [s for part in idist.all_gather(self._scores) for s in part]
        if not scores:
            raise RuntimeError(f"{type(self).__name__} must have at least one image before it can be computed")
        self.summary = summarize(scores, self.num_classes, self.class_names)
        self.summary["per_image"] = [per_image_record(s) for s in scores]
        return float(self.summary[self.metric_name])


class BinaryPQ(NucleiMetric):
    """Binary PQ (nanmean over images with ground-truth nuclei) of the typed prediction when given ``num_classes``
    above 1 (nuclei typed background left out, as the test evaluation scores them), else of the instance maps."""

    def __init__(self, num_classes: int = 1, **kwargs: Any) -> None:
        super().__init__(metric_name="bpq", num_classes=num_classes, **kwargs)


class MultiPQ(NucleiMetric):
    """PanNuke mPQ: per image nanmean over classes, then nanmean over images."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(metric_name="mpq", num_classes=num_classes, **kwargs)


class MultiPQPlus(NucleiMetric):
    """CoNIC mPQ+: counts summed per class over the dataset, PQ per class, then the mean."""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(metric_name="mpq_plus", num_classes=num_classes, **kwargs)


class AJI(NucleiMetric):
    """Aggregated Jaccard Index (mean over images)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metric_name="aji", **kwargs)


class TissueAccuracy(Metric):
    """Accuracy of the tissue head over a dataset; ``summary`` holds
    :func:`.evaluation.tissue_classification`'s confusion matrix and per-class scores.

    Input: the decollated evaluator output, each sample's ``pred[prediction_key]`` the image's (T,) tissue
    probabilities (:class:`scripts.inference.tissue.TissueProbabilitiesd`) and ``label[label_key]`` its tissue
    index. Samples without a prediction (a network without a tissue head) are left out; with none at all the
    accuracy is NaN and ``summary`` empty.

    Args:
        tissue_names: the tissue classes, in the head's order.
        pred_key, prediction_key: where the probabilities are.
        label_key: the key of the tissue index in each sample's ``label``.
        device: ignite's metric device.
    """

    def __init__(self, tissue_names: Sequence[str], pred_key: str = "pred", prediction_key: str = "tissue",
                 label_key: str = "tissue_types", device: str | torch.device = "cpu") -> None:
        self.tissue_names = [str(t) for t in tissue_names]
        self.pred_key, self.prediction_key, self.label_key = pred_key, prediction_key, label_key
        self.summary: dict[str, Any] = {}
        self._pairs: list[tuple[int, int]] = []
        super().__init__(output_transform=lambda output: output, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._pairs = []

    @reinit__is_reduced
    def update(self, output: Sequence[Mapping]) -> None:
        for sample in output:
            probabilities = sample[self.pred_key].get(self.prediction_key)
            if probabilities is None:
                continue
            probabilities = _numpy(probabilities)
            if probabilities.shape != (len(self.tissue_names),):
                raise ValueError(f"{probabilities.shape} tissue probabilities for the {len(self.tissue_names)} "
                                 f"tissue classes {self.tissue_names}")
            self._pairs.append((int(_numpy(sample["label"][self.label_key]).item()), int(np.argmax(probabilities))))

    def compute(self) -> float:
        pairs = self._pairs
        if idist.get_world_size() > 1:
            pairs = [p for part in idist.all_gather(self._pairs) for p in part]
        if not pairs:
            self.summary = {}
            return float("nan")
        self.summary = tissue_classification([t for t, _ in pairs], [p for _, p in pairs], self.tissue_names)
        return float(self.summary["accuracy"])


class NucleiMetricsSaver:
    """Handler: after each evaluation run, write a metric's full summary as JSON and Markdown tables.

    Args:
        metric: the :class:`NucleiMetric` attached to the same engine.
        output_dir: folder for ``<stem>.json`` and ``<stem>.md``.
        stem: file name stem.
        tissue_metric: a :class:`TissueAccuracy` attached to the same engine, whose confusion matrix joins the
            summary as ``tissue_classification``.
    """

    def __init__(self, metric: NucleiMetric, output_dir: str | Path, stem: str = "metrics",
                 tissue_metric: TissueAccuracy | None = None) -> None:
        self.metric = metric
        self.tissue_metric = tissue_metric
        self.output_dir = Path(output_dir)
        self.stem = stem

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() > 0 or not self.metric.summary:
            return
        summary = dict(self.metric.summary)
        per_image = summary.pop("per_image", [])
        if self.tissue_metric is not None and self.tissue_metric.summary:
            summary["tissue_classification"] = self.tissue_metric.summary
        config = {"metric": self.metric.metric_name, "num_classes": self.metric.num_classes,
                  "class_names": self.metric.class_names, "detection_radius_px": self.metric.radius_px}
        write_report(json_ready({"config": config, "summary": summary, "per_image": per_image}), self.output_dir,
                     self.stem)
