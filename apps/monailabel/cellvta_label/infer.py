"""The MONAI Label inference task: the bundle's inference on a tile or on a region of a tile or slide."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, SlidingWindowInferer
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import PolygonWriter

from .annotations import geojson, in_core, monai_label_annotation
from .bundle import BundleModel
from .regions import read_region

POLYGON_OUTPUTS = ("asap", "dsa", "json")
logger = logging.getLogger(__name__)


def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Windows a ``SlidingWindowInferer`` with ``roi_size`` and ``overlap`` runs over an image of ``image_size``
    (spatial sizes; the image is padded to at least ``roi_size``)."""
    size = [max(i, r) for i, r in zip(image_size, roi_size)]
    interval = [r if r == i else max(int(r * (1 - overlap)), 1) for i, r in zip(size, roi_size)]
    return len(dense_patch_slices(size, roi_size, interval))


class ProgressInferer(Inferer):
    """A sliding-window inferer that logs its progress: one line every ``every`` windows and one at the end
    (windows done of the image's total, seconds so far).

    Args:
        inferer: the bundle's sliding-window inferer (``scripts.inference.windows.AlignedSlidingWindowInferer``).
        every: windows between two progress lines (0: only the final line).
        name: what the lines call the image (the request's image id and region).
    """

    def __init__(self, inferer: SlidingWindowInferer, every: int, name: str) -> None:
        super().__init__()
        self.inferer, self.every, self.name = inferer, every, name

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        """``inputs``: ``(B, C, H, W)``; returns what the wrapped inferer returns."""
        size = inputs.shape[2:]
        roi = [r if r > 0 else s for r, s in zip(self.inferer.roi_size, size)]
        # an inferer aligned to a grid (a cell classifier on ViT tokens) pads the image to a multiple of it
        multiple = getattr(self.inferer, "multiple", 1)
        total = inputs.shape[0] * window_count([-(-s // multiple) * multiple for s in size], roi, self.inferer.overlap)
        start, done = time.perf_counter(), 0

        def counted(windows: torch.Tensor, *a: Any, **k: Any) -> Any:
            nonlocal done
            out = network(windows, *a, **k)
            before, done = done, done + windows.shape[0]
            if done == total or (self.every and done // self.every > before // self.every):
                logger.info(f"{self.name}: {done} / {total} windows of {size[-1]} x {size[-2]} px in "
                            f"{time.perf_counter() - start:.1f} s")
            return out

        return self.inferer(inputs, counted, *args, **kwargs)


class ReadRegiond:
    """Replace ``data["image"]`` (path or array) by the pixels of the request and record where they come from.

    Reads ``location``, ``size``, ``level`` and ``margin`` of the request (see :func:`regions.read_region`);
    without ``size`` the whole image is read. Sets ``data["image"]`` to ``(H, W, 3)`` uint8 and
    ``data["region"]`` to the :class:`regions.Region`.
    """

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d["image"], d["region"] = read_region(
            d["image"], d.get("location"), d.get("size"), int(d.get("level", 0) or 0), int(d.get("margin", 0) or 0)
        )
        return d


class NucleiResultd:
    """Turn the post-processed prediction into the request's result.

    Keeps the nuclei whose centroid lies in the requested area, then sets ``data["result"]`` to
    ``{"annotation": ..., "nuclei": GeoJSON, "count": N}`` (level-0 image coordinates) and ``data["pred"]``
    to the ``(h, w)`` uint8 type map of the requested area (the label image of ``/infer``).

    Args:
        class_names: class names, background first.
        colours: their RGB colours (a cell classifier's), or None: the bundle's palette.
    """

    def __init__(self, class_names: Sequence[str], colours: Sequence[Sequence[int]] | None = None) -> None:
        self.class_names = list(class_names)
        self.colours = colours

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        region = d["region"]
        # MONAI Label's ASAP writer puts names into XML attributes as they are
        names = self.class_names
        if d.get("output") == "asap":
            names = [escape(n, {'"': "&quot;"}) for n in names]
        nuclei = in_core(d["pred"]["nuclei"], region)
        left, top, width, height = region.core
        type_map = np.asarray(d["pred"]["type_map"]).reshape(d["pred"]["type_map"].shape[-2:])
        d["pred"] = type_map[top:top + height, left:left + width].astype(np.uint8)
        d["result"] = {
            "annotation": monai_label_annotation(nuclei, region, names, self.colours),
            "nuclei": geojson(nuclei, region, self.class_names, self.colours),
            "count": len(nuclei),
        }
        return d


class CellVTAInfer(BasicInferTask):
    """Nuclei instance segmentation and classification with the served CellVTA bundle.

    ``/infer/<model>`` on a tile returns its nuclei (``result.nuclei``: the bundle's GeoJSON, the same as its
    inference workflow writes) and the type map as a PNG label. ``/infer/wsi_v2/<model>?output=asap`` (QuPath,
    ASAP) or ``output=dsa`` (Digital Slide Archive) cuts a slide region into ``tile_size`` tiles, reads each
    with ``margin`` pixels of context, keeps the nuclei centred in the tile and returns every nucleus's
    polygon under its class name. With a cell classifier (``classifier.pt``) each nucleus's class and probability
    are the classifier's, under its class names and colours.

    Args:
        model: the served bundle.
        margin: default context around requested regions, in pixels.
        progress_every: sliding windows between two progress lines in the log (0: one line per image or tile).
    """

    def __init__(self, model: BundleModel, margin: int, progress_every: int = 16) -> None:
        self.model = model
        self.progress_every = progress_every
        super().__init__(
            path=str(model.model_file),
            network=None,
            type=InferType.SEGMENTATION,
            labels=model.labels() if model.is_ready() else {},
            dimension=2,
            description="CellVTA nuclei instance segmentation and classification in H and E images",
            # MONAI Label's slide tiling spreads tiles over all GPUs unless told otherwise, and fails on a
            # machine without any
            config={"margin": margin, "multi_gpu": torch.cuda.device_count() > 1},
            load_strict=True,
        )

    def is_valid(self) -> bool:
        return self.model.is_ready()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["labels"] = self.model.labels() if self.model.is_ready() else {}
        info["pathology"] = True
        return info

    def pre_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        self.labels = self.model.labels()
        return [ReadRegiond(), *self.model.preprocessing()]

    def inferer(self, data: dict | None = None) -> Inferer:
        data = data or {}
        name = str(data.get("image_path") or data.get("image_id") or "image")
        name = os.path.basename(name) if os.path.sep in name else name
        if data.get("location") is not None and data.get("size") is not None:
            name += f" region {list(data['location'])} {list(data['size'])}"
        return ProgressInferer(self.model.inferer(), self.progress_every, name)

    def post_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return [*self.model.postprocessing(), NucleiResultd(self.model.output_classes(), self.model.output_colours())]

    def _get_network(self, device: str, data: dict | None) -> torch.nn.Module:
        return self.model.network(device)

    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[Any, dict]:
        """ASAP XML / DSA JSON / JSON polygons when the request asks for them (and inside slide tiling, where
        nothing is written), else the type map as a PNG label next to the JSON result."""
        if data.get("output") in POLYGON_OUTPUTS or not data.get("result_write_to_file", True):
            return PolygonWriter(label="pred", json="result")(data)
        fd, path = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        if not cv2.imwrite(path, data["pred"]):
            raise OSError(f"could not write the label image {path}")
        return path, data["result"]
