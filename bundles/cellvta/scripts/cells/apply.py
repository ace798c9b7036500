"""A trained cell classifier typing the nuclei a network detects, in tile inference and evaluation.

The classifier's embedding source is hooked on the network (:class:`~.embeddings.FeatureSource`): wrapped as
``SpatialOutputs(network, features=classifier.hook(network))`` the network also returns that source's map, which the
sliding window stitches with the other maps (:class:`scripts.inference.windows.AlignedSlidingWindowInferer` keeps
the ``vit`` source's 1/16 map on its token grid). After the post-processing, :class:`NucleiClassifier` pools the
map over each detected nucleus exactly as the cached embeddings the classifier was trained on
(:func:`~.embeddings.padded_instances` + :func:`~.embeddings.pool_cells`) and replaces each nucleus' class and
probability with the classifier's (softmax).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_numpy
from torch import nn

from ..nuclei.evaluation import class_lut
from .classifier import load_classifier, predict
from .embeddings import SOURCES, FeatureSource, model_fingerprint, padded_instances, pool_cells

__all__ = ["NucleiClassifier", "check_unseen"]

BACKGROUND_COLOUR = (0, 0, 0)


def check_unseen(path: Path, trained_on: Mapping[str, str], evaluated: Mapping[str, str | None]) -> None:
    """Refuse to score a classifier on images whose nuclei trained or validated it (ValueError naming them).

    Args:
        trained_on: ``{name: pixel digest}`` of the classifier's images ("" where it was not recorded).
        evaluated: ``{name: pixel digest}`` of the evaluated images (None where their pixels are not at hand).

    Images are the same when their pixels are, whatever their names, when both sides have digests; otherwise
    when their names are.
    """
    by_pixels = all(trained_on.values()) and all(evaluated.values())
    digests = set(trained_on.values())
    seen = sorted(name for name, digest in evaluated.items()
                  if (digest in digests if by_pixels else name in trained_on))
    if seen:
        listed = ", ".join(seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
        raise ValueError(f"{path}: trained on {len(seen)} of the {len(evaluated)} evaluated images ({listed}); "
                         "score it on images it has not seen (configs/classifier.yaml: classifier_held_out_splits)")


class NucleiClassifier:
    """A ``classifier.pt`` (``scripts.cells.classifier``) applied to the nuclei of a network's outputs.

    :meth:`hook` checks that the classifier was trained on ``network``'s embeddings (fingerprint) and hooks its
    embedding source on it: give the result to ``SpatialOutputs(network, features=...)``. A classifier of another
    network, of a source the network lacks, or with classes that do not match ``classes`` is refused, naming the
    file, before any image is read.

    As a transform of the post-processed prediction dict (``inst_map`` (1, H, W), ``nuclei``, and the stitched
    source map ``(D, h, w)`` under ``features_key``) it sets ``nuclei.types`` (the classifier's most probable
    class), ``nuclei.type_probs`` (its softmax probability) and ``type_map``, and drops the source map.

    Args:
        path: the ``classifier.pt``.
        classes: names of the output class ids, background first; None: the classifier's classes as ids 1..K
            (with its colours).
        class_map: {classifier class: name in ``classes``}; None: the classifier's classes must be those of
            ``classes`` (background excluded).
        features_key: the key of the source map in the prediction dict.
        evaluated: ``{name: pixel digest}`` of the images the classifier's types are to be scored on
            (``scripts.data.datasets.image_digests``): refused (ValueError) when it was trained on any of them.

    Attributes:
        source, branch: the classifier's embedding source (and decoder branch, as recorded in its file); scale:
            the input's resolution over the source's map (16 or 1).
        class_names: the output classes, background first.
        colours: their RGB colours (background first): the classifier's, or None (the writers' palette) with
            ``classes``.
    """

    def __init__(self, path: str | Path, classes: Sequence[str] | None = None,
                 class_map: Mapping[str, str] | None = None, features_key: str = "source_features",
                 evaluated: Mapping[str, str | None] | None = None) -> None:
        self.path = Path(path)
        self.model, table, meta = load_classifier(self.path)
        check_unseen(self.path, meta["images"], evaluated or {})
        self.source, self.branch = meta["source"], meta["branch"]
        if self.source not in SOURCES:
            raise ValueError(f"{self.path}: unknown embedding source {self.source!r}; known: {list(SOURCES)}")
        self.scale = 16 if self.source == "vit" else 1
        self.features_key = features_key
        if classes is None:
            self.class_names = ["background", *table.names]
            self.colours: list[tuple[int, ...]] | None = [BACKGROUND_COLOUR, *map(tuple, table.colours)]
            self._lut = np.arange(len(table.names) + 1, dtype=np.int32)
        else:
            self._lut = class_lut(table.names, classes, class_map, f"classifier {self.path}").astype(np.int32)
            self.class_names = list(classes)
            self.colours = None

    def hook(self, network: nn.Module) -> FeatureSource:
        """The classifier's embedding source hooked on ``network``, after checking that the classifier was
        trained on this network's embeddings (ValueError naming the file otherwise)."""
        load_classifier(self.path, self.source, model_fingerprint(network))
        try:
            return FeatureSource(network, self.source, self.branch)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from e

    def embed(self, features: torch.Tensor, inst_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``(N, D)`` float32 embeddings of the nuclei ``ids`` (N,) of ``inst_map`` (H, W) from the stitched
        source map ``features`` (D, h, w) of the image padded at its bottom and right to ``(h s, w s)``."""
        inst = padded_instances(np.asarray(inst_map), features, self.scale).to(features.device)
        ids_t = torch.as_tensor(np.asarray(ids, np.int64), device=features.device)
        return pool_cells(features.float(), inst, ids_t).cpu().numpy().astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        features = torch.as_tensor(d.pop(self.features_key))
        inst = convert_to_numpy(d["inst_map"])
        inst = inst[0] if inst.ndim == 3 else inst
        nuclei = d["nuclei"]
        probs = predict(self.model, self.embed(features, inst, nuclei.ids))
        best = probs.argmax(1)
        nuclei = replace(nuclei, types=self._lut[best + 1],
                         type_probs=probs[np.arange(len(best)), best].astype(np.float32))
        d["nuclei"] = nuclei
        d["type_map"] = nuclei.type_map(inst)[None]
        return d
