"""What turns a batch of slide tiles into the maps post-processing needs.

:class:`NetworkPredictor` runs CellVTA / CellViT (bfloat16 weights on capable CPUs, autocast on CUDA). A
predictor takes ``(B, T, T, 3)`` uint8 RGB tiles and their top-left ``(x, y)`` in analysed-image pixels and
returns :class:`PredictedMaps`; the whole-slide pipeline accepts any callable of that shape (the tests use a
ground-truth oracle). :class:`SlideClassifier` is a cell classifier (``classifier.pt``) applied to the nuclei's
embeddings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cells.classifier import load_classifier, predict
from ..cells.embeddings import FeatureSource, model_fingerprint
from ..model.precision import prepare_for_inference
from .tile_cells import PredictedMaps

__all__ = ["NetworkPredictor", "PredictedMaps", "SlideClassifier"]


class SlideClassifier:
    """A cell classifier on whole-slide embeddings: ``(N, D)`` -> ``(N, K)`` softmax probabilities.

    Attributes:
        path: the ``classifier.pt`` file; digest: its SHA-256 (a run resumes only with the same file).
        names: the classifier's class names, background first (type id ``k + 1`` is class ``k``).
        colours: their RGB colours, background (0, 0, 0) first.
    """

    def __init__(self, path: str | Path, source: str, fingerprint: str) -> None:
        self.path = Path(path)
        self.model, table, _ = load_classifier(self.path, source, fingerprint)
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.names = ["background", *table.names]
        self.colours = [(0, 0, 0), *table.colours]

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        return predict(self.model, embeddings)


class NetworkPredictor:
    """CellVTA or CellViT on tiles.

    Args:
        network: the network, weights loaded; it is moved to ``device`` and put in eval mode.
        device: where to run.
        num_classes: classes of the type branch, background included.
        embeddings: also return the embedding source's feature map (``features``) for per-nucleus embeddings.
        embedding_source: ``vit`` (the ViT's last-block tokens after its final norm, ``(D, T/16, T/16)``) or
            ``decoder`` (the last feature map of the decoder branch ``embedding_branch``, ``(64, T, T)``, returned
            as float16), as in :mod:`scripts.cells.embeddings`.
        classifier: a ``classifier.pt`` trained on this network's ``embedding_source`` embeddings (implies
            ``embeddings``); refused (ValueError naming the file) when trained for other embeddings.
        dtype: inference precision (default: :func:`..model.precision.default_precision`); float32 on CUDA runs
            without autocast.

    Attributes:
        classifier: the :class:`SlideClassifier`, or None.
    """

    def __init__(self, network: nn.Module, device: torch.device | str, num_classes: int,
                 embeddings: bool = False, embedding_source: str = "vit", embedding_branch: str = "nuclei_type_map",
                 classifier: str | Path | None = None, dtype: torch.dtype | None = None) -> None:
        self.classifier = (None if classifier is None else
                           SlideClassifier(classifier, embedding_source, model_fingerprint(network)))
        self.embeddings = embeddings or classifier is not None
        self.features = FeatureSource(network, embedding_source, embedding_branch) if self.embeddings else None
        self.device = torch.device(device)
        self.network = network
        self.dtype = prepare_for_inference(network, self.device, dtype)
        self.num_classes = num_classes
        self._mean = torch.as_tensor(network.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.as_tensor(network.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        # the uint8 tiles travel to the device (a quarter of the float32 bytes) and are normalised there
        x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.device.type == "cpu":
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
            out = self.network(x)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self.network(x)
        nuclei = torch.softmax(out["nuclei_binary_map"].float(), dim=1)[:, 1]
        types = out["nuclei_type_map"].float().argmax(dim=1).to(torch.uint8)
        features = None
        if self.features is not None:
            maps = self.features(*tiles.shape[1:3])
            features = (maps if self.features.scale > 1 else maps.half()).cpu().numpy()
        tissue = (torch.softmax(out["tissue_types"].float(), dim=1).cpu().numpy() if "tissue_types" in out
                  else None)
        return PredictedMaps(nuclei.cpu().numpy(), out["hv_map"].float().cpu().numpy(), types.cpu().numpy(),
                             features, tissue=tissue)
