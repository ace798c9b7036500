"""Training checkpoints survive kills: atomic writes, resumed best-model and early-stopping state, readable resume.

The kill tests run tests/training_kill_run.py (a real MONAI trainer and evaluator with the bundle's savers, wired
as configs/train.yaml does) and SIGKILL it in the middle of a chosen ``torch.save``. Validation scores per epoch are
0.3, 0.5, 0.4, 0.45, 0.7 with early-stopping patience 2, so an uninterrupted run saves model.pt at epochs 1 and 2 and
stops after epoch 4. The saves, in order: 1 model.pt, 2 epoch 1, 3 model.pt, 4 epoch 2, 5 epoch 3, 6 epoch 4.
The same run resumes from an epoch checkpoint of the older format (the test removes the newer entries) and stops
at a NaN validation score (``--scores nan,0.5``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai.engines import SupervisedTrainer

from scripts.nuclei.ignite_metrics import BinaryPQ
from scripts.training.checkpoints import AtomicCheckpointSaver, ResumeCheckpointLoader, parse_resume, resume_path

RUN = Path(__file__).resolve().parent / "training_kill_run.py"


def run(ckpt_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), str(ckpt_dir), *args], capture_output=True, text=True,
                          timeout=600)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epoch_files(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("checkpoint_epoch=*.pt"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def killed(ckpt_dir: Path, kill_at: int, n_saved: int) -> None:
    result = run(ckpt_dir, "--n_saved", str(n_saved), "--kill_at", str(kill_at))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.mark.slow
def test_kill_while_model_pt_is_written_keeps_the_previous_best_and_resume_rewrites_it(tmp_path):
    killed(tmp_path, kill_at=3, n_saved=1)  # during the second model.pt (epoch 2, score 0.5)
    assert epoch_files(tmp_path) == ["checkpoint_epoch=1.pt"]
    assert same_weights(load(tmp_path / "model.pt"), load(tmp_path / "checkpoint_epoch=1.pt")["model"])

    result = run(tmp_path, "--n_saved", "1", "--resume", "TRUE")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint_epoch=1.pt" in result.stdout and "finished at epoch 4" in result.stdout
    assert epoch_files(tmp_path) == ["checkpoint_epoch=4.pt"]
    last = load(tmp_path / "checkpoint_epoch=4.pt")
    assert [score for score, _ in last["best_saver"]["key_metric"]["_saved"]] == [0.5]
    assert last["best_metric"] == {"best_metric": 0.5, "best_metric_epoch": 2}
    assert not list(tmp_path.glob(".*.tmp-*"))  # the killed run's partial temporary is gone


@pytest.mark.slow
def test_kill_while_an_epoch_checkpoint_is_written_keeps_the_previous_one_and_the_best_model(tmp_path):
    killed(tmp_path, kill_at=5, n_saved=1)  # during epoch 3's checkpoint
    assert epoch_files(tmp_path) == ["checkpoint_epoch=2.pt"]  # not deleted before its successor exists
    best = (tmp_path / "model.pt").read_bytes()
    assert same_weights(load(tmp_path / "model.pt"), load(tmp_path / "checkpoint_epoch=2.pt")["model"])

    result = run(tmp_path, "--n_saved", "1", "--resume", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint_epoch=2.pt" in result.stdout
    # epochs 3 and 4 score 0.4 and 0.45: the resumed run knows the best is 0.5 and keeps model.pt
    assert (tmp_path / "model.pt").read_bytes() == best
    assert "finished at epoch 4" in result.stdout
    assert epoch_files(tmp_path) == ["checkpoint_epoch=4.pt"]
    # the loss scale continues from epoch 2's, as in the uninterrupted run
    assert load(tmp_path / "checkpoint_epoch=4.pt")["amp_scaler"]["scale"] == loss_scale(4)


@pytest.mark.slow
def test_resume_keeps_the_early_stopping_counter_and_prunes_the_epochs_of_the_run_it_continues(tmp_path):
    killed(tmp_path, kill_at=6, n_saved=2)  # during epoch 4's checkpoint
    assert epoch_files(tmp_path) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    assert same_weights(load(tmp_path / "model.pt"), load(tmp_path / "checkpoint_epoch=2.pt")["model"])
    assert load(tmp_path / "checkpoint_epoch=3.pt")["early_stop"] == {"counter": 1, "best_score": 0.5}

    result = run(tmp_path, "--n_saved", "2", "--resume", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint_epoch=3.pt" in result.stdout
    assert "finished at epoch 4" in result.stdout  # epoch 4 is the second without improvement: stop
    assert epoch_files(tmp_path) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]


@pytest.mark.parametrize(("value", "parsed"), [(True, True), ("true", True), ("True", True), ("TRUE", True),
                                                (False, False), ("false", False), ("FALSE", False), (None, False),
                                                ("models/checkpoint_epoch=3.pt", "models/checkpoint_epoch=3.pt")])
def test_resume_flag_is_a_boolean_in_any_case_or_a_path(value, parsed):
    assert parse_resume(value) == parsed


def test_resume_skips_an_unreadable_newest_checkpoint_with_a_warning_naming_it(tmp_path, caplog):
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "checkpoint_epoch=2.pt")
    data = (tmp_path / "checkpoint_epoch=2.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes(b"")
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert resume_path(tmp_path, "true") == str(tmp_path / "checkpoint_epoch=2.pt")
    warned = caplog.text
    assert "checkpoint_epoch=10.pt (empty file)" in warned and "checkpoint_epoch=3.pt" in warned
    assert resume_path(tmp_path, "false") is None

    with pytest.raises(ValueError, match=r"checkpoint_epoch=3\.pt"):
        resume_path(tmp_path, str(tmp_path / "checkpoint_epoch=3.pt"))
    (tmp_path / "checkpoint_epoch=2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        resume_path(tmp_path, True)


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
TINY = ["--backbone", "vit-t", "--vit_kwargs", "{'depth': 4}", "--patch_size", "64", "--num_workers", "0",
        "--batch_size", "4", "--progress_bar", "False"]


def train(*args: str) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", *TINY, *args]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_training_workflow_resumes_past_a_truncated_checkpoint_with_its_best_model_state(tmp_path):
    data = tmp_path / "synthetic"
    subprocess.run([sys.executable, "-m", "scripts.data.prepare", "synthetic", "--out", str(data), "--n", "12",
                    "--size", "64"], cwd=BUNDLE, check=True, capture_output=True, timeout=300)
    root = tmp_path / "run"
    log = train("--dataset_dir", str(data), "--bundle_root", str(root), "--epochs", "1")
    models = root / "models"
    first = float(re.search(r"Got new best metric of val_bpq: ([0-9.eE+-]+)", log).group(1))
    good = (models / "checkpoint_epoch=1.pt").read_bytes()
    (models / "checkpoint_epoch=2.pt").write_bytes(good[: len(good) // 2])  # a copy cut short
    best_before = (models / "model.pt").read_bytes()

    log = train("--dataset_dir", str(data), "--bundle_root", str(root), "--epochs", "2", "--resume", "true")
    assert re.search(r"skipping unreadable checkpoint \S*checkpoint_epoch=2\.pt", log)
    assert re.search(r"Restored all variables from \S*checkpoint_epoch=1\.pt", log)
    assert "Epoch[2] Complete" in log
    assert epoch_files(models) == ["checkpoint_epoch=2.pt"]
    state = load(models / "checkpoint_epoch=2.pt")
    # the resumed evaluator compares epoch 2 with epoch 1's score: model.pt is replaced only when beaten
    new_best = re.search(r"Got new best metric of val_bpq: ([0-9.eE+-]+)", log)
    if new_best:
        assert float(new_best.group(1)) > first
        assert state["best_metric"] == {"best_metric": float(new_best.group(1)), "best_metric_epoch": 2}
        assert state["early_stop"]["counter"] == 0
    else:
        assert (models / "model.pt").read_bytes() == best_before
        assert state["best_metric"] == {"best_metric": first, "best_metric_epoch": 1}
        assert state["early_stop"]["counter"] == 1
    assert load(models / "model.pt").keys() == state["model"].keys()


NEW_ENTRIES = ("best_saver", "best_metric", "early_stop", "amp_scaler", "last_saver")
ITERATIONS_PER_EPOCH = 2  # tests/training_kill_run.py: 8 samples, batch 4


def loss_scale(epochs: int) -> float:
    """The AMP loss scale after ``epochs`` epochs of tests/training_kill_run.py (doubled after every step)."""
    return 2.0 ** (epochs * ITERATIONS_PER_EPOCH)


def older_format(path: Path) -> dict:
    """Rewrites the epoch checkpoint at ``path`` as checkpoints were written before the best score, the evaluator's
    best metric, the early-stopping counter and the kept files were part of it; returns the removed entries."""
    state = load(path)
    removed = {k: state.pop(k) for k in NEW_ENTRIES}
    torch.save(state, path)
    return removed


@pytest.mark.slow
@pytest.mark.parametrize("with_best_metric_file", [True, False])
def test_resume_from_an_older_checkpoint_format_warns_and_starts_from_best_metric_json(tmp_path, with_best_metric_file):
    result = run(tmp_path, "--epochs", "2")  # scores 0.3, 0.5: model.pt holds epoch 2
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "best_metric.json").read_text()) == {"metric": "score", "value": 0.5, "epoch": 2}
    best = (tmp_path / "model.pt").read_bytes()
    removed = older_format(tmp_path / "checkpoint_epoch=2.pt")
    assert removed["best_metric"] == {"best_metric": 0.5, "best_metric_epoch": 2}
    if not with_best_metric_file:
        (tmp_path / "best_metric.json").unlink()

    result = run(tmp_path, "--resume", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "older checkpoint format" in line]
    assert len(warnings) == 1
    assert ("checkpoint_epoch=2.pt was written without best_saver, best_metric, early_stop, amp_scaler, last_saver"
            in warnings[0])
    assert "the mixed-precision loss scale starts from its initial value" in warnings[0]
    assert removed["amp_scaler"]["scale"] == loss_scale(2)
    # with the best 0.5 known, epochs 3 and 4 (0.4, 0.45) do not improve and the second stops the run; unknown,
    # epoch 3 becomes the best and 0.45, 0.7 improve on it
    end = 4 if with_best_metric_file else 5
    assert f"finished at epoch {end}" in result.stdout
    assert epoch_files(tmp_path) == [f"checkpoint_epoch={end}.pt"]  # epoch 2's file pruned (n_saved 1)
    last = load(tmp_path / f"checkpoint_epoch={end}.pt")
    assert last["amp_scaler"]["scale"] == loss_scale(end - 2)  # restarted from 1 at epoch 3
    if with_best_metric_file:
        assert "starts from" in warnings[0] and "(0.5 at epoch 2)" in warnings[0]
        assert (tmp_path / "model.pt").read_bytes() == best
        assert last["best_metric"] == {"best_metric": 0.5, "best_metric_epoch": 2}
        assert [score for score, _ in last["best_saver"]["key_metric"]["_saved"]] == [0.5]
        assert last["early_stop"] == {"counter": 2, "best_score": 0.5}
    else:
        assert "the best score is unknown" in warnings[0]
        assert same_weights(load(tmp_path / "model.pt"), last["model"])
        assert last["best_metric"] == {"best_metric": 0.7, "best_metric_epoch": 5}
        assert last["early_stop"] == {"counter": 0, "best_score": 0.7}


def test_resume_from_a_checkpoint_without_the_model_is_an_error_naming_it(tmp_path):
    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"optimizer": {}}, path)
    network = torch.nn.Linear(2, 2)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[], network=network,
                                optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
                                loss_function=torch.nn.MSELoss())
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": network}, save_key_metric=True,
                                  key_metric_filename="model.pt")
    loader = ResumeCheckpointLoader(load_path=str(path), load_dict={"model": network, "best_saver": saver})
    with pytest.raises(ValueError, match=r"cannot resume from \S*checkpoint_epoch=1\.pt: it has no model$"):
        loader(trainer)


@pytest.mark.slow
def test_a_nan_key_metric_stops_the_run_at_that_validation_and_never_becomes_the_best_model(tmp_path):
    result = run(tmp_path, "--scores", "nan,0.5")
    assert result.returncode != 0
    assert "validation key metric score is NaN at epoch 1: the validation ground truth has no nuclei" in result.stderr
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "best_metric.json").exists()
    assert epoch_files(tmp_path) == []


def test_binary_pq_of_a_validation_split_without_nuclei_is_nan():
    empty = torch.zeros(2, 2, 8, 8)  # (batch, instance/type, H, W): no nucleus in either image
    metric = BinaryPQ()
    metric.update((empty, empty))
    assert math.isnan(metric.compute())
    one = empty.clone()
    one[1, :, 2:5, 2:5] = 1
    metric.reset()
    metric.update((one, one))
    assert metric.compute() == pytest.approx(1.0)
