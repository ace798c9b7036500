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


def test_adapter_hyper_parameters_are_in_the_config_and_reach_the_network():
    from monai.bundle import ConfigParser
    from scripts.model.network import CellVTA

    adapter = _load("train.yaml")["adapter"]
    assert adapter == _load("common.yaml")["adapter"]
    defaults = inspect.signature(CellVTA).parameters
    assert set(adapter) == {"conv_inplane", "extra_extractors", "extractor_drop_path", "n_points", "deform_num_heads",
                            "deform_ratio", "cffn_ratio", "init_values"}
    assert adapter == {k: defaults[k].default for k in adapter}
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "num_classes": 5, "num_tissues": 2,
                   "adapter#init_values": 0.5, "adapter#n_points": 2, "adapter#conv_inplane": 16})
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, CellVTA)
    injector = network.encoder.interactions[0].injector
    assert float(injector.gamma.detach()[0]) == 0.5 and injector.attn.n_points == 2
    assert network.encoder.spm.fc1.in_channels == 16
    parser.update({"use_adapter": False})
    assert type(parser.get_parsed_content("network_def", lazy=False)).__name__ == "CellViT"
