"""Training checkpoints: written atomically, resumed with the whole training state, found for resuming.

- :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` whose files appear whole or not at all
  (``scripts.files``): a kill while ``models/model.pt`` or ``checkpoint_epoch=N.pt`` is written leaves the previous
  file. A superseded epoch checkpoint is deleted only after its successor is published, so ``n_saved`` valid
  epoch checkpoints are on disk at every moment. Its state (the best score so far, the epoch files it keeps) goes
  into the epoch checkpoint, so a resumed run keeps ``model.pt`` unless beaten and keeps pruning old epochs.
- :class:`BestMetricState` and :class:`ResumableEarlyStopHandler` give the evaluator's best metric and the
  early-stopping counter a ``state_dict`` for the same purpose.
- :func:`resume_path` picks the checkpoint to resume from, skipping unreadable ones with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointSaver, EarlyStopHandler
from monai.utils import optional_import

from scripts.files import atomic_path

BaseSaveHandler, _ = optional_import("ignite.handlers.checkpoint", name="BaseSaveHandler")
Engine, _ = optional_import("ignite.engine", name="Engine")

logger = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"epoch=(\d+)\.pt$")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0", "none", ""}


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
    """The checkpoint to resume from: ``resume`` as a path, the newest readable one in ``ckpt_dir`` if true, None if false.

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
