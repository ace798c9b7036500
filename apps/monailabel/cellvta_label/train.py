"""The MONAI Label training task: fine-tune the served model on the datastore's labels with the bundle's own
training workflow, then publish the best checkpoint to the model folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from .bundle import CLASS_TABLE, MODEL_FILE, NETWORK_RECORD, BundleModel, bundle_parser, workflow_configs
from .checkpoints import carry_over
from .classifier import CellClassifierTrain
from .config import TRAIN_WORKFLOW, AppConfig
from .dataset import LabelledImage, label_names, write_dataset
from .labels import class_table, has_outlines

STATS_FILE = "train_stats.json"
BEST_METRIC_FILE = "best_metric.json"  # written by scripts.training.best_metric.BestMetricWriter
DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 4,
    "learning_rate": 1e-4,
    "val_split": 0.2,
    "num_workers": 0,
    "seed": 19,
    "classes": "",
}


def _copy_atomically(source: Path, target: Path) -> None:
    from scripts.files import write_bytes_atomic

    write_bytes_atomic(target, source.read_bytes())


def _classes_param(value: Any) -> list[str] | None:
    if not value:
        return None
    names = value if isinstance(value, list) else str(value).split(",")
    return [str(n).strip() for n in names if str(n).strip()]


class CellVTATrain(TrainTask):
    """Fine-tune on every image of the datastore whose final label outlines nuclei, from the served checkpoint.

    The labels' class names may differ from the served model's: new names are appended to its class table
    (or ``classes`` in the request replaces the table), and the type head keeps the learnt rows of the classes
    both tables share. Each run lives in ``<work_dir>/run_<time>/`` (``data/``, ``train.log``, ``models/``);
    its best checkpoint (validation bPQ) and class table replace the served ones, which the inference task
    picks up on its next request. A cell classifier this app trained is then trained again with its last
    request on the new weights' embeddings (``classifier`` in the run's record: that run's record, or the error
    that stopped it).

    Args:
        model: the served bundle.
        config: the app's settings.
    """

    def __init__(self, model: BundleModel, config: AppConfig, classifier: CellClassifierTrain | None = None) -> None:
        super().__init__("Fine-tune CellVTA on the datastore's labels with the bundle's training workflow")
        self.model = model
        self.app_config = config
        self.classifier = classifier

    def config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def stats(self) -> dict[str, Any]:
        path = self.app_config.model_dir / STATS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        params = {**DEFAULTS, **{k: v for k, v in request.items() if k in DEFAULTS}}
        started = time.time()
        rows = datastore.local_datalist() if hasattr(datastore, "local_datalist") else datastore.datalist()
        items = [LabelledImage(Path(d["image"]), Path(d["label"])) for d in rows if has_outlines(d["label"])]
        if not items:
            raise ValueError("the datastore has no images labelled with nucleus outlines (polygons or maps): save "
                             "labels with PUT /datastore/label first (point labels train the cell classifier, "
                             "/train/<model>_classifier)")
        run_dir = self.app_config.new_run_dir("run")

        served = self.model.is_ready()
        current = self.model.classes() if served else None
        classes = class_table(current, label_names(items), _classes_param(params["classes"]), "datastore labels")
        info = self._served_info() if served else None
        network = self.model.settings()
        parser = bundle_parser(self.app_config.bundle, TRAIN_WORKFLOW, network)
        patch_size = int(parser.get_parsed_content("patch_size"))
        splits = write_dataset(
            items, run_dir / "data", classes, info.tissues if info else ["tissue"],
            info.magnification if info else 40, patch_size, float(params["val_split"]), int(params["seed"]),
        )
        initial = self._initial_weights(run_dir, classes, current, network) if served else None
        best = self._run_bundle(run_dir, initial, params, network)
        self._publish(run_dir / "models", network)
        stats = {
            "run": run_dir.name,
            "images": len(items),
            "train": splits["train"],
            "val": splits["val"],
            "classes": classes,
            "epochs": int(params["epochs"]),
            "best_metric": best,
            # relative to the work folder, or the served weights: /info shows this record, without server paths
            "initial_weights": (None if initial is None else str(initial.relative_to(self.app_config.work_dir))
                                if initial.is_relative_to(self.app_config.work_dir) else "served model.pt"),
            "seconds": round(time.time() - started, 1),
        }
        if self.classifier is not None and self.classifier.trained_here():
            stats["classifier"] = self._retrain_classifier(datastore)
        from scripts.files import write_text_atomic

        write_text_atomic(self.app_config.model_dir / STATS_FILE, json.dumps(stats, indent=1))
        return stats

    def _retrain_classifier(self, datastore: Datastore) -> dict[str, Any]:
        """The cell classifier trained again on the published weights: its run's record, or ``{"error": ...}``
        (the served classifier then still belongs to the previous weights and inference refuses it, naming it)."""
        try:
            return self.classifier.retrain(datastore)
        except Exception as err:  # the new weights are published: their run's record must be written whatever failed
            print(f"the cell classifier was not trained again on the new weights: {err}", flush=True)
            return {"error": f"{type(err).__name__}: {err}"}

    def _served_info(self):
        from scripts.data.datasets import read_info

        return read_info(self.app_config.model_dir)

    def _initial_weights(self, run_dir: Path, classes: list[str], current: list[str], network: dict[str, Any]
                         ) -> Path:
        """The served weights, or (new class table) a copy of them fitted to the new type head."""
        if [c.lower() for c in classes] == [c.lower() for c in current]:
            return self.model.model_file
        from scripts.model.weights import read_state_dict

        parser = bundle_parser(self.app_config.bundle, TRAIN_WORKFLOW, {
            "dataset_dir": str(run_dir / "data"), "dataset_name": "folder", **network,
        })
        fresh = parser.get_parsed_content("network_def", instantiate=True).state_dict()
        state, partial = carry_over(read_state_dict(self.model.model_file), current, fresh, classes)
        print(f"class table {current} -> {classes}: re-initialised rows of {partial}", flush=True)
        path = run_dir / "initial.pt"
        torch.save(state, path)
        return path

    def _run_bundle(self, run_dir: Path, initial: Path | None, params: dict[str, Any], network: dict[str, Any]
                    ) -> dict[str, Any] | None:
        """``python -m monai.bundle run training`` in the bundle folder.

        Returns:
            The best validation metric the run's ``BestMetricWriter`` recorded (``{"metric", "value", "epoch"}``),
            or None when no validation ran.
        """
        overrides: dict[str, Any] = {
            **network,
            "bundle_root": str(run_dir),
            "dataset_dir": str(run_dir / "data"),
            "dataset_name": "folder",
            "epochs": int(params["epochs"]),
            "batch_size": int(params["batch_size"]),
            "learning_rate": float(params["learning_rate"]),
            "num_workers": int(params["num_workers"]),
            "seed": int(params["seed"]),
            "loss_weights": {"tissue_ce": 0.0},
            "progress_bar": False,
        }
        if initial is not None:
            overrides["checkpoint"] = str(initial)
        cmd = [sys.executable, "-m", "monai.bundle", "run", TRAIN_WORKFLOW, "--config_file",
               repr(workflow_configs(TRAIN_WORKFLOW))]
        for key, value in overrides.items():
            cmd += [f"--{key}", repr(value)]
        log = run_dir / "train.log"
        with log.open("w") as out, subprocess.Popen(cmd, cwd=self.app_config.bundle, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                out.write(line)
                print(line, end="", flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the bundle's training failed (exit code {proc.returncode}); see {log}")
        best = run_dir / "models" / BEST_METRIC_FILE
        return json.loads(best.read_text()) if best.is_file() else None

    def _publish(self, models: Path, network: dict[str, Any]) -> None:
        """Replace the served weights, class table and network record by the run's best checkpoint, its table
        and its record (the settings it was trained with)."""
        from scripts.files import write_text_atomic

        weights, table = models / MODEL_FILE, models / CLASS_TABLE
        for path in (weights, table):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the training run wrote no {path.name}")
        self.app_config.model_dir.mkdir(parents=True, exist_ok=True)
        _copy_atomically(table, self.app_config.model_dir / CLASS_TABLE)
        record = models / NETWORK_RECORD  # written by the bundle's training: every key that built the network
        if record.is_file():
            _copy_atomically(record, self.app_config.model_dir / NETWORK_RECORD)
        else:
            write_text_atomic(self.app_config.model_dir / NETWORK_RECORD, json.dumps(network, indent=1))
        _copy_atomically(weights, self.app_config.model_dir / MODEL_FILE)
