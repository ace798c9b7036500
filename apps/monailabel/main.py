"""MONAI Label app serving the local CellVTA bundle: inference on tiles and slide regions, fine-tuning on the
datastore's labels, and random or uncertainty-driven active learning. See README.md beside this file."""

from __future__ import annotations

import json
import logging
from typing import Any

from cellvta_label.bundle import BundleModel
from cellvta_label.classifier import CellClassifierTrain
from cellvta_label.config import WSI_CONFIG, AppConfig
from cellvta_label.guards import SafeDatastore, check_name, is_upload, public_message
from cellvta_label.infer import CellVTAInfer
from cellvta_label.regions import check_slide_request
from cellvta_label.strategies import EpistemicSample, RandomSample
from cellvta_label.train import CellVTATrain
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class CellVTAApp(MONAILabelApp):
    """The app. Settings come from ``--conf key value`` (see ``cellvta_label.config.AppConfig``): ``bundle``,
    ``model_dir``, ``work_dir``, ``overrides`` (JSON), ``model_name``, ``margin``, ``max_side``,
    ``uncertainty_samples``, ``progress_every``, ``classifier``, ``stain_normalization``, ``stain_reference``,
    ``stain_vectors``, ``stain_max_concentrations``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.app_config = AppConfig.from_conf(app_dir, conf)
        self.model = BundleModel(self.app_config)
        if self.model.is_ready():
            self.model.check()  # a checkpoint that does not fit stops the server here, not at the first request
        metadata = json.loads((self.app_config.bundle / "configs" / "metadata.json").read_text())
        logger.info(f"CellVTA bundle {self.app_config.bundle} (version {metadata['version']}); "
                    f"model folder {self.app_config.model_dir}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CellVTA",
            description=metadata["description"],
            version=metadata["version"],
        )

    def init_infers(self) -> dict[str, InferTask]:
        infer = CellVTAInfer(self.model, self.app_config.margin, self.app_config.progress_every)
        return {self.app_config.model_name: infer}

    def init_trainers(self) -> dict[str, TrainTask]:
        name = self.app_config.model_name
        classifier = CellClassifierTrain(self.model, self.app_config)
        return {name: CellVTATrain(self.model, self.app_config, classifier), f"{name}_classifier": classifier}

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "random": RandomSample(),
            "epistemic_tta": EpistemicSample(self.model, "tta", self.app_config.uncertainty_samples,
                                             self.app_config.max_side),
            "epistemic_mc_dropout": EpistemicSample(self.model, "mc_dropout", self.app_config.uncertainty_samples,
                                                    self.app_config.max_side),
        }

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SafeDatastore(self.studies, settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                             settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                             num_classes=lambda: len(self.model.classes()) if self.model.is_ready() else 256)

    def _roots(self) -> dict[str, str]:
        roots = dict(getattr(self._datastore, "roots", {}))
        roots.update({str(self.app_config.model_dir): "<model folder>", str(self.app_config.bundle): "<bundle>"})
        return roots

    def _model_task(self, request: dict) -> None:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"model {model!r}: not served (models: {', '.join(self._infers)})")

    def _resolve_image(self, request: dict) -> dict:
        """The request with its image id replaced by the image's file; uploads pass as they are."""
        image = request.get("image")
        owns = getattr(self._datastore, "owns", lambda path: False)
        if isinstance(image, str) and not is_upload(image) and not owns(image):
            request = {**request, "image": self._datastore.get_image_uri(check_name(image, "image"))}
        return request

    def infer(self, request: dict, datastore: Datastore | None = None) -> dict[str, Any]:
        self._model_task(request)
        request = self._resolve_image(request)
        try:
            return super().infer(request, datastore)
        except ValueError as err:
            raise HTTPException(400, public_message(str(err), self._roots())) from err

    def infer_wsi(self, request: dict, datastore: Datastore | None = None) -> dict[str, Any]:
        self._model_task(request)
        request = self._resolve_image(request)
        image = request.get("image")
        try:
            if isinstance(image, str):
                level = int(request.get("level") or 0)
                warning = check_slide_request(image, level, request.get("location") or [0, 0],
                                              request.get("size") or [0, 0], *self._resolution())
                if warning:
                    logger.warning(public_message(warning, self._roots()))
            tile = request.get("tile_size") or [1, 1]
            if len(tile) != 2 or min(int(t) for t in tile) <= 0:
                raise ValueError(f"tile_size {list(tile)}: expected two positive integers")
            return super().infer_wsi(request, datastore)
        except ValueError as err:
            raise HTTPException(400, public_message(str(err), self._roots())) from err

    def _resolution(self) -> tuple[float, float]:
        """Microns per pixel the served network was trained at, and the relative tolerance, from the bundle's
        whole-slide config (``target_mpp`` at ``magnification``, ``mpp_tolerance``) and the model's magnification."""
        from monai.bundle import ConfigParser
        from scripts.data.datasets import read_info

        wsi = ConfigParser.load_config_file(str(self.app_config.bundle / WSI_CONFIG))
        scale = float(wsi.get("magnification", 40)) / float(read_info(self.app_config.model_dir).magnification)
        return float(wsi.get("target_mpp", 0.25)) * scale, float(wsi.get("mpp_tolerance", 0.15))

    def next_sample(self, request: dict) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(404, f"strategy {strategy!r}: unknown (strategies: {', '.join(self._strategies)})")
        if request.get("image"):
            self._datastore.get_image_uri(request["image"])
        try:
            result = super().next_sample(request)
        except ValueError as err:
            raise HTTPException(400, public_message(str(err), self._roots())) from err
        result.pop("path", None)
        return result
