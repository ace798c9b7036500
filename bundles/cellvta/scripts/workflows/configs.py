"""Which config files make each workflow, as absolute paths, so that workflows load from any folder."""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

# each workflow id and the config files merged, in order, to run it (the later files override the earlier)
WORKFLOW_CONFIGS: dict[str, tuple[str, ...]] = {
    "training": ("train.yaml",),
    "evaluating": ("train.yaml", "evaluate.yaml"),
    "inferring": ("common.yaml", "inference.yaml"),
    "whole_slide": ("common.yaml", "wsi_inference.yaml"),
}
# the id a workflow runs in its config files, where it is not the workflow's own name
RUN_IDS: dict[str, str] = {"whole_slide": "inferring"}


def config_files(workflow: str) -> list[str]:
    """The absolute paths of the config files of ``workflow`` (``training``, ``evaluating``, ``inferring``,
    ``whole_slide``)."""
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"unknown workflow {workflow!r}: one of {sorted(WORKFLOW_CONFIGS)}, or give --config_file")
    return [str(CONFIGS_DIR / name) for name in WORKFLOW_CONFIGS[workflow]]


def run_id(workflow: str) -> str:
    """The id ``workflow`` runs in its config files (``whole_slide`` runs ``inferring``)."""
    return RUN_IDS.get(workflow, workflow)
