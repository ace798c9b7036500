"""CellVTA MONAI Deploy application.

    python apps/deploy -i <tile | region request | folder> -o <output folder> [-m <model folder>] [-l DEBUG]

Runs on CPU, or on CUDA when available. In a MAP the paths come from ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``; see README.md beside this file.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
#: the thread stack Holoscan asks for (it warns, and may crash, below it)
HOLOSCAN_STACK = 32 * 2**20


def raise_stack_limit(minimum: int = HOLOSCAN_STACK) -> None:
    """Raise the soft stack limit to ``minimum`` when the hard limit allows; threads started later get it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < minimum and (hard == resource.RLIM_INFINITY or hard >= minimum):
        resource.setrlimit(resource.RLIMIT_STACK, (minimum, hard))


def main() -> None:
    """Find the bundle and the application config, then build and run the application."""
    raise_stack_limit()
    from cellvta_deploy.bundle import find_bundle, use_bundle

    bundle_dir = find_bundle(APP_DIR)
    use_bundle(bundle_dir)
    # the application's modules import the bundle's `scripts` package: import them once it is on the path
    from cellvta_deploy.app import CellVTADeployApp

    config = Path(os.environ.get("HOLOSCAN_CONFIG_PATH") or APP_DIR / "app.yaml")
    if not config.is_file():
        raise FileNotFoundError(f"{config}: application config not found (HOLOSCAN_CONFIG_PATH or app.yaml)")
    CellVTADeployApp(bundle_dir, config).run()


if __name__ == "__main__":
    main()
