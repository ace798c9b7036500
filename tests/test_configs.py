"""The bundle's configs: how workflows are composed, overrides checked, errors told, MLflow params derived."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.workflows.configs import CONFIGS_DIR, WORKFLOW_CONFIGS, config_files, run_id
from scripts.workflows.demo_data import demo_dataset
from scripts.workflows.errors import one_line
from scripts.workflows.overrides import check_overrides
from scripts.workflows.run import WorkflowError, run

BUNDLE = CONFIGS_DIR.parent
TINY = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 64}


def load(name: str) -> dict:
    return ConfigParser.load_config_file(str(CONFIGS_DIR / name))


def test_train_yaml_runs_alone_with_the_keys_of_common_yaml_unchanged():
    common, train = load("common.yaml"), load("train.yaml")
    assert set(common) <= set(train)
    differ = [k for k in common if train[k] != common[k]]
    assert not differ, f"train.yaml and common.yaml differ on {differ}: change both"


def test_workflow_configs_use_no_file_macros_and_overrides_only_add_to_train():
    for name in ("common.yaml", "train.yaml", "evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml",
                 "wsi_inference.yaml"):
        assert "%configs/" not in (CONFIGS_DIR / name).read_text(), name
    train = load("train.yaml")
    for override in ("evaluate.yaml", "multi_gpu_train.yaml"):
        config = load(override)
        # an override repeats no key of train.yaml with the same value (no copies)
        same = [k for k, v in config.items() if k in train and train[k] == v and k != "run"]
        assert not same, f"{override} repeats {same}"
    assert config_files("evaluating") == [str(CONFIGS_DIR / "train.yaml"), str(CONFIGS_DIR / "evaluate.yaml")]
    assert config_files("whole_slide") == [str(CONFIGS_DIR / "common.yaml"), str(CONFIGS_DIR / "wsi_inference.yaml")]
    assert set(WORKFLOW_CONFIGS) == {"training", "evaluating", "inferring", "whole_slide"}
    assert [run_id(w) for w in WORKFLOW_CONFIGS] == ["training", "evaluating", "inferring", "inferring"]


@pytest.mark.parametrize("workflow", ["training", "evaluating", "inferring", "whole_slide"])
def test_every_workflow_parses_from_another_folder_and_builds_its_network(workflow, tmp_path, monkeypatch):
    data = demo_dataset(str(tmp_path / "data"), n=4, size=64)
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(config_files(workflow))
    parser.update({**TINY, "bundle_root": str(tmp_path), "dataset_dir": data, "checkpoint": None,
                   "dataset_info": "$scripts.data.datasets.read_info(@dataset_dir)"})
    network = parser.get_parsed_content("network")
    assert network.backbone == "vit-t" and network.decoder is not None
    assert parser.get_parsed_content("num_classes") == 5 and run_id(workflow) in parser.get()


def test_the_documented_network_switch_override_reaches_the_network():
    parser = ConfigParser()
    parser.read_config(config_files("training"))
    parser.update({**TINY, "network_def#cls_through_blocks": False, "num_classes": 5, "num_tissues": 2})
    assert parser.get_parsed_content("network_def").encoder.cls_through_blocks is False
    parser.update({"network_def#cls_through_blocks": True})
    assert parser.get_parsed_content("network_def", lazy=False).encoder.cls_through_blocks is True


def test_unknown_override_keys_are_refused_with_the_closest_key():
    config = load("train.yaml")
    check_overrides({"epochs": 1, "train#dataloader#batch_size": 2, "validate#handlers#0#iteration_log": True,
                     "network_def#cls_through_blocks": False, "splits#consep#val": []},
                    config)
    with pytest.raises(ValueError, match=r"--ouput_dir: no key 'ouput_dir' .*did you mean --output_dir\?"):
        check_overrides({"ouput_dir": "x"}, config)
    with pytest.raises(ValueError, match=r"no key 'splits#consep#vall'.*did you mean --splits#consep#val\?"):
        check_overrides({"splits#consep#vall": []}, config)
    # a new key of a component must be an argument of its target
    check_overrides({"train#trainer#epoch_length": 2, "validate#handlers#0#name": "x"}, config)
    with pytest.raises(ValueError,
                       match=r"no key 'train#trainer#max_epoch'.*did you mean --train#trainer#max_epochs\?"):
        check_overrides({"train#trainer#max_epoch": 2}, config)
    with pytest.raises(ValueError, match=r"did you mean --validate#handlers#0#iteration_log\?"):
        check_overrides({"validate#handlers#0#iteration_logg": False}, config)
    with pytest.raises(ValueError, match=r"no key 'train#handlers#9'"):
        check_overrides({"train#handlers#9#tag_name": "x"}, config)
    with pytest.raises(ValueError, match=r"--epoch: .*--epochs.*; --lerning_rate: .*--learning_rate"):
        check_overrides({"epoch": 1, "lerning_rate": 0.1}, config)


def test_the_workflow_command_refuses_a_typo_before_any_work(tmp_path):
    with pytest.raises(WorkflowError, match="did you mean --output_dir") as err:
        run("training", ouput_dir=str(tmp_path / "x"), bundle_root=str(tmp_path))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written: no demo data, no models


def test_config_errors_are_one_line_naming_the_cause_and_the_key():
    parser = ConfigParser({"path": "/no/such/dataset", "info": "$open(@path + '/dataset.json')",
                           "classes": "$@info.read()"})
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("classes")
    assert one_line(err.value) == ("FileNotFoundError: [Errno 2] No such file or directory: "
                                   "'/no/such/dataset/dataset.json' (config key 'info')")


@pytest.mark.slow
def test_the_command_line_reports_a_missing_dataset_in_one_line_and_the_traceback_on_request(tmp_path):
    cmd = [sys.executable, "-m", "scripts.workflows", "run", "training", "--dataset_dir", str(tmp_path / "none"),
           "--bundle_root", str(tmp_path), "--backbone", "vit-t", "--vit_kwargs", "{'depth': 4}"]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"FileNotFoundError: {tmp_path / 'none' / 'dataset.json'}: dataset description not found" in line
    assert "(config key 'dataset_info')" in line and "Traceback" not in result.stderr
    debug = subprocess.run([*cmd, "--debug", "True"], cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "Failed to evaluate" in debug.stderr


def test_demo_data_is_written_once_where_no_dataset_is_given(tmp_path, caplog):
    path = str(tmp_path / "synthetic")
    with caplog.at_level("WARNING"):
        assert demo_dataset(path, n=4, size=32) == path
    assert "SYNTHETIC" in caplog.text and "--dataset_dir" in caplog.text
    info = (tmp_path / "synthetic" / "dataset.json").stat().st_mtime_ns
    images = sorted(p.name for p in (tmp_path / "synthetic" / "images").iterdir())
    assert len(images) == 4
    demo_dataset(path, n=9, size=32)
    assert (tmp_path / "synthetic" / "dataset.json").stat().st_mtime_ns == info
    assert sorted(p.name for p in (tmp_path / "synthetic" / "images").iterdir()) == images


def test_the_default_dataset_is_the_demo_data_made_on_first_use(tmp_path):
    parser = ConfigParser()
    parser.read_config(config_files("training"))
    parser.update({"bundle_root": str(tmp_path), "demo_data": {"n": 4, "size": 32, "seed": 0}})
    assert parser.get_parsed_content("dataset_dir") == str(tmp_path / "data" / "synthetic")
    assert parser.get_parsed_content("classes")[0] == "background"
    assert len(parser.get_parsed_content("train#data")) == 3  # 70% of 4 tiles


def test_mlflow_params_are_every_setting_the_run_resolved_with_its_overrides():
    parser = ConfigParser({
        "imports": ["$import scripts", "$import scripts.training.tracking"], "_meta_": {"version": "1.2.3"},
        "epochs": 3, "betas": [0.9, 0.99], "unused": 5, "sizes": {"a": 1},
        "net": {"_target_": "torch.nn.Identity"}, "device": "$torch.device('cpu')",
        "params": "$scripts.training.tracking.ConfigParams(@_meta_, __local_refs)",
        "job": {"_target_": "torch.nn.ModuleList", "modules": ["@net"]},
        "use": "$[@epochs, @betas, @sizes, @job, @device, @params]",
    })
    parser.update({"epochs": 7})
    *_, params = parser.get_parsed_content("use")
    got = dict(params)
    assert got["epochs"] == "7" and got["betas"] == "[0.9, 0.99]" and got["sizes"] == "{'a': 1}"
    assert got["bundle_version"] == "1.2.3"
    assert not {"net", "job", "device", "unused", "params", "use", "imports"} & set(got)
    assert isinstance(parser.get_parsed_content("job"), torch.nn.ModuleList)


def test_configs_dir_is_the_bundle_s_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(config_files("training"))
    assert Path(parser.get_parsed_content("mlflow_artifacts")[1]) == CONFIGS_DIR


def test_an_unreadable_checkpoint_stops_the_workflow_with_one_line_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(WorkflowError) as err:
        run("training", bundle_root=str(tmp_path), demo_data={"n": 4, "size": 64, "seed": 0}, checkpoint=str(missing),
            num_workers=0, **TINY)
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and message.startswith("FileNotFoundError")
    # the first key that reads the checkpoint: the image statistics or the network
    assert re.search(r"\(config key '(image_mean|image_std|network)'\)$", message), message
