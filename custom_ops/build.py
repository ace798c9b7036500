"""Compile and load the MSDA kernels (``torch.utils.cpp_extension`` + ninja, cached).

The library registers the operators ``cellvta::ms_deform_attn`` and
``cellvta::ms_deform_attn_backward`` (schema and CPU kernels; CUDA kernels too when built with
CUDA). Builds are cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
in one folder per environment (:func:`environment_key`: torch version, CUDA version, Python ABI
and the environment's prefix), so environments sharing this folder each compile once and do not
rebuild each other's library; within a folder a build is redone only when a source or flag changes.
A compile logs one line when it starts and one with its duration.

Ahead of time: ``python -m custom_ops.build`` (``--cuda`` forces the CUDA build, ``--build-dir``
chooses the cache folder).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = (CSRC / "ms_deform_attn.cpp",)
CUDA_SOURCES = CPU_SOURCES + (CSRC / "cuda" / "ms_deform_attn.cu",)
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[bool, str] = {}
_failed: dict[bool, BuildError] = {}
_registered: list[Path] = []  # the library that registered the operators in this process (at most one)


class BuildError(RuntimeError):
    """The MSDA extension could not be compiled or loaded."""


def cuda_wanted() -> bool:
    """Whether the default build includes the CUDA kernels (a CUDA device is usable)."""
    return torch.cuda.is_available() and torch.version.cuda is not None


def cuda_library_includes() -> list[str]:
    """Header folders of the CUDA libraries installed as ``nvidia-*`` wheels beside torch.

    PyPI's CUDA builds of torch take cuBLAS, cuSPARSE and friends from those wheels, so their
    headers (needed by ``ATen/cuda``) are there rather than in the toolkit.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return sorted(str(d) for root in roots for d in root.glob("*/include") if d.is_dir())


def cuda_runtime_ldflags(cuda_home: str) -> list[str]:
    """``-L`` for the first folder holding ``libcudart.so``: the toolkit's ``lib`` or ``lib64``, else
    ``/usr/local/cuda``'s (``cuda_home`` is a guess from ``nvcc``'s location, ``/usr/local`` when ``nvcc`` is a
    wrapper script in ``/usr/local/bin``)."""
    folders = [Path(cuda_home) / "lib", Path(cuda_home) / "lib64", Path("/usr/local/cuda/lib64"),
               Path("/usr/local/cuda/lib")]
    return next(([f"-L{d}"] for d in folders if (d / "libcudart.so").exists()), [])


def environment_key(
    torch_version: str | None = None, cuda_version: str | None = None, abi: str | None = None,
    prefix: str | None = None,
) -> str:
    """Name of this environment's build folder: what a compiled library depends on.

    Args default to the running interpreter: ``torch.__version__``, ``torch.version.cuda`` (``"cpu"`` for a
    CPU-only torch), ``sys.implementation.cache_tag`` (e.g. ``cpython-311``) and ``sys.prefix`` (hashed:
    two virtual environments with the same torch still record different torch paths in their build files).
    """
    torch_version = torch.__version__ if torch_version is None else torch_version
    cuda_version = (torch.version.cuda or "cpu") if cuda_version is None else cuda_version
    abi = sys.implementation.cache_tag if abi is None else abi
    prefix = sys.prefix if prefix is None else prefix
    digest = hashlib.sha1(str(Path(prefix).resolve()).encode()).hexdigest()[:10]
    tag = "cpu" if cuda_version == "cpu" else f"cu{cuda_version}"
    return f"torch{torch_version.replace('+', '_')}-{tag}-{abi}-{digest}"


def build_folder(cuda: bool, root: str | os.PathLike | None = None, key: str | None = None) -> Path:
    """``<root>/<key>/<library name>``: the build folder of the CPU or CUDA library for environment ``key``.

    ``root`` defaults to ``torch.utils.cpp_extension``'s (``$TORCH_EXTENSIONS_DIR`` or
    ``~/.cache/torch_extensions``), ``key`` to :func:`environment_key`.
    """
    from torch.utils import cpp_extension

    root = cpp_extension.get_default_build_root() if root is None else root
    return Path(root) / (environment_key() if key is None else key) / library_name(cuda)


def library_name(cuda: bool) -> str:
    """The extension's name (and its shared library's file stem)."""
    return "cellvta_msda_cuda" if cuda else "cellvta_msda_cpu"


def _up_to_date(library: Path, sources: tuple[Path, ...]) -> bool:
    """The library exists and is newer than every source."""
    return library.exists() and library.stat().st_mtime >= max(p.stat().st_mtime for p in sources)


def build(cuda: bool, build_directory: str | os.PathLike | None = None, verbose: bool = False) -> str:
    """Compile (if needed) and load the extension; return the path of the shared library.

    Args:
        cuda: include ``csrc/cuda/ms_deform_attn.cu`` (needs nvcc and a CUDA build of torch).
        build_directory: cache folder; ``None`` uses this environment's :func:`build_folder`.
        verbose: print the compiler commands and output.

    Raises:
        BuildError: with the reason (missing compiler, compile error, load error, or another build of the
            operators already loaded in this process: they can be registered once per process).
    """
    from torch.utils import cpp_extension

    name = library_name(cuda)
    folder = build_folder(cuda) if build_directory is None else Path(build_directory)
    folder.mkdir(parents=True, exist_ok=True)
    sources = CUDA_SOURCES if cuda else CPU_SOURCES
    library = folder / f"{name}.so"
    if _registered and _registered[0] != library.resolve():
        raise BuildError(f"{library}: the MSDA operators are already loaded in this process from {_registered[0]} "
                         "(they can be registered once per process: build or load this library in another one)")
    before = library.stat().st_mtime_ns if library.exists() else None
    if not _up_to_date(library, sources):
        logger.warning(f"compiling the MSDA op for {Path(sys.prefix).name} (torch {torch.__version__}, "
                       f"{'CUDA' if cuda else 'CPU'}) into {folder} ...")
    start = time.perf_counter()
    try:
        if cuda and cpp_extension.CUDA_HOME is None:
            raise BuildError("CUDA build requested but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        path = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS + (cuda_runtime_ldflags(cpp_extension.CUDA_HOME) if cuda else []),
            extra_cuda_cflags=CUDA_CFLAGS if cuda else None,
            build_directory=str(folder),
            extra_include_paths=cuda_library_includes() if cuda else None,
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except BuildError:
        raise
    except Exception as exc:  # compiler, linker and loader failures all surface here
        raise BuildError(f"building {name} failed: {_summary(str(exc))}") from exc
    if not _registered:
        _registered.append(Path(path).resolve())
    if library.exists() and library.stat().st_mtime_ns != before:
        logger.warning(f"compiling the MSDA op for {Path(sys.prefix).name} done in "
                       f"{time.perf_counter() - start:.0f} s")
    return str(path)


def load_library() -> str:
    """Build and load the default extension once per process: with the CUDA kernels when a CUDA device is usable,
    else, or when that build fails (a warning gives the reason), the CPU kernels only.

    Returns the library path; raises (every time, from the cached failure) ``BuildError``.
    """
    with _lock:
        if _loaded:  # one library per process: the operators' schema is registered once
            return next(iter(_loaded.values()))
        for cuda in ([True, False] if cuda_wanted() else [False]):
            if cuda in _failed:
                continue
            try:
                _loaded[cuda] = build(cuda)
            except BuildError as exc:
                _failed[cuda] = exc
                if cuda:
                    logger.warning(f"the CUDA build of the MSDA op failed, building the CPU kernels only: {exc}")
                continue
            from . import ops

            ops.register()
            return _loaded[cuda]
        raise _failed[False]


def cuda_build_failure() -> BuildError | None:
    """Why the CUDA build of :func:`load_library` failed in this process (None: it did not fail or was not tried)."""
    return _failed.get(True)


def _summary(text: str, lines: int = 8) -> str:
    """The compiler's error lines when there are any, else the end of the output."""
    all_lines = text.strip().splitlines()
    errors = [line for line in all_lines if "error" in line.lower() and not line.startswith("FAILED")]
    return "\n".join(errors[:lines] if errors else all_lines[-lines:])


def main(argv: list[str] | None = None) -> None:
    """``python -m custom_ops.build [--cuda | --cpu] [--build-dir DIR] [--verbose]``."""
    parser = argparse.ArgumentParser(prog="python -m custom_ops.build", description=__doc__.splitlines()[0])
    flavour = parser.add_mutually_exclusive_group()
    flavour.add_argument("--cuda", action="store_true", help="build with the CUDA kernels")
    flavour.add_argument("--cpu", action="store_true", help="build the CPU kernels only")
    parser.add_argument("--build-dir", default=None,
                        help="cache folder (default: this environment's folder in torch's extensions folder)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.cuda or (not args.cpu and cuda_wanted())
    path = build(cuda, args.build_dir, args.verbose)
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key("cellvta::ms_deform_attn", k)]
    print(f"built {path} (kernels: {', '.join(keys)})")


if __name__ == "__main__":
    main()
