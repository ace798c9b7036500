"""The app's settings, read from MONAI Label's ``--conf key value`` pairs (all values arrive as strings)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the bundle's workflows whose configs the app uses (``scripts.workflows.configs`` lists their files)
INFERENCE_WORKFLOW = "inferring"
TRAIN_WORKFLOW = "training"
WSI_CONFIG = Path("configs") / "wsi_inference.yaml"
# the configs of the bundle's cell classifier (embedding source, training defaults)
CLASSIFIER_CONFIGS = ("common.yaml", "classifier.yaml")
CLASSIFIER_FILE = "classifier.pt"
# stain normalisation keys of configs/inference.yaml (the same as configs/wsi_inference.yaml's)
STAIN_KEYS = ("stain_normalization", "stain_reference", "stain_vectors", "stain_max_concentrations")


def _json_object(conf: Mapping[str, str], key: str) -> dict[str, Any]:
    raw = conf.get(key, "")
    if not raw:
        return {}
    path = Path(raw)
    text = path.read_text() if raw.endswith(".json") and path.is_file() else raw
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--conf {key}: not a JSON object or a .json file ({err}): {raw!r}") from err
    if not isinstance(value, dict):
        raise ValueError(f"--conf {key}: expected a JSON object, got {type(value).__name__}")
    return value


def _positive_int(conf: Mapping[str, str], key: str, default: int) -> int:
    raw = conf.get(key, str(default))
    try:
        value = int(raw)
    except ValueError as err:
        raise ValueError(f"--conf {key}: expected an integer, got {raw!r}") from err
    if value < 0:
        raise ValueError(f"--conf {key}: expected a value >= 0, got {value}")
    return value


def _stain(conf: Mapping[str, str]) -> dict[str, Any]:
    """The stain normalisation keys given in conf (``stain_normalization`` true/false, ``stain_reference`` an image
    path, ``stain_vectors`` and ``stain_max_concentrations`` JSON lists)."""
    out: dict[str, Any] = {}
    raw = conf.get("stain_normalization", "false").strip().lower()
    if raw not in ("true", "false"):
        raise ValueError(f"--conf stain_normalization: expected true or false, got {conf['stain_normalization']!r}")
    out["stain_normalization"] = raw == "true"
    if conf.get("stain_reference"):
        reference = Path(conf["stain_reference"]).resolve()
        if not reference.is_file():
            raise FileNotFoundError(f"{reference}: not found (--conf stain_reference must name an RGB image)")
        out["stain_reference"] = str(reference)
    for key, shape in (("stain_vectors", (3, 2)), ("stain_max_concentrations", (2,))):
        if conf.get(key):
            try:
                value = json.loads(conf[key])
            except json.JSONDecodeError as err:
                raise ValueError(f"--conf {key}: not JSON ({err}): {conf[key]!r}") from err
            if _shape(value) != shape:
                raise ValueError(f"--conf {key}: expected a JSON list of shape {list(shape)}, got {conf[key]!r}")
            out[key] = value
    return out


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a nested list of numbers, or None when it is not a regular one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ()
    if not isinstance(value, list) or not value:
        return None
    shapes = {_shape(v) for v in value}
    return (len(value), *shapes.pop()) if len(shapes) == 1 and None not in shapes else None


@dataclass(frozen=True)
class AppConfig:
    """Where the bundle, the served model and the training runs are, and the inference settings.

    Attributes:
        bundle: the CellVTA bundle folder (``configs/inference.yaml``, ``configs/train.yaml``, ``scripts/``).
        model_dir: folder of the served model: ``model.pt`` (state dict) and ``dataset.json`` (class table);
            training publishes its best checkpoint here.
        work_dir: training runs (datasets written from the datastore, logs, checkpoints), one folder each.
        overrides: bundle config keys shared by inference and training (e.g. ``{"backbone": "vit-s"}``): they
            must describe the network ``model.pt`` was trained as.
        model_name: the model's name in the MONAI Label API (``/infer/<model_name>``).
        margin: context in pixels read around each requested region (slide tiles see their neighbours' pixels,
            so nuclei on tile borders are found whole and kept once, by their centroid).
        max_side: largest image side the uncertainty strategies score; larger images are scored on their centre.
        uncertainty_samples: predictions per uncertainty score.
        progress_every: sliding windows between two inference progress lines in the log (0: one line per tile).
        classifier: the cell classifier (``classifier.pt`` of ``scripts.cells.classifier``) typing the nuclei when
            the file exists; ``/train/<model_name>_classifier`` writes it.
        stain: stain normalisation keys of the inference config (``STAIN_KEYS``).
    """

    bundle: Path
    model_dir: Path
    work_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    model_name: str = "cellvta"
    margin: int = 64
    max_side: int = 2048
    uncertainty_samples: int = 4
    progress_every: int = 16
    classifier: Path | None = None
    stain: dict[str, Any] = field(default_factory=dict)

    def new_run_dir(self, kind: str) -> Path:
        """Create and return ``<work_dir>/<kind>_<YYYYmmdd_HHMMSS>`` for one training run; a run started in the same
        second as another gets ``_2``, ``_3``, ... so no run ever writes into another's folder."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{kind}_{time.strftime('%Y%m%d_%H%M%S')}"
        run_dir, n = self.work_dir / stem, 1
        while True:
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                n += 1
                run_dir = self.work_dir / f"{stem}_{n}"

    @classmethod
    def from_conf(cls, app_dir: str | Path, conf: Mapping[str, str]) -> AppConfig:
        """Settings from MONAI Label's conf; paths default to the repository's bundle and its ``models/``."""
        bundle = Path(conf.get("bundle") or Path(app_dir).resolve().parents[1] / "bundles" / "cellvta").resolve()
        for needed in (Path("configs") / "inference.yaml", Path("configs") / "train.yaml", WSI_CONFIG):
            if not (bundle / needed).is_file():
                raise FileNotFoundError(f"{bundle / needed}: not found; --conf bundle must name the CellVTA bundle")
        model_dir = Path(conf.get("model_dir") or bundle / "models").resolve()
        work_dir = Path(conf.get("work_dir") or model_dir / "label_runs").resolve()
        classifier = Path(conf["classifier"]).resolve() if conf.get("classifier") else model_dir / CLASSIFIER_FILE
        if conf.get("classifier") and not classifier.is_file():
            raise FileNotFoundError(f"{classifier}: not found (--conf classifier must name a classifier.pt)")
        return cls(
            bundle=bundle,
            model_dir=model_dir,
            work_dir=work_dir,
            overrides=_json_object(conf, "overrides"),
            model_name=conf.get("model_name", "cellvta"),
            margin=_positive_int(conf, "margin", 64),
            max_side=_positive_int(conf, "max_side", 2048),
            uncertainty_samples=_positive_int(conf, "uncertainty_samples", 4),
            progress_every=_positive_int(conf, "progress_every", 16),
            classifier=classifier,
            stain=_stain(conf),
        )
