"""What the workflows report: the evaluator's key metric and the parameters logged to MLflow."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from monai.bundle.utils import ID_SEP_KEY
from monai.utils import optional_import

Engine, _ = optional_import("ignite.engine", name="Engine")


def key_metric_score(engine: Engine) -> float:
    """The evaluator's key metric of the last run (the score EarlyStopHandler maximises)."""
    return float(engine.state.metrics[engine.state.key_metric_name])


def _is_setting(value: Any) -> bool:
    """A plain config value: None, bool, number or string, or a list / dict of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if type(value) in (list, tuple):
        return all(_is_setting(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _is_setting(v) for k, v in value.items())
    return False


class ConfigParams(Mapping[str, str]):
    """MLflow parameters derived from the config, not listed by hand: every top-level key whose resolved value
    is a setting (see :func:`_is_setting`: ``epochs``, ``backbone``, ``learning_rate``, ``classes``, ...), plus
    the bundle and library versions from the metadata.

    ``resolved`` is the config's live table of resolved keys (``__local_refs`` in a config expression); it is
    read when MLflow logs the parameters (the trainer's start), when every key the run uses has been resolved,
    so the values are the run's own, command-line overrides included.
    """

    MAX_LENGTH = 6000  # MLflow's limit on a parameter value

    def __init__(self, meta: Mapping[str, Any], resolved: Mapping[str, Any]):
        self._meta = meta
        self._resolved = resolved

    def _params(self) -> dict[str, str]:
        params = {k: str(v)[: self.MAX_LENGTH] for k, v in sorted(self._resolved.items())
                  if ID_SEP_KEY not in k and "#" not in k and not k.startswith("_") and k != "imports"
                  and _is_setting(v)}
        for key in ("version", "monai_version", "pytorch_version"):
            params[key if key != "version" else "bundle_version"] = str(self._meta.get(key, ""))
        return params

    def __getitem__(self, key: str) -> str:
        return self._params()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params())

    def __len__(self) -> int:
        return len(self._params())
