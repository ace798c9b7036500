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


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a process holds one build of the operators), its output captured."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)


def _build_in_new_process(folder: Path, cuda: bool) -> str:
    """Build (or reuse) the library in ``folder`` from a fresh interpreter; return its log."""
    done = _run("import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO); "
                f"from custom_ops import build; build.build({cuda}, {str(folder)!r})")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # two fresh interpreters importing torch
def test_a_compile_is_logged_once_and_a_second_load_reuses_the_library(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=build.__name__)
    cuda = build.cuda_wanted()  # the flavour this process loads (with the CUDA kernels on a GPU machine)
    library = Path(build.build(cuda))  # this environment's folder (compiled the first time it builds the op)
    assert library.parent == build.build_folder(cuda) and library.is_file()
    # a copy of the folder without the library: the next build links it again (the objects are kept)
    folder = tmp_path / library.parent.name
    shutil.copytree(library.parent, folder, ignore=shutil.ignore_patterns("lock", "*.so"))
    first = _build_in_new_process(folder, cuda)
    lines = [line for line in first.splitlines() if "compiling the MSDA op" in line]
    assert len(lines) == 2, first
    assert str(folder) in lines[0] and lines[0].endswith(" ...")
    assert " done in " in lines[1] and lines[1].endswith(" s")
    built = folder / library.name
    mtime = built.stat().st_mtime_ns
    second = _build_in_new_process(folder, cuda)
    assert "compiling" not in second and built.stat().st_mtime_ns == mtime


def test_a_second_build_of_the_operators_is_refused_in_a_process_that_holds_one(tmp_path):
    """Registering the operators twice would abort the process: loading another library is an error naming both."""
    done = _run("import shutil; from pathlib import Path; from custom_ops import build; "
                "first = Path(build.build(False)); "
                f"shutil.copytree(first.parent, {str(tmp_path / 'copy')!r}); "
                "build.build(False, first.parent)\n"  # the same library again: nothing to register
                "try:\n"
                f"    build.build(False, {str(tmp_path / 'copy')!r})\n"
                "except build.BuildError as e:\n"
                "    print('refused:', e)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"refused: {tmp_path / 'copy' / 'cellvta_msda_cpu.so'}: the MSDA operators are already loaded" in done.stdout


def test_a_failed_cuda_build_falls_back_to_the_cpu_kernels():
    """On a GPU machine whose CUDA build fails (here: no toolkit), the CPU kernels still load and run."""
    done = _run("from torch.utils import cpp_extension; from custom_ops import build; import custom_ops\n"
                "cpp_extension.CUDA_HOME = None\n"
                "build.cuda_wanted = lambda: True  # a machine with a usable GPU\n"
                "print(custom_ops.implementation('cpu'), '|', build.cuda_build_failure())")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "compiled | CUDA build requested but no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    assert "the CUDA build of the MSDA op failed, building the CPU kernels only" in done.stderr
