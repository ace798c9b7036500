"""Assemble the self-contained folder that ``monai-deploy package`` turns into a MAP.

    python apps/deploy/stage.py build/cellvta-map
    monai-deploy package build/cellvta-map -c build/cellvta-map/app.yaml -m <model folder> \\
        -t cellvta:0.1.0 --platform x86_64

The folder holds the app (``__main__.py``, ``cellvta_deploy/``, ``app.yaml``, ``README.md``), the bundle it runs
(``bundle/configs``, ``bundle/scripts``), the multi-scale deformable attention op (``custom_ops/``, compiled on first
use in the container, with the PyTorch reference as fallback) and ``requirements.txt``: the bundle's runtime
requirements followed by the app's. The packager copies the folder to ``/opt/holoscan/app`` and runs
``python3 /opt/holoscan/app``. An existing staging folder is replaced; any other existing path is refused.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
REPO = APP_DIR.parent.parent
APP_FILES = ("__main__.py", "app.yaml", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build")
MARKER = ".cellvta-map"


def requirements_text(repo: Path = REPO, app_dir: Path = APP_DIR) -> str:
    """The MAP's requirements: the repository's ``requirements.txt``, then ``apps/deploy/requirements.txt``."""
    parts = [f"# {repo / 'requirements.txt'}\n", (repo / "requirements.txt").read_text(),
             f"# {app_dir / 'requirements.txt'}\n", (app_dir / "requirements.txt").read_text()]
    return "".join(part if part.endswith("\n") else part + "\n" for part in parts)


def stage(out: Path, repo: Path = REPO, app_dir: Path = APP_DIR) -> Path:
    """Write the MAP source folder ``out`` (built beside it, then moved into place) and return it.

    Raises:
        FileExistsError: ``out`` exists and is not a folder this function wrote.
    """
    out = Path(out).resolve()
    if out.exists() and not (out / MARKER).is_file():
        raise FileExistsError(f"{out}: exists and is not a staged CellVTA MAP folder; choose a new path")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy2(app_dir / name, tmp / name)
    shutil.copytree(app_dir / "cellvta_deploy", tmp / "cellvta_deploy", ignore=IGNORED)
    for part in ("configs", "scripts"):
        shutil.copytree(repo / "bundles" / "cellvta" / part, tmp / "bundle" / part, ignore=IGNORED)
    shutil.copytree(repo / "custom_ops", tmp / "custom_ops", ignore=IGNORED)
    (tmp / "requirements.txt").write_text(requirements_text(repo, app_dir))
    (tmp / MARKER).write_text("written by apps/deploy/stage.py\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (e.g. build/cellvta-map)")
    out = stage(parser.parse_args(argv).out)
    print(f"MAP source folder: {out}\n"
          f"package it: monai-deploy package {out} -c {out / 'app.yaml'} -m <model folder> "
          f"-t cellvta:0.1.0 --platform x86_64")


if __name__ == "__main__":
    main()
