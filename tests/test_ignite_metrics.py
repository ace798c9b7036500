"""Ignite metrics over the real fixture pairs: values equal the reference and the pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from scripts.nuclei.ignite_metrics import AJI, BinaryPQ, MultiPQ, MultiPQPlus, NucleiMetricsSaver


@pytest.fixture(scope="module")
def batches(fixtures_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 40 fixture pairs in batches of 8, as (B, 2, H, W) (instance, class) tensors."""
    with np.load(fixtures_dir / "postprocess_consep.npz") as d:
        pred = np.stack([d["ref_inst"], d["ref_type"]], 1)
        gt = np.stack([d["gt_inst"], d["gt_type"]], 1)
    return [(torch.from_numpy(pred[i:i + 8]), torch.from_numpy(gt[i:i + 8])) for i in range(0, 40, 8)]


def test_metrics_on_an_engine_equal_the_reference(batches, fixtures_dir, tmp_path):
    reference = json.loads((fixtures_dir / "reference_results.json").read_text())["summary"]
    engine = Engine(lambda e, batch: batch)
    metrics = {"bpq": BinaryPQ(output_transform=lambda o: o), "mpq": MultiPQ(5, output_transform=lambda o: o),
               "mpq_plus": MultiPQPlus(5, output_transform=lambda o: o), "aji": AJI(output_transform=lambda o: o)}
    for name, metric in metrics.items():
        metric.attach(engine, name)
    NucleiMetricsSaver(metrics["mpq"], tmp_path).attach(engine)
    state = engine.run(batches)
    assert state.metrics["bpq"] == pytest.approx(reference["bpq_mean"], abs=1e-9)
    assert state.metrics["mpq"] == pytest.approx(reference["mpq_pannuke_style"], abs=1e-9)
    assert state.metrics["mpq_plus"] == pytest.approx(reference["conic_mpq_plus"], abs=1e-9)
    assert state.metrics["aji"] == pytest.approx(reference["aji_mean"], abs=1e-9)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["summary"]["mpq"] == pytest.approx(reference["mpq_pannuke_style"], abs=1e-9)
    assert len(saved["per_image"]) == 40


def test_a_second_run_starts_from_scratch(batches):
    engine = Engine(lambda e, batch: batch)
    BinaryPQ(output_transform=lambda o: o).attach(engine, "bpq")
    full = engine.run(batches).metrics["bpq"]
    first = engine.run(batches[:1]).metrics["bpq"]
    assert first != pytest.approx(full, abs=1e-6)
