"""What the workflows report: the evaluator's key metric and the parameters logged to MLflow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.utils import optional_import

Engine, _ = optional_import("ignite.engine", name="Engine")


def key_metric_score(engine: Engine) -> float:
    """The evaluator's key metric of the last run (the score EarlyStopHandler maximises)."""
    return float(engine.state.metrics[engine.state.key_metric_name])


def experiment_params(meta: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters for MLflow: ``params`` plus the bundle and library versions from ``meta``, as strings."""
    out = {k: str(v) for k, v in params.items()}
    out["bundle_version"] = str(meta.get("version", ""))
    out["monai_version"] = str(meta.get("monai_version", ""))
    out["pytorch_version"] = str(meta.get("pytorch_version", ""))
    return out
