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
    assert "| CellVTA (ViT-S/16 size, adapter) | 1.0 | 5 | 0.5 | 0.25 | 0.75 | 0.125 |" in out
    assert tables.render(out, entries) == out


def test_classifier_table_quotes_every_amount_of_labels_and_the_targets():
    pts = {str(c): {"macro_f1": f, "macro_f1_sd": 0.01} for c, f in (("5", 0.4), ("50", 0.62), ("all", 0.66))}
    result = {"network": "cellvta_vit_s trained", "patches_train": 3, "patches_val": 2, "cells_train": 1200,
              "cells_val": 300, "val_class_counts": [1, 2, 3, 4], "seeds": 3,
              "curve": {"vit": pts, "decoder": pts, "pixel": pts}, "type_branch": {"macro_f1": 0.5},
              "extraction": {"patches": 5, "network_cpu_s_per_patch": 3.8, "network_wall_s": 40.0,
                             "pixel_cpu_s_per_patch": 0.03},
              "head_training": {s: {"cells": 20000, "wall_s": 70.5, "cpu_s": 30.1, "epochs": 90}
                                for s in ("vit", "decoder")},
              "targets": {"all_labels_head_ge_type_branch": {"vit": True, "decoder": True},
                          "labels_50_within_margin_of_all": {"vit": True, "decoder": False},
                          "head_training_within_s": {"vit": False, "decoder": False}, "margin": 0.05, "train_s": 60}}
    table = tables.classifier_table({"classifier": {"command": "python bench/classifier.py", "result": result}})
    assert "| macro-F1 on validation-tile nuclei, mean ± sd | 5/class | 50/class | all |" in table
    assert "| head on `decoder` embeddings | 0.400 ± 0.010 | 0.620 ± 0.010 | 0.660 ± 0.010 |" in table
    assert "| the network's own type branch (no labels) |  |  | 0.500 |" in table
    assert "within 0.05 of all: vit yes, decoder no; head training ≤ 60 s: vit no, decoder no." in table
    assert "(1,200 / 300 nuclei" in table


def test_precision_table_has_one_row_per_path_and_says_when_bf16_is_emulated():
    path = {"max_abs_diff_nuclei_prob": 0.02, "max_abs_diff_hv": 0.07, "type_argmax_agreement": 0.978, "bpq": 0.5,
            "bpq_change": -0.001, "max_tile_bpq_change": 0.004, "s_per_tile": 9.0, "speedup": 0.2}
    result = {"weights": "trained: cellvta_vit_s (cellvta_vit_s.pt)", "backbone": "vit-s", "tiles": 4, "size": 256,
              "device": "cpu", "native_bf16": False,
              "paths": {"fp32": {"s_per_tile": 1.8, "bpq": 0.501}, "cpu_bf16": path, "cpu_bf16_uniform": path}}
    table = tables.precision_table({"precision_trained": {"command": "python bench/precision.py", "result": result},
                                    "msda": {"result": {}}})
    assert "bf16 is emulated" in table and "float32 bPQ 0.501, 1.8 s per tile" in table
    row = "| CPU bf16, the bundle's path (bf16 weights, float32 streams) | 0.02 | 0.07 | 0.978 | 0.5 | -0.001 |"
    assert row in table
    assert "autocast" not in table and table.count("| CPU") == 2


@pytest.mark.parametrize("needle", ["cellvta_reference", "BENCH_TABLE"])
def test_the_repository_cites_no_outside_document_and_has_no_placeholder(needle):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in tracked if (REPO / f).is_file() and f != "tests/test_docs.py"
            and needle in (REPO / f).read_text(errors="ignore")]
    assert not hits, f"{needle} in {hits}"
