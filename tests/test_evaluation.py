"""The evaluation entry point: folders and arrays in, JSON and Markdown out, equal to the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.nuclei.evaluation import evaluate

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
NAMES = ["background", "other", "inflammatory", "epithelial", "spindle"]


@pytest.fixture(scope="module")
def fixture(fixtures_dir: Path) -> tuple[dict, dict]:
    with np.load(fixtures_dir / "postprocess_consep.npz") as d:
        maps = {k: d[k] for k in ("gt_inst", "gt_type", "ref_inst", "ref_type", "source_name")}
    reference = json.loads((fixtures_dir / "reference_results.json").read_text())
    return maps, reference


def _write_folder(root: Path, inst: np.ndarray, types: np.ndarray, names: np.ndarray) -> Path:
    root.mkdir()
    for name, i, t in zip(names, inst, types):
        np.savez(root / f"{name}.npz", inst_map=i, type_map=t)
    return root


def test_command_line_on_folders_writes_reference_equal_tables(fixture, tmp_path):
    maps, reference = fixture
    pred = _write_folder(tmp_path / "pred", maps["ref_inst"], maps["ref_type"], maps["source_name"])
    gt = _write_folder(tmp_path / "gt", maps["gt_inst"], maps["gt_type"], maps["source_name"])
    tissues = tmp_path / "tissues.csv"
    tissues.write_text("name,tissue\n" + "".join(f"{n},{'a' if k % 2 else 'b'}\n"
                                                 for k, n in enumerate(maps["source_name"])))
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.evaluate", f"--pred={pred}", f"--gt={gt}", f"--output_dir={out}",
         f"--class_names=[{','.join(NAMES)}]", f"--tissues={tissues}"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    expected = reference["summary"]
    assert summary["bpq"] == pytest.approx(expected["bpq_mean"], abs=1e-9)
    assert summary["aji"] == pytest.approx(expected["aji_mean"], abs=1e-9)
    assert summary["mpq"] == pytest.approx(expected["mpq_pannuke_style"], abs=1e-9)
    assert summary["mpq_plus"] == pytest.approx(expected["conic_mpq_plus"], abs=1e-9)
    assert set(summary["per_tissue"]) == {"a", "b"}
    markdown = (out / "metrics.md").read_text()
    assert "| bPQ | 0.8279 |" in markdown and "epithelial" in markdown
    assert not list(out.glob(".*.tmp*"))


def test_arrays_give_the_same_result_as_folders(fixture):
    maps, reference = fixture
    result = evaluate((maps["ref_inst"], maps["ref_type"]), (maps["gt_inst"], maps["gt_type"]), class_names=NAMES)
    for got, ref in zip(result["per_image"], reference["per_image"]):
        np.testing.assert_allclose([got["bdq"], got["bsq"], got["bpq"]], ref["binary_dq_sq_pq"], atol=1e-9)


def test_a_ground_truth_image_without_prediction_is_named(fixture, tmp_path):
    maps, _ = fixture
    names = maps["source_name"][:3]
    pred = _write_folder(tmp_path / "pred", maps["ref_inst"][:2], maps["ref_type"][:2], names[:2])
    gt = _write_folder(tmp_path / "gt", maps["gt_inst"][:3], maps["gt_type"][:3], names)
    with pytest.raises(ValueError, match=str(names[2])):
        evaluate(str(pred), str(gt), class_names=NAMES)
