"""Start the MONAI Label server with the CellVTA app, bound to 127.0.0.1 unless told otherwise.

    python apps/monailabel --studies <images folder or DSA URL> [--model_dir DIR] [--port 8000]
                           [--host 127.0.0.1] [--token_file FILE] [--conf KEY VALUE ...]

Like ``monailabel start_server --app apps/monailabel --studies ... --conf ...``, with safe defaults: it binds to
the loopback interface, allows browser requests only from its own origin (``MONAI_LABEL_CORS_ORIGINS``
overrides), refuses query ids that are not plain names, asks a token for the downloads of the weights, the
datastore and the log (unless MONAI Label's authentication is on), refuses a non-loopback address without
authentication, and writes nothing into the app folder. MONAI Label's settings (e.g.
``MONAI_LABEL_AUTH_ENABLE``) are read from the environment and from a ``.env`` file in the working directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
#: signatures accepted on MONAI Label's tokens (Keycloak signs realm tokens with RS256 by default)
TOKEN_ALGORITHMS = ("RS256",)


def is_loopback(host: str) -> bool:
    """True for an address (or ``localhost``) that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def own_origins(host: str, port: int, tls: bool) -> list[str]:
    """The browser origins of the server itself (its loopback names when bound to a loopback address)."""
    scheme = "https" if tls else "http"
    hosts = ["127.0.0.1", "localhost"] if is_loopback(host) else [host]
    return [f"{scheme}://{h}:{port}" for h in hosts]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python apps/monailabel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="folder of the images to annotate (the datastore)")
    parser.add_argument("--model_dir", help="served model folder (model.pt, dataset.json); default: bundle's models/")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token_file", help="download token for /model, /datastore/dataset and /logs; created "
                                              "when missing (default: <studies>/.cellvta_token)")
    parser.add_argument("--allow_unauthenticated", action="store_true",
                        help="serve a non-loopback address without MONAI Label's authentication")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="app setting (bundle, work_dir, overrides, model_name, margin, max_side, "
                             "uncertainty_samples)")
    parser.add_argument("--ssl_keyfile", help="TLS private key (serve https)")
    parser.add_argument("--ssl_certfile", help="TLS certificate (serve https)")
    parser.add_argument("--log_level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the app's and MONAI Label's own lines (inference progress, latencies, training) in the server log
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] [%(name)s] [%(levelname)s] %(message)s")
    remote = args.studies.startswith(("http://", "https://"))
    studies = args.studies.rstrip("/") if remote else Path(args.studies).resolve()
    if not remote and not studies.is_dir():
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

    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise SystemExit(f"--host {args.host}: other machines could reach the server without authentication; "
                         "enable MONAI Label's (MONAI_LABEL_AUTH_ENABLE=true, see apps/monailabel/README.md), use "
                         "an SSH tunnel to 127.0.0.1, or pass --allow_unauthenticated")
    if not settings.MONAI_LABEL_CORS_ORIGINS:
        settings.MONAI_LABEL_CORS_ORIGINS = own_origins(args.host, args.port, bool(args.ssl_certfile))
    from cellvta_label.bundle import use_bundle_scripts
    from cellvta_label.config import AppConfig
    from cellvta_label.server import accept_token_algorithms, load_token, secure

    use_bundle_scripts(AppConfig.from_conf(APP_DIR, conf).bundle)

    token = None
    if settings.MONAI_LABEL_AUTH_ENABLE:
        accept_token_algorithms(TOKEN_ALGORITHMS)
    else:
        default_token = Path.home() / ".cellvta_label_token" if remote else studies / ".cellvta_token"
        token_file = Path(args.token_file or default_token)
        token = load_token(token_file)
        print(f"Downloads of the model, dataset and logs need 'Authorization: Bearer <token>'; token: {token_file}")

    import uvicorn
    from monailabel.app import app

    uvicorn.run(secure(app, token), host=args.host, port=args.port, log_level=args.log_level,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)


if __name__ == "__main__":
    main()
