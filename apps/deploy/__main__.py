"""CellVTA MONAI Deploy application.

    python apps/deploy -i <tile | region request | folder> -o <output folder> [-m <model folder>] [-l DEBUG]

Runs on CPU, or on CUDA when available. In a MAP the paths come from ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``; see README.md beside this file.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
#: the thread stack Holoscan asks for (it warns, and may crash, below it)
HOLOSCAN_STACK = 32 * 2**20


def raise_stack_limit(minimum: int = HOLOSCAN_STACK) -> None:
    """Raise the soft stack limit to ``minimum`` when the hard limit allows; threads started later get it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < minimum and (hard == resource.RLIM_INFINITY or hard >= minimum):
        resource.setrlimit(resource.RLIMIT_STACK, (minimum, hard))


def help_parser() -> argparse.ArgumentParser:
    """The options the app reads (parsed by the MONAI Deploy SDK; this parser only documents them)."""
    parser = argparse.ArgumentParser(
        prog="python apps/deploy", description=__doc__.split("\n\n")[0],
        epilog="Outputs per input: <name>.geojson, <name>.npz (or _maps.tif), <name>_overlay.png; inputs that "
               "cannot be read are listed in <output>/failures.json and the exit code is 1. The `cellvta` section "
               "of the config chooses maps (npz | tiff) and overlays (true | false).")
    parser.add_argument("-i", "--input", help="a tile (PNG, JPEG, TIFF), a region request (.json) or a folder of them "
                                              "(default: $HOLOSCAN_INPUT_PATH)")
    parser.add_argument("-o", "--output", help="output folder (default: $HOLOSCAN_OUTPUT_PATH)")
    parser.add_argument("-m", "--model", help="model folder with model.pt, dataset.json and overrides.json "
                                              "(default: $HOLOSCAN_MODEL_PATH, else bundles/cellvta/models)")
    parser.add_argument("-w", "--workdir", help="work folder (default: .monai_workdir)")
    parser.add_argument("-l", "--log-level", choices=["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"],
                        help="the app's log level (Holoscan's own: $HOLOSCAN_LOG_LEVEL, default ERROR)")
    parser.add_argument("--config", help="application config (default: $HOLOSCAN_CONFIG_PATH, else "
                                         "apps/deploy/app.yaml)")
    return parser


def main() -> None:
    """Find the bundle and the application config, then build and run the application."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        help_parser().print_help()
        return
    # Holoscan's own log: errors only unless asked (on a CPU-only machine it warns about the CUDA driver at start
    # and reports its scheduler's normal end as a "deadlock")
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    raise_stack_limit()
    from cellvta_deploy.bundle import find_bundle, use_bundle

    bundle_dir = find_bundle(APP_DIR)
    use_bundle(bundle_dir)
    # the application's modules import the bundle's `scripts` package: import them once it is on the path
    from cellvta_deploy.app import CellVTADeployApp

    config = Path(os.environ.get("HOLOSCAN_CONFIG_PATH") or APP_DIR / "app.yaml")
    if not config.is_file():
        raise FileNotFoundError(f"{config}: application config not found (HOLOSCAN_CONFIG_PATH or app.yaml)")
    app = CellVTADeployApp(bundle_dir, config)
    app.run()
    if app.writer is not None and app.writer.failures:
        lines = "\n".join(f"  {f['error']}" for f in app.writer.failures)
        print(f"{len(app.writer.done)} input(s) analysed; {len(app.writer.failures)} could not be read "
              f"(listed in {app.writer.output_dir / 'failures.json'}):\n{lines}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
