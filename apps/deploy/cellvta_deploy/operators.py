"""The three operators of the app's graph: loader -> inference -> writer, one image per tick.

* :class:`ImageLoaderOperator` emits the next input item as a :class:`~.inputs.LoadedImage` on ``image``;
  schedule it with ``CountCondition(fragment, len(items))``;
* :class:`CellVTAInferenceOperator` receives it, runs the bundle's pipeline and emits
  ``{"loaded": LoadedImage, "prediction": NucleiPrediction}`` on ``nuclei``;
* :class:`NucleiWriterOperator` receives that and writes the image's outputs (:func:`~.outputs.write_outputs`).

An input that cannot be read travels through the graph with its ``error`` and no image: the writer records it
in ``failures.json`` of the output folder and the other inputs are analysed as usual.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from .bundle import CellVTAPipeline
from .inputs import InputItem, LoadedImage, load_item
from .outputs import write_outputs

FAILURES_FILE = "failures.json"

logger = logging.getLogger(__name__)


class ImageLoaderOperator(Operator):
    """Emits the input items one per call, read (tile) or cut from their slide (region).

    Args:
        fragment: the application.
        items: the inputs, in order.
        magnification: the network's magnification (regions are checked against its resolution).
    """

    def __init__(self, fragment: Fragment, *args, items: list[InputItem], magnification: int, **kwargs) -> None:
        self.items = list(items)
        self.magnification = magnification
        self._next = 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        item = self.items[self._next]
        self._next += 1
        try:
            loaded = load_item(item, self.magnification)
        except (ValueError, OSError) as err:
            logger.error("%s", err)
            loaded = LoadedImage(name=item.name, source=item.path, image=None, error=str(err))
        op_output.emit(loaded, "image")


class CellVTAInferenceOperator(Operator):
    """Runs CellVTA and the HoVer-Net post-processing on each image received.

    Args:
        fragment: the application.
        pipeline: the bundle's inference objects (:func:`~.bundle.load_pipeline`).
    """

    def __init__(self, fragment: Fragment, *args, pipeline: CellVTAPipeline, **kwargs) -> None:
        self.pipeline = pipeline
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("nuclei")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        loaded = op_input.receive("image")
        prediction = None if loaded.error is not None else self.pipeline(loaded.image)
        op_output.emit({"loaded": loaded, "prediction": prediction}, "nuclei")


class NucleiWriterOperator(Operator):
    """Writes GeoJSON, the instance and type maps and (optionally) an overlay for each image received.

    Args:
        fragment: the application.
        output_dir: output folder.
        class_names: class names, background first.
        colours: their RGB colours, or None: the bundle's palette.
        maps: ``npz`` or ``tiff``.
        overlays: also write ``<name>_overlay.png``.
    """

    def __init__(self, fragment: Fragment, *args, output_dir: Path, class_names: list[str], maps: str,
                 overlays: bool, colours: list[tuple[int, ...]] | None = None, **kwargs) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.colours = colours
        self.maps = maps
        self.overlays = overlays
        self.done: list[str] = []
        self.failures: list[dict[str, str]] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("nuclei")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        received = op_input.receive("nuclei")
        loaded, prediction = received["loaded"], received["prediction"]
        if loaded.error is not None:
            self.failures.append({"input": str(loaded.source), "error": loaded.error})
            self._write_failures()
            return
        write_outputs(self.output_dir, loaded, prediction, self.class_names, self.maps, self.overlays, self.colours)
        self.done.append(str(loaded.source))
        logger.info("%s: %d nuclei -> %s", loaded.source, len(prediction.nuclei), self.output_dir)

    def _write_failures(self) -> None:
        from scripts.files import write_text_atomic

        write_text_atomic(self.output_dir / FAILURES_FILE, json.dumps({"failures": self.failures}, indent=1))
