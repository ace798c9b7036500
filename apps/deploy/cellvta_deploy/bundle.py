"""The CellVTA bundle as the app's model: the bundle's inference config, built around a trained model folder.

A model folder holds what the bundle's training writes to ``models/``:

* ``model.pt``: the network's state dict;
* ``dataset.json``: class and tissue names (``scripts.data.datasets.save_class_table``);
* ``overrides.json`` (optional): keys of ``configs/inference.yaml`` describing the trained model, e.g.
  ``{"backbone": "vit-b", "vit_kwargs": {"depth": 8}, "patch_size": 128}``. It is the same file
  ``python -m monai.bundle run inferring --args_file overrides.json`` takes, so the app and the bundle's inference
  workflow build the same network.

The pre-processing, the network, the sliding-window inferer and the post-processing are the objects the bundle's
``inferring`` workflow runs, parsed from its config, so the app finds exactly the nuclei the workflow finds.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from torch import nn

INFERENCE_CONFIG = Path("configs") / "inference.yaml"
MODEL_FILE = "model.pt"
CLASS_TABLE = "dataset.json"
OVERRIDES_FILE = "overrides.json"


def find_bundle(app_dir: Path) -> Path:
    """The bundle folder: ``<app_dir>/bundle`` in a staged MAP, else ``bundles/cellvta`` of the repository.

    Raises:
        FileNotFoundError: neither holds ``configs/inference.yaml``.
    """
    candidates = [app_dir / "bundle", app_dir.parent.parent / "bundles" / "cellvta"]
    for candidate in candidates:
        if (candidate / INFERENCE_CONFIG).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no CellVTA bundle ({INFERENCE_CONFIG}) in {' or '.join(map(str, candidates))}")


def use_bundle(bundle_dir: Path) -> None:
    """Make the bundle's ``scripts`` package importable (its configs and this app import it)."""
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))


def find_model_dir(path: Path) -> Path:
    """The folder holding ``model.pt`` for a model path given to the app (``-m`` or ``HOLOSCAN_MODEL_PATH``).

    Accepted: the ``model.pt`` file itself, its folder, or a folder with exactly one model sub-folder (the layout
    ``monai-deploy package -m`` gives a MAP: ``/opt/holoscan/models/<name>/model.pt``).

    Raises:
        FileNotFoundError: no ``model.pt`` there, naming the path.
    """
    path = Path(path)
    if path.is_file():
        if path.name != MODEL_FILE:
            raise FileNotFoundError(f"{path}: the model file must be named {MODEL_FILE} (beside its {CLASS_TABLE})")
        return path.parent
    if (path / MODEL_FILE).is_file():
        return path
    if path.is_dir():
        found = sorted(p.parent for p in path.glob(f"*/{MODEL_FILE}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise FileNotFoundError(f"{path}: several model folders ({', '.join(p.name for p in found)}); name one")
    raise FileNotFoundError(f"{path}: no {MODEL_FILE} (a model folder holds {MODEL_FILE} and {CLASS_TABLE})")


def read_overrides(model_dir: Path) -> dict[str, Any]:
    """The config overrides of ``<model_dir>/overrides.json`` ({} when the file is absent).

    Raises:
        ValueError: the file is not a JSON object.
    """
    path = model_dir / OVERRIDES_FILE
    if not path.is_file():
        return {}
    try:
        overrides = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys, got {type(overrides).__name__}")
    return overrides


@dataclass
class NucleiPrediction:
    """Nuclei of one image.

    Attributes:
        inst_map: (H, W) int32 instance ids, 0 background.
        type_map: (H, W) int32 class ids, 0 background.
        nuclei: ``scripts.nuclei.postprocess.Nuclei`` (ids, types, probabilities, centroids, boxes, contours).
    """

    inst_map: np.ndarray
    type_map: np.ndarray
    nuclei: Any


@dataclass
class CellVTAPipeline:
    """The bundle's inference objects for one trained model.

    Attributes:
        preprocessing: dict transform, ``{"image": (H, W, 3) uint8}`` -> ``{"image": (3, H, W) float32}`` normalised.
        network: the network restricted to its maps (``scripts.model.spatial_outputs.SpatialOutputs``), in eval mode on
            ``device``.
        inferer: sliding-window inferer, ``(1, 3, H, W)`` -> dict of ``(1, C, H, W)`` maps.
        postprocessing: dict transform on ``{"pred": maps}`` adding ``inst_map``, ``type_map`` and ``nuclei``.
        class_names: class names of the nuclei, background first (a cell classifier's when one is given).
        colours: their RGB colours (a cell classifier's), or None: the bundle's palette.
        magnification: objective magnification the network expects (40 means 0.25 µm per pixel).
        device: where the network runs.
        amp: run the network under autocast (the config's ``amp``, true on CUDA).
    """

    preprocessing: Callable[[dict], dict]
    network: nn.Module
    inferer: Inferer
    postprocessing: Callable[[dict], dict]
    class_names: list[str]
    colours: list[tuple[int, ...]] | None
    magnification: int
    device: torch.device
    amp: bool

    def __call__(self, image: np.ndarray) -> NucleiPrediction:
        """Nuclei of an ``(H, W, 3)`` uint8 RGB image."""
        x = torch.as_tensor(self.preprocessing({"image": image})["image"])[None].to(self.device)
        autocast = torch.autocast(self.device.type) if self.amp else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            maps = self.inferer(x, self.network)
        pred = self.postprocessing({"pred": {k: v[0] for k, v in maps.items()}})["pred"]
        return NucleiPrediction(
            inst_map=np.asarray(pred["inst_map"])[0].astype(np.int32),
            type_map=np.asarray(pred["type_map"])[0].astype(np.int32),
            nuclei=pred["nuclei"],
        )


def load_pipeline(bundle_dir: Path, model_dir: Path, settings: Mapping[str, Any] | None = None) -> CellVTAPipeline:
    """Parse ``configs/inference.yaml`` of ``bundle_dir`` for the model in ``model_dir`` and build its objects.

    The network is built by the config's ``network_def`` with ``checkpoint`` set to ``<model_dir>/model.pt``
    (loaded strictly: a checkpoint of another architecture fails naming the keys), class names come from
    ``<model_dir>/dataset.json`` and ``<model_dir>/overrides.json`` overrides config keys; ``settings`` sets the
    app's keys of the inference config (stain normalisation, classifier: ``AppSettings.config_overrides``).

    Call :func:`use_bundle` first: the config imports the bundle's ``scripts`` package.

    Raises:
        FileNotFoundError: ``model.pt`` or ``dataset.json`` is missing.
        ValueError: the checkpoint does not fit the configured network (the keys or shapes that differ, named), or
            the classifier was trained on another network's embeddings (naming its file).
    """
    bundle_dir, model_dir = Path(bundle_dir).resolve(), Path(model_dir).resolve()
    for name in (MODEL_FILE, CLASS_TABLE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir / name}: not found (a model folder holds {MODEL_FILE} and {CLASS_TABLE})")
    from scripts.workflows.configs import config_files

    parser = ConfigParser()
    parser.read_config(config_files("inferring"))
    overrides = read_overrides(model_dir)
    parser.update(overrides)
    parser.update({"bundle_root": str(bundle_dir), "model_dir": str(model_dir),
                   "checkpoint": str(model_dir / MODEL_FILE), **(settings or {})})
    parser.parse()
    parser.get_parsed_content("initialize")
    try:
        network = parser.get_parsed_content("inference_network").eval()
    except RuntimeError as err:  # the config parser wraps the loader's KeyError / ValueError
        if not isinstance(err.__cause__, (KeyError, ValueError)):
            raise
        reason = err.__cause__.args[0] if err.__cause__.args else err.__cause__
        classifier = (settings or {}).get("classifier")
        if classifier and str(reason).startswith(str(classifier)):  # a classifier of another network's embeddings
            raise ValueError(reason) from err
        raise ValueError(f"{model_dir / MODEL_FILE} does not fit the network of {INFERENCE_CONFIG} with "
                         f"overrides {overrides}: {reason}") from err
    return CellVTAPipeline(
        preprocessing=parser.get_parsed_content("preprocessing"),
        network=network,
        inferer=parser.get_parsed_content("inferer"),
        postprocessing=parser.get_parsed_content("postprocessing"),
        class_names=list(parser.get_parsed_content("output_classes")),
        colours=parser.get_parsed_content("output_colours"),
        magnification=int(parser.get_parsed_content("magnification")),
        device=parser.get_parsed_content("device"),
        amp=bool(parser.get_parsed_content("amp")),
    )
