"""The validation's best key metric as a file, for programs that follow a training run (the MONAI Label app)."""

from __future__ import annotations

import json
from pathlib import Path

from monai.utils import optional_import

from ..files import write_text_atomic

Engine, _ = optional_import("ignite.engine", name="Engine")
Events, _ = optional_import("ignite.engine", name="Events")


class BestMetricWriter:
    """Writes ``{"metric": name, "value": best, "epoch": its epoch}`` to ``path`` (atomically) after every
    validation run that improves the evaluator's best key metric.

    Args:
        path: the JSON file, e.g. ``<ckpt_dir>/best_metric.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._written: tuple[float, int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        best = (float(state.best_metric), int(state.best_metric_epoch))
        if state.best_metric_epoch < 0 or best == self._written:
            return
        write_text_atomic(self.path, json.dumps({"metric": state.key_metric_name, "value": best[0],
                                                 "epoch": best[1]}))
        self._written = best
