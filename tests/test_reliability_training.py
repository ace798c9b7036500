"""Training checkpoints survive kills: atomic writes, resumed best-model and early-stopping state, readable resume.

The kill tests run tests/training_kill_run.py (a real MONAI trainer and evaluator with the bundle's savers, wired
as configs/train.yaml does) and SIGKILL it in the middle of a chosen ``torch.save``. Validation scores per epoch are
0.3, 0.5, 0.4, 0.45, 0.7 with early-stopping patience 2, so an uninterrupted run saves model.pt at epochs 1 and 2 and
stops after epoch 4. The saves, in order: 1 model.pt, 2 epoch 1, 3 model.pt, 4 epoch 2, 5 epoch 3, 6 epoch 4.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.training.checkpoints import parse_resume, resume_path

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
