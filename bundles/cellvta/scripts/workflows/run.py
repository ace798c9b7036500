"""Run a bundle workflow as ``python -m monai.bundle run`` does, with two checks it lacks: command-line
override keys must exist in the workflow's configs, and an error raised while the config is evaluated is
reported in one line naming the problem and the config key (the full traceback with ``--debug True``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from monai.bundle import ConfigParser, create_workflow

from .configs import WORKFLOW_CONFIGS, config_files, run_id
from .errors import one_line
from .overrides import check_overrides


class WorkflowError(RuntimeError):
    """A workflow stopped; the message is one line, the original exception is its cause."""


def run(
    workflow: str = "training",
    config_file: str | Sequence[str] | None = None,
    debug: bool = False,
    **override: Any,
) -> None:
    """Run ``workflow`` (``training``, ``evaluating``, ``inferring``, ``whole_slide``, or a run id such as ``run``).

    Args:
        workflow: the id run (``whole_slide`` runs ``inferring``); it also picks the config files when
            ``config_file`` is None (training: train.yaml; evaluating: train.yaml + evaluate.yaml; inferring:
            common.yaml + inference.yaml; whole_slide: common.yaml + wsi_inference.yaml).
        config_file: a config file or a list merged in order, as for ``monai.bundle run``.
        debug: raise the original exception (full traceback) instead of a one-line :class:`WorkflowError`.
        override: ``key=value`` pairs that override the configs (``#`` paths reach nested keys); MONAI's own
            ``run`` arguments (``meta_file``, ``logging_file``, ``tracking``, ``args_file``, ``init_id``,
            ``final_id``) pass through unchecked.

    Raises:
        WorkflowError: a config file that cannot be read, an override key the configs do not define, or any
            error while the workflow runs.
    """
    run_args = {k: override.pop(k) for k in ("meta_file", "logging_file", "tracking", "args_file", "init_id",
                                             "final_id") if k in override}
    try:
        files = config_file if config_file is not None else config_files(workflow)
        check_overrides(override, ConfigParser.load_config_files(files))
    except (ValueError, OSError) as err:
        raise WorkflowError(str(err) if isinstance(err, ValueError) else one_line(err)) from err
    try:
        wf = create_workflow(config_file=files, run_id=run_id(workflow), **run_args, **override)
        wf.run()
        wf.finalize()
    except Exception as err:
        if debug:
            raise
        raise WorkflowError(one_line(err)) from err


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.workflows run <workflow> [--config_file F] [--debug True] [--key value ...]``."""
    from monai.utils import optional_import

    fire, _ = optional_import("fire")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":
        print(f"usage: python -m scripts.workflows run <{'|'.join(WORKFLOW_CONFIGS)}|run> [--config_file F] "
              "[--debug True] [--key value ...]", file=sys.stderr)
        return 2
    try:
        fire.Fire(run, command=argv[1:], name="scripts.workflows run")
    except WorkflowError as err:
        print(f"error: {err} (--debug True shows the full traceback)", file=sys.stderr)
        return 1
    return 0
