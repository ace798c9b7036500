"""The documents quote what the benchmarks recorded, and the repository stands on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import tables  # noqa: E402


def test_generated_tables_and_eval_metrics_are_up_to_date():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "tables.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_recorded_figure_reaches_the_readme_model_card_and_metadata():
    entries = tables.load_results()
    consep = entries["train_consep"]["result"]["cellvta"]
    meta = json.loads(tables.METADATA.read_text())
    assert meta["eval_metrics"]["bpq"] == consep["bpq"]
    for doc in tables.DOCUMENTS:
        assert f"| {consep['bpq']} | {consep['mpq']} |" in doc.read_text(), doc


def test_render_replaces_only_the_marked_block():
    entries = {"train_consep": {"command": "python bench/train_consep.py", "result": {
        "budget": "cpu-minutes", "budget_min": 1.0, "crop": 64, "batch_size": 2, "identical_batches": 3,
        "cellvta": {"params_m": 1.0, "steps": 5, "bpq": 0.5, "mpq": 0.25, "dice": 0.75, "aji": 0.125},
        "hovernet": {"params_m": 2.0, "steps": 4, "bpq": 0.1, "mpq": 0.0, "dice": 0.2, "aji": 0.05}}}}
    text = "before\n<!-- results:train_consep -->\nold\nlines\n<!-- /results:train_consep -->\nafter\n"
    out = tables.render(text, entries)
    assert out.startswith("before\n<!-- results:train_consep -->\n`python bench/train_consep.py`")
    assert "old" not in out and out.endswith("<!-- /results:train_consep -->\nafter\n")
    assert "| CellVTA (ViT-S/16 size, adapter) | 1.0 M | 5 | 0.5 | 0.25 | 0.75 | 0.125 |" in out
    assert tables.render(out, entries) == out


@pytest.mark.parametrize("needle", ["cellvta_reference", "BENCH_TABLE"])
def test_the_repository_cites_no_outside_document_and_has_no_placeholder(needle):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in tracked if (REPO / f).is_file() and f != "tests/test_docs.py"
            and needle in (REPO / f).read_text(errors="ignore")]
    assert not hits, f"{needle} in {hits}"
