"""A small real MONAI training run with the bundle's checkpoint savers, killed with SIGKILL in the middle of a write.

Used by tests/test_reliability_training.py as a subprocess:

    python tests/training_kill_run.py CKPT_DIR --epochs 5 --n_saved 1 --resume true --kill_at 3

The network is a linear layer trained by SGD on fixed data (deterministic); the validation score of epoch ``e`` is
``SCORES[e - 1]`` (or the ``e``-th of ``--scores``) so that the best epochs are known. The trainer runs with AMP's
gradient scaler (torch's CPU ``GradScaler``, its scale doubled after every step: ``2**iterations``), so that the
scale reached is part of what a resume must restore. The savers, the early stopping and the resume are wired as in
configs/train.yaml. ``--kill_at k`` makes the k-th ``torch.save`` of the run write half of its bytes to the file it
was given and then SIGKILL the process, as a kill during that write would. Every ``torch.save`` target is appended
to ``CKPT_DIR/saves.log``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles" / "cellvta"))

from ignite.engine import Events  # noqa: E402
from ignite.metrics import Average  # noqa: E402
from monai.engines import SupervisedEvaluator, SupervisedTrainer  # noqa: E402
from monai.handlers import ValidationHandler  # noqa: E402

from scripts.training.best_metric import BestMetricWriter  # noqa: E402
from scripts.training.checkpoints import (  # noqa: E402
    AtomicCheckpointSaver,
    BestMetricState,
    GradScalerState,
    ResumableEarlyStopHandler,
    ResumeCheckpointLoader,
    resume_path,
)
from scripts.training.tracking import key_metric_score  # noqa: E402

SCORES = [0.3, 0.5, 0.4, 0.45, 0.7]
PATIENCE = 2


def kill_during_save(kill_at: int, log: Path) -> None:
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        with open(log, "a") as fh:
            fh.write(f"{Path(f).name}\n")
        if calls[0] == kill_at:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=len(SCORES))
    parser.add_argument("--n_saved", type=int, default=1)
    parser.add_argument("--resume", default="false")
    parser.add_argument("--kill_at", type=int, default=0)
    parser.add_argument("--scores", type=lambda text: [float(v) for v in text.split(",")], default=SCORES,
                        help="validation score per epoch, e.g. nan,0.5")
    args = parser.parse_args()
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    kill_during_save(args.kill_at, args.ckpt_dir / "saves.log")

    torch.manual_seed(0)
    network = torch.nn.Linear(4, 2)
    data = [{"image": torch.randn(4), "label": torch.randn(2)} for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=args.epochs, train_data_loader=loader,
                                network=network, optimizer=optimizer, loss_function=torch.nn.MSELoss(), amp=True)
    # MONAI's trainer makes its (CUDA) scaler when the run starts: this CPU one replaces it before the resume loads
    trainer.add_event_handler(Events.STARTED, lambda engine: setattr(
        engine, "scaler", torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)))
    best_saver = AtomicCheckpointSaver(save_dir=str(args.ckpt_dir), save_dict={"model": network},
                                       save_key_metric=True, key_metric_filename="model.pt")
    early_stop = ResumableEarlyStopHandler(patience=PATIENCE, score_function=key_metric_score, epoch_level=True)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=network,
        key_val_metric={"score": Average(output_transform=lambda _: args.scores[evaluator.state.epoch - 1])},
        val_handlers=[best_saver, BestMetricWriter(args.ckpt_dir / "best_metric.json"), early_stop])
    ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    early_stop.set_trainer(trainer)
    states = {"model": network, "optimizer": optimizer, "trainer": trainer, "best_saver": best_saver,
              "best_metric": BestMetricState(evaluator), "early_stop": early_stop,
              "amp_scaler": GradScalerState(trainer)}
    last_saver = AtomicCheckpointSaver(save_dir=str(args.ckpt_dir), save_dict=states, state_key="last_saver",
                                       save_interval=1, n_saved=args.n_saved, epoch_level=True)
    if (path := resume_path(args.ckpt_dir, args.resume)) is not None:
        ResumeCheckpointLoader(load_path=path, load_dict={**states, "last_saver": last_saver}).attach(trainer)
        print(f"resuming from {Path(path).name}", flush=True)
    last_saver.attach(trainer)
    trainer.run()
    print(f"finished at epoch {trainer.state.epoch}", flush=True)


if __name__ == "__main__":
    main()
