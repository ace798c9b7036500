"""The served CellVTA bundle: its own inference config (pre-processing, sliding-window inferer, HoVer-Net
post-processing), the class table and the weights of the model folder, reloaded when training publishes."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from torch import nn

from .config import INFERENCE_WORKFLOW, AppConfig

MODEL_FILE = "model.pt"
CLASS_TABLE = "dataset.json"
NETWORK_RECORD = "overrides.json"


def read_network_record(model_dir: Path) -> dict[str, Any]:
    """The config keys describing the network of ``<model_dir>/model.pt`` (``overrides.json`` beside it, the
    ``--args_file`` of the bundle's workflows), or {} when the folder has none.

    Raises:
        ValueError: the file is not a JSON object, naming it.
    """
    path = Path(model_dir) / NETWORK_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys, got {type(record).__name__}")
    return record


def network_settings(model_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The model folder's network record with the app's ``overrides`` added.

    Raises:
        ValueError: an override contradicts the record (the checkpoint was trained otherwise).
    """
    record = read_network_record(model_dir)
    clashes = {k: (record[k], v) for k, v in overrides.items() if k in record and record[k] != v}
    if clashes:
        details = "; ".join(f"{k}: {a!r} in the record, {b!r} in --conf overrides" for k, (a, b) in clashes.items())
        raise ValueError(f"{Path(model_dir) / NETWORK_RECORD} describes the checkpoint otherwise than --conf "
                         f"overrides ({details}); drop those overrides")
    return {**record, **overrides}


def use_bundle_scripts(bundle: Path) -> None:
    """Put the bundle folder on ``sys.path``: its configs import the ``scripts`` package."""
    path = str(bundle)
    if path not in sys.path:
        sys.path.insert(0, path)


def workflow_configs(workflow: str) -> list[str]:
    """The config files (absolute paths, merged in order) of one of the bundle's workflows."""
    from scripts.workflows.configs import config_files

    return config_files(workflow)


def bundle_parser(bundle: Path, workflow: str, overrides: Mapping[str, Any]) -> ConfigParser:
    """A parser of the configs of the bundle's ``workflow`` with ``bundle_root`` set to the bundle and
    ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(workflow_configs(workflow))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


class BundleModel:
    """The bundle's inference pieces for the model folder of ``config``.

    Every accessor first checks the modification times of ``model.pt``, ``dataset.json`` and the cell classifier
    and re-reads the config, the class table, the weights and the classifier when training has published new ones.

    Args:
        config: the app's settings (bundle, model folder, config overrides).
    """

    def __init__(self, config: AppConfig) -> None:
        use_bundle_scripts(config.bundle)
        self.config = config
        self._lock = threading.RLock()
        self._version: tuple[int, int, int] | None = None
        self._parser: ConfigParser | None = None
        self._networks: dict[str, nn.Module] = {}

    @property
    def model_file(self) -> Path:
        return self.config.model_dir / MODEL_FILE

    @property
    def class_table(self) -> Path:
        return self.config.model_dir / CLASS_TABLE

    def is_ready(self) -> bool:
        """True when the model folder holds weights and a class table."""
        return self.model_file.is_file() and self.class_table.is_file()

    def version(self) -> tuple[int, int, int]:
        """Modification times (ns) of the weights, the class table and the classifier (0 without one)."""
        if not self.is_ready():
            raise FileNotFoundError(
                f"{self.config.model_dir}: no served model ({MODEL_FILE} and {CLASS_TABLE} are written by the "
                "bundle's training or by this app's /train)"
            )
        classifier = self.config.classifier
        return (self.model_file.stat().st_mtime_ns, self.class_table.stat().st_mtime_ns,
                classifier.stat().st_mtime_ns if classifier is not None and classifier.is_file() else 0)

    def version_tag(self) -> str:
        """A string naming the current weights (for caches of per-image scores)."""
        weights, table, _ = self.version()
        return f"{weights}-{table}"

    def _current(self) -> ConfigParser:
        with self._lock:
            version = self.version()
            if version != self._version or self._parser is None:
                classifier = self.config.classifier
                self._parser = bundle_parser(
                    self.config.bundle, INFERENCE_WORKFLOW,
                    {"model_dir": str(self.config.model_dir), **self.settings(), **self.config.stain,
                     "classifier": str(classifier) if version[2] else None},
                )
                self._networks.clear()
                self._version = version
            return self._parser

    def settings(self) -> dict[str, Any]:
        """Config keys of the served network: the model folder's record and the app's overrides."""
        return network_settings(self.config.model_dir, self.config.overrides)

    def check(self) -> None:
        """Build the network, load the served weights and check the cell classifier once.

        Raises:
            ValueError: the checkpoint does not fit the configured network, naming the keys or shapes; or the
                classifier is not one, or was trained on another network's embeddings, naming its file.
        """
        try:
            network = self.build_network()
        except (KeyError, ValueError, RuntimeError) as err:
            cause = err.__cause__ if isinstance(err, RuntimeError) and err.__cause__ is not None else err
            reason = cause.args[0] if cause.args else cause
            raise ValueError(f"{self.model_file} does not fit the network of the {INFERENCE_WORKFLOW} configs with "
                             f"{self.settings()}: {reason}") from err
        features = self.features(network)  # a classifier of another network's embeddings stops here
        if features is not None:
            features.close()

    def cell_classifier(self) -> Any:
        """The cell classifier of the inference config (``scripts.cells.apply.NucleiClassifier``), or None when the
        classifier file does not exist.

        Raises:
            ValueError: the file is not a classifier, naming it.
        """
        try:
            return self._content("cell_classifier")
        except RuntimeError as err:  # the config parser wraps the loader's ValueError
            raise (err.__cause__ if isinstance(err.__cause__, (ValueError, OSError)) else err) from err

    def features(self, network: nn.Module) -> Callable[[int, int], torch.Tensor] | None:
        """The cell classifier's embedding source hooked on ``network`` (``scripts.cells.embeddings.FeatureSource``),
        or None without a classifier.

        Raises:
            ValueError: the classifier was trained on the embeddings of another network (other weights or
                architecture), naming its file.
        """
        classifier = self.cell_classifier()
        return None if classifier is None else classifier.hook(network)

    def _content(self, key: str, lazy: bool = True) -> Any:
        with self._lock:
            return self._current().get_parsed_content(key, instantiate=True, lazy=lazy)

    def classes(self) -> list[str]:
        """Class names of the served network's type branch, background first."""
        return list(self._content("classes"))

    def output_classes(self) -> list[str]:
        """Class names of the nuclei returned, background first: the cell classifier's when there is one."""
        return list(self._content("output_classes"))

    def output_colours(self) -> list[tuple[int, ...]] | None:
        """RGB colours of :meth:`output_classes` (the cell classifier's), or None: the bundle's palette."""
        return self._content("output_colours")

    def magnification(self) -> int:
        """The magnification of the network's input (the post-processing's preset)."""
        return int(self._content("magnification"))

    def labels(self) -> dict[str, int]:
        """Class name -> class id of the nuclei returned, background left out (MONAI Label's ``labels``)."""
        return {name: i for i, name in enumerate(self.output_classes()) if i > 0}

    def preprocessing(self) -> list[Callable]:
        """The bundle's pre-processing: ``{"image": (H, W, 3) uint8}`` -> ``(3, H, W)`` normalised float32."""
        pre = self._content("preprocessing")
        return list(pre.transforms) if isinstance(pre, Compose) else list(pre)

    def inferer(self) -> Callable:
        """The bundle's sliding-window inferer (``roi_size`` = the training patch size, overlap, gaussian)."""
        return self._content("inferer")

    def postprocessing(self) -> list[Callable]:
        """The bundle's post-processing: ``pred`` = dict of maps -> dict with ``inst_map``, ``type_map``, ``nuclei``."""
        post = self._content("postprocessing")
        return list(post.transforms) if isinstance(post, Compose) else [post]

    def build_network(self) -> nn.Module:
        """A new network of the bundle's ``network_def`` with the served weights, on CPU, in eval mode."""
        from scripts.model.weights import load_weights

        with self._lock:
            network = self._content("network_def", lazy=False)
            load_weights(network, checkpoint=self.model_file)
        return network.eval()

    def network(self, device: str | torch.device) -> nn.Module:
        """The served network restricted to its per-pixel outputs (``scripts.model.spatial_outputs.SpatialOutputs``)
        and, with a cell classifier, its embedding source's map; in eval mode on ``device``; one instance per device,
        rebuilt when the weights or the classifier change."""
        from scripts.model.spatial_outputs import SpatialOutputs

        key = str(device)
        with self._lock:
            self._current()
            if key not in self._networks:
                network = self.build_network()
                self._networks[key] = SpatialOutputs(network, features=self.features(network)).to(
                    torch.device(device)).eval()
            return self._networks[key]
