"""The pool of post-processing worker processes, which never outlives the process that started it.

Workers are started by ``spawn`` and import only :mod:`.tile_cells` (numpy, OpenCV, scikit-image; not torch).
Each runs a daemon thread that checks every ``poll`` seconds that its parent is still the process that started the
pool; when the parent has died (even by SIGKILL, which runs no clean-up) the worker exits at once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["postprocess_pool"]


def _exit_with_parent(parent: int, poll: float) -> None:
    """Pool initializer: end this worker as soon as ``parent`` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def postprocess_pool(workers: int, poll: float = 0.5) -> ProcessPoolExecutor | None:
    """``workers`` spawned worker processes that exit with this process (None when ``workers`` is 0)."""
    if workers <= 0:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(), poll))
