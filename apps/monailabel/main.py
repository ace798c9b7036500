"""MONAI Label app serving the local CellVTA bundle: inference on tiles and slide regions, fine-tuning on the
datastore's labels, and random or uncertainty-driven active learning. See README.md beside this file."""

from __future__ import annotations

import json
import logging

from cellvta_label.bundle import BundleModel
from cellvta_label.config import AppConfig
from cellvta_label.infer import CellVTAInfer
from cellvta_label.strategies import EpistemicSample, RandomSample
from cellvta_label.train import CellVTATrain
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class CellVTAApp(MONAILabelApp):
    """The app. Settings come from ``--conf key value`` (see ``cellvta_label.config.AppConfig``): ``bundle``,
    ``model_dir``, ``work_dir``, ``overrides`` (JSON), ``model_name``, ``margin``, ``max_side``,
    ``uncertainty_samples``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.app_config = AppConfig.from_conf(app_dir, conf)
        self.model = BundleModel(self.app_config)
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
        return {self.app_config.model_name: CellVTAInfer(self.model, self.app_config.margin)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {self.app_config.model_name: CellVTATrain(self.model, self.app_config)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "random": RandomSample(),
            "epistemic_tta": EpistemicSample(self.model, "tta", self.app_config.uncertainty_samples,
                                             self.app_config.max_side),
            "epistemic_mc_dropout": EpistemicSample(self.model, "mc_dropout", self.app_config.uncertainty_samples,
                                                    self.app_config.max_side),
        }
