"""Active-learning strategies: which image (or which patch of an image) to annotate next."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from .bundle import BundleModel
from .regions import image_extent, read_region
from .uncertainty import METHODS, mc_dropout_network, mutual_information, type_probabilities

Box = list[int]


def patch_boxes(extent: Sequence[int], patch: Sequence[int]) -> list[Box]:
    """Non-overlapping ``[x, y, w, h]`` patches covering an image of ``extent`` = (width, height); the last row and
    column are shifted inside the image (patches are clipped to it when it is smaller)."""
    width, height = int(extent[0]), int(extent[1])
    pw, ph = min(int(patch[0]), width), min(int(patch[1]), height)
    if pw <= 0 or ph <= 0:
        raise ValueError(f"patch_size {list(patch)} and image size {[width, height]} must be positive")
    xs = sorted({min(x, width - pw) for x in range(0, width, pw)})
    ys = sorted({min(y, height - ph) for y in range(0, height, ph)})
    return [[x, y, pw, ph] for y in ys for x in xs]


def _image_extent(request: dict, datastore: Datastore) -> tuple[int, int]:
    size = request.get("image_size") or [0, 0]
    if int(size[0]) > 0 and int(size[1]) > 0:
        return int(size[0]), int(size[1])
    return image_extent(datastore.get_image_uri(request["image"]))


def served_weights(last_served: Sequence[float], now: float) -> list[float]:
    """Selection weights of images last served at ``last_served`` (seconds; 0 = never): one plus the seconds
    since, so images served long ago are likelier and the weights never sum to zero."""
    return [1.0 + max(now - float(ts), 0.0) for ts in last_served]


class RandomSample(Strategy):
    """A random unlabelled image (images served long ago are likelier, as in MONAI Label's ``Random``, and every
    image keeps a chance when all were just served), or, when the request names an ``image`` and a
    ``patch_size`` (QuPath's "Next Patch"), a random patch of that image returned as ``bbox`` = ``[x, y, w, h]``."""

    def __init__(self) -> None:
        super().__init__("Random: an unlabelled image, or a random patch of the given image")

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        if request.get("image") and request.get("patch_size"):
            boxes = patch_boxes(_image_extent(request, datastore), request["patch_size"])
            return {"id": request["image"], "bbox": random.choice(boxes)}
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "random")
        served = [datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0) for i in images]
        weights = served_weights(served, time.time())
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}


class EpistemicSample(Strategy):
    """The unlabelled image (or the patch of the given image) the served model is least sure about.

    The score is the mean per-pixel mutual information of the nuclei type probabilities over ``samples``
    predictions under test-time augmentation (``tta``: flips and quarter turns) or MC dropout (``mc_dropout``:
    the network's dropout and drop-path layers stay active). Image scores are kept in the datastore's image
    info (key ``cellvta_<method>``) with the weights they were computed with, and computed again after the
    model changes. Images larger than ``max_side`` are scored on their central ``max_side`` square; patch
    requests score at most ``max_candidates`` random patches.

    Args:
        model: the served bundle.
        method: ``tta`` or ``mc_dropout``.
        samples: predictions per score.
        max_side: largest side scored.
        max_candidates: patches scored per patch request.
    """

    def __init__(self, model: BundleModel, method: str, samples: int = 4, max_side: int = 2048,
                 max_candidates: int = 8) -> None:
        if method not in METHODS:
            raise ValueError(f"uncertainty method {method!r}: expected one of {METHODS}")
        super().__init__(f"Epistemic uncertainty ({method}, {samples} samples): the image the model is least "
                         "sure about")
        self.model = model
        self.method = method
        self.samples = samples
        self.max_side = max_side
        self.max_candidates = max_candidates
        self.key = f"cellvta_{method}"
        self._stochastic: tuple[str, torch.nn.Module] | None = None

    def _network(self, device: torch.device) -> torch.nn.Module:
        network = self.model.network(device)
        if self.method != "mc_dropout":
            return network
        tag = f"{self.model.version_tag()}@{device}"
        if self._stochastic is None or self._stochastic[0] != tag:
            self._stochastic = (tag, mc_dropout_network(network))
        return self._stochastic[1]

    def score(self, pixels: np.ndarray, samples: int) -> float:
        """Mean mutual information (nats) of an ``(H, W, 3)`` uint8 image."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data: dict[str, Any] = {"image": pixels}
        for transform in self.model.preprocessing():
            data = transform(data)
        image = torch.as_tensor(data["image"])[None].to(device)
        probs = type_probabilities(self._network(device), self.model.inferer(), image, self.method, samples)
        return float(mutual_information(probs))

    def _centre(self, path: str) -> np.ndarray:
        width, height = image_extent(path)
        side = self.max_side
        if max(width, height) <= side:
            return read_region(path)[0]
        location = (max((width - side) // 2, 0), max((height - side) // 2, 0))
        return read_region(path, location, (min(width, side), min(height, side)))[0]

    def image_score(self, image_id: str, datastore: Datastore, samples: int) -> float:
        """The image's score, from the datastore when it was computed with the current weights."""
        tag = self.model.version_tag()
        cached = datastore.get_image_info(image_id).get(self.key) or {}
        if cached.get("model") == tag and cached.get("samples") == samples:
            return float(cached["score"])
        value = self.score(self._centre(datastore.get_image_uri(image_id)), samples)
        datastore.update_image_info(image_id, {self.key: {"score": value, "model": tag, "samples": samples}})
        return value

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        samples = int(request.get("samples", self.samples))
        if request.get("image") and request.get("patch_size"):
            return self._next_patch(request, datastore, samples)
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = {image: self.image_score(image, datastore, samples) for image in images}
        best = max(images, key=lambda image: scores[image])
        return {"id": best, "score": scores[best], "method": self.method, "scores": scores}

    def _next_patch(self, request: dict, datastore: Datastore, samples: int) -> dict[str, Any]:
        path = datastore.get_image_uri(request["image"])
        boxes = patch_boxes(_image_extent(request, datastore), request["patch_size"])
        if len(boxes) > self.max_candidates:
            boxes = random.sample(boxes, self.max_candidates)
        scores = [self.score(read_region(path, box[:2], box[2:])[0], samples) for box in boxes]
        best = int(np.argmax(scores))
        return {"id": request["image"], "bbox": boxes[best], "score": scores[best], "method": self.method}
