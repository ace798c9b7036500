"""Ignite handlers writing the workflows' per-image outputs: predicted maps, GeoJSON and overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import optional_import

from ..data.datasets import read_image, write_png
from ..files import atomic_path
from .writers import overlay, write_geojson, write_maps

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _plane(value: Any) -> np.ndarray:
    """(1, H, W) or (H, W) -> (H, W) int32."""
    arr = _as_array(value)
    return (arr[0] if arr.ndim == 3 else arr).astype(np.int32)


class PredictionSaver:
    """Write ``inst_map``/``type_map`` (and ``gt_inst_map``/``gt_type_map``) of every image as ``<name>.npz``.

    Expects a decollated engine (``engine.state.batch`` and ``engine.state.output`` lists of per-image dicts).

    The files are what ``python -m scripts.evaluate --pred=<output_dir> --gt=<output_dir>
    --gt_keys=gt_inst_map,gt_type_map`` reads.

    Args:
        output_dir: folder of the npz files.
        pred_key: key of the post-processed prediction dict in the output (holding ``inst_map``, ``type_map``).
        label_key: key of the target dict in the output (``inst_map``, ``nuclei_type_map``), if any.
    """

    def __init__(
        self,
        output_dir: str | Path,
        pred_key: str = "pred",
        label_key: str = "label",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key = pred_key
        self.label_key = label_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, engine: Engine) -> None:
        for i, (sample, out) in enumerate(zip(engine.state.batch, engine.state.output)):
            name = str(sample.get("name", f"image_{engine.state.iteration:05d}_{i}"))
            pred = out[self.pred_key]
            arrays = {"inst_map": _plane(pred["inst_map"]), "type_map": _plane(pred["type_map"])}
            label = out.get(self.label_key)
            if isinstance(label, Mapping) and "inst_map" in label:
                arrays["gt_inst_map"] = _plane(label["inst_map"])
                arrays["gt_type_map"] = _plane(label["nuclei_type_map"])
            with atomic_path(self.output_dir / f"{name}.npz") as tmp:
                np.savez_compressed(tmp, **arrays)


class InferenceWriter:
    """For every image: ``<name>.npz`` (instance and type maps, and ``tissue_probabilities`` (T,) when the
    prediction holds ``tissue``, see :class:`.tissue.TissueProbabilitiesd`), ``<name>.geojson`` (QuPath detections with
    class and type probability) and ``<name>_overlay.png`` (contours in class colours on the image).

    Expects a decollated engine whose output dicts hold ``pred`` = the post-processing dict
    (``inst_map``, ``type_map``, ``nuclei``) and whose batch dicts hold ``name`` and ``path``.

    Args:
        output_dir: output folder.
        class_names: all class names, background first.
        overlays: also write the overlay PNGs.
        colours: RGB class colours, background first (a cell classifier's); None: the writers' palette.
    """

    def __init__(self, output_dir: str | Path, class_names: list[str], overlays: bool = True,
                 colours: Sequence[Sequence[int]] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.overlays = overlays
        self.colours = colours

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.output_dir.mkdir(parents=True, exist_ok=True))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for sample, out in zip(engine.state.batch, engine.state.output):
            name = str(sample["name"])
            pred = out["pred"]
            nuclei = pred["nuclei"]
            write_maps(self.output_dir / f"{name}.npz", _plane(pred["inst_map"]), _plane(pred["type_map"]),
                       _as_array(pred["tissue"]) if "tissue" in pred else None)
            write_geojson(self.output_dir / f"{name}.geojson", nuclei, self.class_names, self.colours)
            if self.overlays:
                drawn = overlay(read_image(sample["path"]), nuclei, self.colours)
                write_png(self.output_dir / f"{name}_overlay.png", drawn)
