"""The MSDA op's build cache: one folder per environment, compiled once, a log line only when compiling."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom_ops import build

REPO = Path(__file__).resolve().parents[1]


def test_environment_key_separates_torch_builds_and_environments(tmp_path):
    base = build.environment_key("2.4.0", "cpu", "cpython-311", "/work/main/.venv")
    assert build.environment_key() == build.environment_key(torch.__version__, torch.version.cuda or "cpu",
                                                            sys.implementation.cache_tag, sys.prefix)
    others = [
        build.environment_key("2.5.1", "cpu", "cpython-311", "/work/main/.venv"),
        build.environment_key("2.4.0", "12.4", "cpython-311", "/work/main/.venv"),
        build.environment_key("2.4.0", "cpu", "cpython-312", "/work/main/.venv"),
        build.environment_key("2.4.0", "cpu", "cpython-311", "/work/main/.venv-label"),
    ]
    assert len({base, *others}) == 5
    folders = {build.build_folder(False, tmp_path, key) for key in (base, *others)}
    assert len(folders) == 5 and all(f.parent.parent == tmp_path and f.name == "cellvta_msda_cpu" for f in folders)
    assert build.build_folder(True, tmp_path, base) != build.build_folder(False, tmp_path, base)


def _build_in_new_process(folder: Path) -> str:
    """Build (or reuse) the CPU library in ``folder`` from a fresh interpreter; return its log."""
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO); "
            f"from custom_ops import build; build.build(False, {str(folder)!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # two fresh interpreters importing torch
def test_a_compile_is_logged_once_and_a_second_load_reuses_the_library(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=build.__name__)
    library = Path(build.build(False))  # this environment's folder (compiled the first time it builds the op)
    assert library.parent == build.build_folder(False) and library.is_file()
    # a copy of the folder without the library: the next build links it again (the objects are kept)
    folder = tmp_path / library.parent.name
    shutil.copytree(library.parent, folder, ignore=shutil.ignore_patterns("lock", "*.so"))
    first = _build_in_new_process(folder)
    lines = [line for line in first.splitlines() if "compiling the MSDA op" in line]
    assert len(lines) == 2, first
    assert str(folder) in lines[0] and lines[0].endswith(" ...")
    assert " done in " in lines[1] and lines[1].endswith(" s")
    built = folder / library.name
    mtime = built.stat().st_mtime_ns
    second = _build_in_new_process(folder)
    assert "compiling" not in second and built.stat().st_mtime_ns == mtime
