"""The tissue head's prediction per image: probabilities from the network's outputs, and the run's ``tissue.csv``.

Tile inference runs the network on windows of ``patch_size`` (MONAI's sliding window), and the tissue head sees one
window at a time. The image's tissue probabilities are the mean, over its pixels, of the windows' softmax blended
like the per-pixel maps (:class:`~scripts.model.spatial_outputs.SpatialOutputs` with ``tissue_key``): each pixel
counts once, as the blending-weighted mean of the windows covering it. An image no larger than one window gets that
window's softmax. A network called on the whole image (evaluation without the upscale protocol) gives ``(T,)``
logits, whose softmax is taken.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import optional_import

from ..files import write_text_atomic

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")

__all__ = ["TissueProbabilitiesd", "TissueTable", "image_tissue"]

TISSUE_MAP_KEY = "tissue_probabilities"
TISSUE_LOGITS_KEY = "tissue_types"


def image_tissue(pred: Mapping[Hashable, Any], map_key: str = TISSUE_MAP_KEY,
                 logits_key: str = TISSUE_LOGITS_KEY) -> np.ndarray | None:
    """(T,) float64 tissue probabilities of one image's network outputs: the mean of a ``(T, H, W)`` probability map
    under ``map_key``, else the softmax of ``(T,)`` logits under ``logits_key``; None when neither is there."""
    if map_key in pred:
        value = torch.as_tensor(pred[map_key]).detach().double()
        if value.ndim != 3:
            raise ValueError(f"{map_key} must be a (T, H, W) map of one image, got shape {tuple(value.shape)}")
        return value.mean(dim=(1, 2)).cpu().numpy()
    if logits_key in pred:
        value = torch.as_tensor(pred[logits_key]).detach().double()
        if value.ndim != 1:
            raise ValueError(f"{logits_key} must be the (T,) logits of one image, got shape {tuple(value.shape)}")
        return torch.softmax(value, dim=0).cpu().numpy()
    return None


class TissueProbabilitiesd(MapTransform):
    """Post-processing: each prediction dict under ``keys`` gets ``tissue`` = :func:`image_tissue`'s (T,)
    probabilities (the probability map is dropped); a network without a tissue head leaves it unchanged.

    Args:
        keys: the per-image prediction dicts (decollated).
        output_key: the key of the probabilities in each dict.
    """

    def __init__(self, keys: KeysCollection = "pred", output_key: str = "tissue") -> None:
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = image_tissue(d[key])
            if probabilities is not None:
                pred = {k: v for k, v in d[key].items() if k != TISSUE_MAP_KEY}
                pred[self.output_key] = probabilities
                d[key] = pred
        return d


class TissueTable:
    """Handler: ``tissue.csv`` of a tile-inference run, one row per image: ``name``, ``tissue`` (the most probable
    class) and ``p_<tissue>`` (each class's probability), in the order the images ran; written (atomically) when the
    run ends, and not at all by a network without a tissue head.

    ``scripts.evaluate`` reads it as the predicted tissues (``--pred_tissues``).

    Args:
        output_dir: output folder.
        tissue_names: the tissue classes, in the head's order.
        pred_key: key of the post-processed prediction dict (holding ``tissue``) in the engine output.
    """

    def __init__(self, output_dir: str | Path, tissue_names: Sequence[str], pred_key: str = "pred") -> None:
        self.path = Path(output_dir) / "tissue.csv"
        self.tissue_names = [str(t) for t in tissue_names]
        self.pred_key = pred_key
        self.rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def __call__(self, engine: Engine) -> None:
        for sample, out in zip(engine.state.batch, engine.state.output):
            probabilities = out[self.pred_key].get("tissue")
            if probabilities is None:
                continue
            probabilities = np.asarray(probabilities, np.float64)
            if probabilities.shape != (len(self.tissue_names),):
                raise ValueError(f"{sample['name']}: {probabilities.shape[0]} tissue probabilities for the "
                                 f"{len(self.tissue_names)} tissue classes {self.tissue_names}")
            best = self.tissue_names[int(np.argmax(probabilities))]
            self.rows.append([str(sample["name"]), best, *(f"{p:.6f}" for p in probabilities)])

    def write(self, engine: Engine | None = None) -> None:
        """Write ``tissue.csv`` (nothing when no image had tissue probabilities)."""
        if not self.rows:
            return
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["name", "tissue", *(f"p_{t}" for t in self.tissue_names)])
        writer.writerows(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, text.getvalue())
