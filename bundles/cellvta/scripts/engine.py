"""Glue between the CellVTA network/loss and MONAI's Ignite workflows.

* :class:`PrepareBatchDict` hands the trainer and evaluator the image and a dict of targets, so a network
  with dict outputs and a loss on (pred dict, target dict) run inside ``SupervisedTrainer``.
* :class:`LossTerms` wraps the loss, keeping its named terms; :class:`LossTermsHandler` averages them per
  epoch into ``engine.state.metrics`` (``train_<term>``), where StatsHandler and MLflow pick them up.
* :func:`latest_checkpoint` finds the newest epoch checkpoint to resume from.
* :func:`save_class_table` keeps the dataset's class and tissue names beside the checkpoints, so inference
  and export need no dataset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import PrepareBatch
from monai.utils import optional_import
from torch import nn

from .data import DATASET_JSON, DatasetInfo

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")

TARGET_KEYS = ("nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types", "inst_map")
_EPOCH_FILE = re.compile(r"epoch=(\d+)\.pt$")


class PrepareBatchDict(PrepareBatch):
    """Split a collated batch into the network input and a dict of targets.

    Args:
        image_key: key of the (B, 3, H, W) float image.
        target_keys: keys copied into the target dict when present in the batch (``inst_map`` (B, 1, H, W),
            ``nuclei_binary_map`` (B, 1, H, W), ``hv_map`` (B, 2, H, W), ``nuclei_type_map`` (B, 1, H, W),
            ``tissue_types`` (B,)).
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = TARGET_KEYS) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.image_key not in batchdata:
            raise KeyError(f"batch has no '{self.image_key}' (keys: {sorted(map(str, batchdata))})")
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {
            k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs)
            for k in self.target_keys
            if k in batchdata
        }
        return image, targets


class LossTerms(nn.Module):
    """A loss with ``compute(pred, target) -> {"loss": total, <term>: value, ...}`` as a plain loss function.

    ``forward`` returns the total; the detached terms of the last call stay in :attr:`terms`.

    Args:
        loss: e.g. ``CellVTALoss``.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(loss, "compute", None)):
            raise TypeError(f"{type(loss).__name__} has no compute(pred, target) method returning named terms")
        self.loss = loss
        self.terms: dict[str, float] = {}

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = self.loss.compute(pred, target)
        self.terms = {k: float(v.detach()) for k, v in parts.items() if k != "loss"}
        return parts["loss"]


class LossTermsHandler:
    """Average the named loss terms over each epoch into ``engine.state.metrics[prefix + term]``.

    Attach it before StatsHandler / MLFlowHandler so they report the averages of the finished epoch.

    Args:
        loss: the :class:`LossTerms` the trainer uses.
        prefix: metric-name prefix.
    """

    def __init__(self, loss: LossTerms, prefix: str = "train_") -> None:
        self.loss = loss
        self.prefix = prefix
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for k, v in self.loss.terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1

    def _write(self, engine: Engine) -> None:
        for k, v in self._sums.items():
            engine.state.metrics[f"{self.prefix}{k}"] = v / max(self._count, 1)


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """Path of the ``*epoch=<n>.pt`` checkpoint with the largest ``n`` in ``ckpt_dir``, or None if there is none."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("*epoch=*.pt") if (m := _EPOCH_FILE.search(p.name))]
    return str(max(found)[1]) if found else None


def resume_path(ckpt_dir: str | Path, resume: bool | str) -> str | None:
    """The checkpoint to resume from: ``resume`` as a path, the latest in ``ckpt_dir`` if True, None if False.

    Raises FileNotFoundError when a resume is asked for and there is nothing to resume from.
    """
    if resume is False or resume is None or resume == "":
        return None
    path = latest_checkpoint(ckpt_dir) if resume is True else str(resume)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"resume requested but no checkpoint found ({path or f'{ckpt_dir}/*epoch=*.pt'})")
    return path


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


def save_class_table(info: DatasetInfo, model_dir: str | Path) -> Path:
    """Write ``<model_dir>/dataset.json``: the class and tissue names and magnification of ``info``, no samples.

    ``scripts.data.read_info(model_dir)`` reads it back, so inference and export configs point their
    ``dataset_info`` at the model folder.
    """
    path = Path(model_dir) / DATASET_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {**info.to_json(), "samples": []}
    path.write_text(json.dumps(table, indent=1))
    return path


class SpatialOutputs(nn.Module):
    """The network restricted to its per-pixel outputs, for sliding-window inference over large images.

    Args:
        network: a module returning a dict of ``(B, C, H, W)`` maps and ``(B, T)`` image-level logits.
        keys: the per-pixel outputs kept.
    """

    def __init__(self, network: nn.Module, keys: Sequence[str] = ("nuclei_binary_map", "hv_map", "nuclei_type_map")) -> None:
        super().__init__()
        self.network = network
        self.keys = tuple(keys)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.network(x)
        return {k: out[k] for k in self.keys if k in out}
