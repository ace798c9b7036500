"""``bench/gpu.py``, the one prepared script of a GPU session: without a GPU it refuses clearly, and its smoke run
takes every stage through the CPU at small shapes, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script measures instead")
def test_without_a_gpu_it_says_so_and_exits_non_zero():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no CUDA GPU is present" in result.stderr and "Nothing was measured" in result.stderr
    assert not result.stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_smoke_run_takes_every_stage_through_the_cpu(consep_npz, tmp_path):
    recorded = REPO / "bench" / "results" / "gpu.json"
    before = recorded.read_bytes() if recorded.is_file() else None
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--bundle", str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=1700, env={**os.environ, "OUT": str(out)})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # after each stage the stages so far are in $OUT (a run stopped by its time limit keeps them)
    assert json.loads((out / "gpu_stages.json").read_text()) == report
    assert (out / "parity_junit.xml").is_file() and (out / "parity_pytest.log").is_file()
    stages = ("build", "parity", "msda", "models", "precision", "wsi")
    assert not [s for s in stages if "error" in report[s]], {s: report[s] for s in stages if "error" in report[s]}
    assert report["build"]["implementation"] == "compiled" and report["build"]["self_check_failure"] is None
    assert report["build"]["cuda_build_failure"] is None  # no CUDA build is tried without a GPU
    assert report["parity"]["exit_code"] == 0 and report["parity"]["tests"] > 0
    assert report["msda"]["max_abs_diff_fwd"] < 1e-5
    for model in ("cellvta", "cellvit"):
        entry = report["models"][model]
        assert entry["backbone"] == "vit-t" and entry["fp32_b2"]["tiles_per_s"] > 0
    precision = report["precision"]["cpu"]
    assert set(precision) == {"fp32", "cpu_bf16", "cpu_bf16_autocast", "cpu_bf16_uniform"}
    assert 0.5 < precision["cpu_bf16"]["type_argmax_agreement"] <= 1
    wsi = report["wsi"]
    assert wsi["tiles"] == 9 and wsi["cells"] > 50 and wsi["network_only_tiles_per_s"] > 0
    # a smoke run records nothing
    assert (recorded.read_bytes() if recorded.is_file() else None) == before


@pytest.fixture
def gpu_script(monkeypatch):
    """``bench/gpu.py`` imported as a module (its path additions undone afterwards)."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bundle_installs_what_the_machine_lacks_or_has_too_old(gpu_script, monkeypatch):
    assert gpu_script.distribution("timm==1.0.31") == "timm"
    assert gpu_script.distribution("pytest_timeout-2.4.0-py3-none-any.whl") == "pytest-timeout"
    assert gpu_script.distribution("shapely-2.2.0-cp312-cp312-manylinux_2_28_x86_64.whl") == "shapely"
    assert not gpu_script.needs_wheel("timm")  # requirements.txt's timm is new enough
    monkeypatch.setitem(gpu_script.MINIMUM_VERSIONS, "timm", "99.0")
    assert gpu_script.needs_wheel("timm")
    monkeypatch.setitem(gpu_script.WHEELS, "no_such_module_here", "no-such-module-here==1.0")
    assert gpu_script.needs_wheel("no_such_module_here")
    assert 1 <= gpu_script.usable_cpus() <= (os.cpu_count() or 1)
