"""A loss with named terms as a plain loss function, and a handler that reports the terms' epoch averages."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.utils import optional_import
from torch import nn

Events, _ = optional_import("ignite.engine", name="Events")
Engine, _ = optional_import("ignite.engine", name="Engine")


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
