"""The application: input path, model folder and output folder from the MONAI Deploy app context; one graph."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from .bundle import find_model_dir, load_pipeline
from .inputs import scan_inputs
from .operators import CellVTAInferenceOperator, ImageLoaderOperator, NucleiWriterOperator
from .settings import SECTION, AppSettings

logger = logging.getLogger(__name__)


class CellVTADeployApp(Application):
    """Nuclei instance segmentation and classification in H&E tiles and slide regions with CellVTA.

    Args:
        bundle_dir: the bundle whose inference config builds the network.
        config_path: the application config (``app.yaml``); its ``cellvta`` section holds the app's settings.

    Input (``-i``), output (``-o``) and model (``-m``) paths come from the command line or the ``HOLOSCAN_*``
    variables of a MAP; without a model path the bundle's ``models/`` folder is used. After ``run()``,
    ``writer.done`` and ``writer.failures`` tell which inputs were analysed and which could not be read.
    """

    name = "cellvta"
    description = "CellVTA nuclei instance segmentation and classification in H&E tiles and slide regions"
    version = "0.1.0"

    def __init__(self, bundle_dir: Path, config_path: Path) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.config_path = Path(config_path)
        self.writer: NucleiWriterOperator | None = None
        super().__init__()
        self.config(str(self.config_path))

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        model_path = context.args.get("model") or os.environ.get("HOLOSCAN_MODEL_PATH") or self.bundle_dir / "models"
        section = self.kwargs(SECTION) if SECTION in self.config_keys() else {}
        settings = AppSettings.from_mapping(section, str(self.config_path))
        items = scan_inputs(Path(context.input_path))
        model_dir = find_model_dir(Path(model_path))
        pipeline = load_pipeline(self.bundle_dir, model_dir, settings.config_overrides(model_dir))
        logger.info("%d input(s) from %s on %s; outputs to %s", len(items), context.input_path, pipeline.device,
                    context.output_path)

        loader = ImageLoaderOperator(self, CountCondition(self, len(items)), items=items,
                                     magnification=pipeline.magnification, name="loader")
        inference = CellVTAInferenceOperator(self, pipeline=pipeline, name="inference")
        writer = NucleiWriterOperator(self, output_dir=Path(context.output_path), class_names=pipeline.class_names,
                                      colours=pipeline.colours,
                                      maps=settings.maps, overlays=settings.overlays, name="writer")
        self.writer = writer
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, writer, {("nuclei", "nuclei")})
