"""Training checkpoints: written atomically, resumed with the whole training state, found for resuming.

- :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` whose files appear whole or not at all
  (``scripts.files``): a kill while ``models/model.pt`` or ``checkpoint_epoch=N.pt`` is written leaves the previous
  file. A superseded epoch checkpoint is deleted only after its successor is published, so ``n_saved`` valid
  epoch checkpoints are on disk at every moment. Its state (the best score so far, the epoch files it keeps) goes
  into the epoch checkpoint, so a resumed run keeps ``model.pt`` unless beaten and keeps pruning old epochs.
  The key-metric saver refuses a NaN score (a validation ground truth without nuclei): the run stops at that
  validation with an error, so an undefined score never becomes the best model.
- :class:`BestMetricState`, :class:`ResumableEarlyStopHandler` and :class:`GradScalerState` give the evaluator's
  best metric, the early-stopping counter and the trainer's mixed-precision loss scale a ``state_dict`` for the
  same purpose.
- :class:`ResumeCheckpointLoader` resumes from such a checkpoint, and from an epoch checkpoint written before
  these states were part of it (with a warning; the best score then comes from ``models/best_metric.json``).
- :func:`resume_path` picks the checkpoint to resume from, skipping unreadable ones with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.utils import optional_import

from ..files import atomic_path

BaseSaveHandler, _ = optional_import("ignite.handlers.checkpoint", name="BaseSaveHandler")
Engine, _ = optional_import("ignite.engine", name="Engine")

logger = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"epoch=(\d+)\.pt$")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0", "none", ""}

BestScore = tuple[float, int]
"""The best key-metric value of a run and the epoch that reached it."""


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: ``torch.save`` to a temporary file in ``dirname``, fsync, rename over the final name.

    Args:
        dirname: folder of the checkpoints.
        filename: a fixed file name (e.g. ``model.pt``) used instead of the name Ignite composes; a fixed file is
            replaced by the rename and never deleted.
        before_save: called with the checkpoint dictionary just before it is written (to refresh entries).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None,
                 before_save: Callable[[dict], None] | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.before_save = before_save
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        if self.before_save is not None:
            self.before_save(checkpoint)
        with atomic_path(self.dirname / name) as tmp:
            for stale in self.dirname.glob(f".{Path(name).stem}.tmp-*{Path(name).suffix}"):
                if stale != tmp:  # left by a killed run
                    stale.unlink(missing_ok=True)
            torch.save(checkpoint, tmp)
        for old in self._superseded:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        """Called by Ignite before the next save: the file is deleted once that save is published."""
        if self.filename is None:
            self._superseded.append(filename)


def _plain_checkpointer_state(state: Mapping) -> dict[str, list[tuple[float, str]]]:
    """An Ignite ``Checkpoint`` state with plain Python numbers (loadable with ``weights_only=True``)."""
    return {k: [(float(p), str(f)) for p, f in v] for k, v in state.items()}


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` writing every file atomically, with a state that can be saved and resumed.

    Args:
        save_dir, save_dict, **kwargs: as MONAI's ``CheckpointSaver``.
        state_key: when set, the saver's own state, including the file being written, is saved under this key in
            each checkpoint it writes (used by the epoch saver, so that a resumed run prunes the epoch files of the
            run it continues).
    """

    def __init__(self, save_dir: str, save_dict: dict, state_key: str | None = None, **kwargs: Any) -> None:
        if state_key is not None:
            save_dict = {**save_dict, state_key: self}
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        self._key_metric_name = kwargs.get("key_metric_name")

        def refresh_own_state(checkpoint: dict) -> None:
            checkpoint[state_key] = self.state_dict()  # Ignite has now added the file being written

        for checkpointer in self._checkpointers().values():
            checkpointer.save_handler = AtomicDiskSaver(save_dir, getattr(checkpointer.save_handler, "filename", None),
                                                        refresh_own_state if state_key is not None else None)

    def _checkpointers(self) -> dict[str, Any]:
        named = {"final": self._final_checkpoint, "key_metric": self._key_metric_checkpoint,
                 "interval": self._interval_checkpoint}
        return {k: v for k, v in named.items() if v is not None}

    def state_dict(self) -> dict[str, dict]:
        """The saved files and their scores (the best key metric so far, the kept epochs), per internal checkpointer."""
        return {k: _plain_checkpointer_state(c.state_dict()) for k, c in self._checkpointers().items()}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        for k, checkpointer in self._checkpointers().items():
            if k in state_dict:
                checkpointer.load_state_dict(state_dict[k])

    def restore_without_state(self, best: BestScore | None, resumed: Path) -> None:
        """The state of a run resumed from ``resumed``, an epoch checkpoint that does not hold this saver's state.

        The best model file (e.g. ``model.pt``), when present, is taken to hold the model of score ``best`` (None:
        unknown, the next validation replaces it); ``resumed``, when it is one of this saver's epoch files, is kept
        as the newest epoch file (pruned as ``n_saved`` says).
        """
        key_metric, interval = self._key_metric_checkpoint, self._interval_checkpoint
        if key_metric is not None and best is not None:
            name = key_metric.save_handler.filename
            if name is not None and (key_metric.save_handler.dirname / name).is_file():
                key_metric.load_state_dict({"_saved": [(best[0], name)]})
        match = _EPOCH_FILE.search(resumed.name)
        if interval is not None and match and resumed.parent.resolve() == interval.save_handler.dirname.resolve():
            interval.load_state_dict({"_saved": [(int(match.group(1)), resumed.name)]})

    def metrics_completed(self, engine: Engine) -> None:
        """Saves the best model after a validation; a NaN key metric stops the run with an error.

        Raises:
            ValueError: the key metric is NaN (e.g. bPQ of a validation ground truth without nuclei).
        """
        name = self._key_metric_name if isinstance(self._key_metric_name, str) else engine.state.key_metric_name
        score = engine.state.metrics[name]
        if isinstance(score, numbers.Real) and math.isnan(score):
            raise ValueError(
                f"validation key metric {name} is NaN at epoch {engine.state.epoch}: the validation ground truth "
                "has no nuclei to score; use a validation split with nuclei (no best model is saved)")
        super().metrics_completed(engine)


class BestMetricState:
    """The best key metric a MONAI evaluator has seen and its epoch, as a resumable state.

    Args:
        evaluator: a MONAI ``Workflow`` (``state.best_metric``, ``state.best_metric_epoch``).
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        return {"best_metric": float(self.evaluator.state.best_metric),
                "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.evaluator.state.best_metric = state_dict["best_metric"]
        self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]

    def restore_without_state(self, best: BestScore | None, resumed: Path) -> None:
        """Start from ``best`` when the resumed checkpoint holds no best metric (None: none yet)."""
        if best is not None:
            self.load_state_dict({"best_metric": best[0], "best_metric_epoch": best[1]})


class GradScalerState:
    """The mixed-precision gradient scaler of a MONAI trainer (``trainer.scaler``) as a resumable state.

    A resumed AMP run continues with the loss scale and growth counter the interrupted run had reached, not from
    ``GradScaler``'s initial scale (which would skip the steps whose scaled gradients overflow until the scale is
    found again). Without AMP (no scaler, or a disabled one, as on a machine without CUDA) the state is empty and
    loading it changes nothing, so checkpoints move between AMP and full-precision runs.

    Args:
        trainer: a MONAI ``Trainer``.
    """

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer

    def _scaler(self) -> torch.amp.GradScaler | None:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def state_dict(self) -> dict[str, float | int]:
        scaler = self._scaler()
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state_dict: Mapping) -> None:
        scaler = self._scaler()
        if scaler is not None and state_dict:
            scaler.load_state_dict(dict(state_dict))

    def restore_without_state(self, best: BestScore | None, resumed: Path) -> None:
        """The scaler starts from its initial scale when the resumed checkpoint holds no scaler state."""


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI ``EarlyStopHandler`` whose counter and best score are part of the resumed state.

    Call ``set_trainer`` before the state is loaded (the training workflow does it first).
    """

    def state_dict(self) -> dict[str, float | int | None]:
        if self._handler is None:
            return {"counter": 0, "best_score": None}
        best = self._handler.best_score
        return {"counter": int(self._handler.counter), "best_score": None if best is None else float(best)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        if self._handler is None:
            raise RuntimeError("call set_trainer() before loading the early-stopping state")
        self._handler.counter = int(state_dict["counter"])
        self._handler.best_score = state_dict["best_score"]

    def restore_without_state(self, best: BestScore | None, resumed: Path) -> None:
        """Counter 0 and best score ``best`` when the resumed checkpoint holds no early-stopping state."""
        self.load_state_dict({"counter": 0, "best_score": None if best is None else best[0]})


def read_best_metric(path: str | Path) -> BestScore | None:
    """The ``value`` and ``epoch`` of a ``best_metric.json`` (``scripts.training.best_metric``), None when the file
    is absent or does not hold a finite value and an epoch."""
    try:
        record = json.loads(Path(path).read_text())
        best = (float(record["value"]), int(record["epoch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return best if math.isfinite(best[0]) else None


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that also resumes from an epoch checkpoint written before the best score, the
    evaluator's best metric, the early-stopping counter, the kept files and the loss scale were part of it.

    The entries of ``load_dict`` with a ``restore_without_state`` method (:class:`AtomicCheckpointSaver`,
    :class:`BestMetricState`, :class:`ResumableEarlyStopHandler`, :class:`GradScalerState`) may be missing from
    the checkpoint: what it has is loaded, one warning names the file and the missing entries, and those start
    from the best score recorded in ``best_metric_file`` (unknown when absent: the next validation's model becomes
    the best model); a missing loss scale starts from its initial value.

    Args:
        load_path, load_dict, **kwargs: as MONAI's ``CheckpointLoader``.
        best_metric_file: the run's ``best_metric.json``; default: the one beside ``load_path``.

    Raises (when the engine starts):
        ValueError: the checkpoint lacks another entry of ``load_dict`` (model, optimizer, trainer, ...).
    """

    def __init__(self, load_path: str, load_dict: dict, best_metric_file: str | Path | None = None,
                 **kwargs: Any) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.best_metric_file = Path(best_metric_file or Path(load_path).parent / "best_metric.json")

    def __call__(self, engine: Engine) -> None:
        entries = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True).keys()
        missing = [k for k in self.load_dict if k not in entries]
        if not missing or len(self.load_dict) == 1:
            super().__call__(engine)
            return
        required = [k for k in missing if not hasattr(self.load_dict[k], "restore_without_state")]
        if required:
            raise ValueError(f"cannot resume from {self.load_path}: it has no {', '.join(required)}")
        full = self.load_dict
        self.load_dict = {k: v for k, v in full.items() if k not in missing}
        try:
            super().__call__(engine)
        finally:
            self.load_dict = full
        best = read_best_metric(self.best_metric_file)
        for k in missing:
            full[k].restore_without_state(best, Path(self.load_path))
        starts = []
        if any(not isinstance(full[k], GradScalerState) for k in missing):
            starts.append(f"the best score starts from {self.best_metric_file} ({best[0]:.4g} at epoch {best[1]})"
                          if best is not None else
                          f"the best score is unknown (no {self.best_metric_file}): "
                          "the next validation's model becomes the best")
        if any(isinstance(full[k], GradScalerState) for k in missing):
            starts.append("the mixed-precision loss scale starts from its initial value")
        logger.warning("%s was written without %s (an older checkpoint format): %s", self.load_path,
                       ", ".join(missing), "; ".join(starts))


def unreadable(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint (the loader's message), or None when it can."""
    if Path(path).stat().st_size == 0:
        return "empty file"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported, not raised
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """The readable ``*epoch=<n>.pt`` checkpoint with the largest ``n`` in ``ckpt_dir``, or None if there is none.

    Newer files that cannot be loaded (truncated, corrupt) are skipped with a warning naming each.
    """
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("*epoch=*.pt") if (m := _EPOCH_FILE.search(p.name))]
    for _, path in sorted(found, reverse=True):
        problem = unreadable(path)
        if problem is None:
            return str(path)
        logger.warning("skipping unreadable checkpoint %s (%s)", path, problem)
    return None


def parse_resume(resume: bool | str | None) -> bool | str:
    """``resume`` as True, False or a checkpoint path; the strings true/false/yes/no/1/0/none in any case."""
    if resume is None or isinstance(resume, bool):
        return bool(resume)
    text = str(resume).strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    return text


def resume_path(ckpt_dir: str | Path, resume: bool | str | None) -> str | None:
    """The checkpoint to resume from: ``resume`` as a path, the newest readable one in ``ckpt_dir`` if true, None
    if false.

    Raises:
        FileNotFoundError: a resume is asked for and there is nothing to resume from.
        ValueError: the checkpoint named by ``resume`` cannot be loaded.
    """
    resume = parse_resume(resume)
    if resume is False:
        return None
    if resume is True:
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"resume requested but no readable checkpoint found ({ckpt_dir}/*epoch=*.pt)")
        return path
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume requested but no checkpoint found ({resume})")
    if (problem := unreadable(resume)) is not None:
        raise ValueError(f"cannot resume from {resume}: {problem}")
    return resume
