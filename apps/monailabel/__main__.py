"""Start the MONAI Label server with the CellVTA app, bound to 127.0.0.1 unless told otherwise.

    python apps/monailabel --studies <images folder> [--model_dir DIR] [--port 8000] [--host 127.0.0.1]
                           [--conf KEY VALUE ...]

The same as ``monailabel start_server --app apps/monailabel --studies ... --conf ...`` except that it binds to
the loopback interface by default and writes nothing into the app folder (MONAI Label's own command creates
``model/``, ``logs/`` and ``bin/`` there). MONAI Label's settings (e.g. ``MONAI_LABEL_AUTH_ENABLE``) are read
from the environment and from a ``.env`` file in the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python apps/monailabel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="folder of the images to annotate (the datastore)")
    parser.add_argument("--model_dir", help="served model folder (model.pt, dataset.json); default: bundle's models/")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="app setting (bundle, work_dir, overrides, model_name, margin, max_side, "
                             "uncertainty_samples)")
    parser.add_argument("--ssl_keyfile", help="TLS private key (serve https)")
    parser.add_argument("--ssl_certfile", help="TLS certificate (serve https)")
    parser.add_argument("--log_level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    studies = Path(args.studies).resolve()
    if not studies.is_dir():
        raise SystemExit(f"--studies {studies}: not a folder")
    conf = dict(args.conf)
    if args.model_dir:
        conf["model_dir"] = str(Path(args.model_dir).resolve())
    # MONAI Label reads its settings from the environment when monailabel.config is first imported; training
    # runs in subprocesses that read the same variables.
    os.environ.update({
        "MONAI_LABEL_APP_DIR": str(APP_DIR),
        "MONAI_LABEL_STUDIES": str(studies),
        "MONAI_LABEL_APP_CONF": json.dumps(conf),
        "MONAI_LABEL_SERVER_PORT": str(args.port),
    })
    sys.path.insert(0, str(APP_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH")) if p)

    import uvicorn

    uvicorn.run("monailabel.app:app", host=args.host, port=args.port, log_level=args.log_level,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)


if __name__ == "__main__":
    main()
