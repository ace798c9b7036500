"""Every experiment number of the loss, the augmentations, the post-processing and the upscale protocol is stated
in the configs, and equals the code's documented default (so a run without the configs is the same experiment)."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

from scripts.data.transforms import AUGMENTATION, augmentation_params
from scripts.inference.upscale import UpscaleInferer
from scripts.nuclei.postprocess import MAGNIFICATION_PRESETS, postprocess_settings
from scripts.training.losses import DEFAULT_WEIGHTS, CellVTALoss

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cellvta" / "configs"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _as_lists(table: dict) -> dict:
    return {k: {p: list(v) if isinstance(v, tuple) else v for p, v in d.items()} for k, d in table.items()}


def test_loss_and_augmentation_numbers_are_all_in_the_training_config():
    train = _load("train.yaml")
    assert train["loss_weights"] == DEFAULT_WEIGHTS
    defaults = inspect.signature(CellVTALoss).parameters
    assert train["focal_tversky"] == {k: defaults[k].default for k in ("alpha", "beta", "gamma")}
    assert train["augmentation"] == _as_lists(AUGMENTATION)
    assert augmentation_params(train["augmentation"]) == _as_lists(AUGMENTATION)
    assert train["train"]["preprocessing"]["augmentation"] == "@augmentation"


def test_postprocessing_presets_are_in_every_config_that_post_processes():
    for name in ("common.yaml", "train.yaml"):
        presets = _load(name)["postprocessing_presets"]
        assert set(presets) == {str(m) for m in MAGNIFICATION_PRESETS}
        for magnification, settings in MAGNIFICATION_PRESETS.items():
            assert postprocess_settings(magnification, presets) == settings, (name, magnification)
    for name in ("train.yaml", "evaluate.yaml", "inference.yaml"):
        text = (CONFIGS / name).read_text()
        assert text.count("HoVerNetPostProcessingd") == text.count('presets: "@postprocessing_presets"'), name


def test_upscale_protocol_sizes_are_in_the_evaluation_config():
    evaluate = _load("evaluate.yaml")
    defaults = inspect.signature(UpscaleInferer).parameters
    assert evaluate["upscale_size"] / _load("train.yaml")["patch_size"] == defaults["scale"].default
    assert evaluate["upscale_crop_overlap"] == defaults["crop_overlap"].default
    assert evaluate["upscale_blend_mode"] == defaults["mode"].default
    assert evaluate["upscale_sw_batch_size"] == defaults["sw_batch_size"].default
    assert "@upscale_crop_overlap, @upscale_blend_mode, @upscale_sw_batch_size" in evaluate["inferer"]
