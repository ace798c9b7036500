"""The bundle's workflows run through `python -m monai.bundle run`: train, resume, evaluate, infer."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from scripts.data.datasets import dataset_list

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
TINY = ["--backbone", "vit-t", "--vit_kwargs", "{'depth': 4}", "--patch_size", "64", "--num_workers", "0"]


def config_arg(config: str | list[str]) -> str:
    """``--config_file`` of one config or of a list merged in order (``"['configs/a.yaml','configs/b.yaml']"``)."""
    return f"configs/{config}" if isinstance(config, str) else str([f"configs/{c}" for c in config])


EVALUATE = ["train.yaml", "evaluate.yaml"]
INFERENCE = ["common.yaml", "inference.yaml"]
WHOLE_SLIDE = ["common.yaml", "wsi_inference.yaml"]


def bundle_run(workflow: str, config: str | list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", config_arg(config), *TINY, *args]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synthetic"
    subprocess.run([sys.executable, "-m", "scripts.data.prepare", "synthetic", "--out", str(out), "--n", "20",
                    "--size", "64"],
                   cwd=BUNDLE, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def training_run(synthetic, tmp_path_factory) -> tuple[Path, str]:
    """One epoch of training with MLflow tracking: the bundle root and the workflow's log."""
    root = tmp_path_factory.mktemp("run")
    result = bundle_run("training", "train.yaml", "--dataset_dir", str(synthetic), "--bundle_root", str(root),
                        "--epochs", "1", "--batch_size", "4", "--progress_bar", "False", "--use_mlflow", "True")
    return root, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(training_run) -> Path:
    return training_run[0]


@pytest.mark.slow
def test_mlflow_run_holds_the_evaluator_metrics_params_and_checkpoint(training_run):
    from mlflow.tracking import MlflowClient

    root, log = training_run
    best = float(re.search(r"Got new best metric of val_bpq: ([0-9.eE+-]+)", log).group(1))
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cellvta").experiment_id])
    assert run.data.metrics["val_bpq"] == best
    assert {"train_loss", "train_hv_msge", "train_np_dice", "val_mpq"} <= set(run.data.metrics)
    assert run.data.params["backbone"] == "vit-t" and run.data.params["epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "train.yaml", "common.yaml"} <= artifacts


@pytest.mark.slow
def test_training_writes_the_best_and_the_last_checkpoint(trained):
    models = trained / "models"
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert "decoder.branches.hv_map.decoder0_header.2.weight" in best
    last = list(models.glob("checkpoint_epoch=*.pt"))
    assert [p.name for p in last] == ["checkpoint_epoch=1.pt"]
    state = torch.load(last[0], map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] > 0  # one whole epoch
    assert state["optimizer"]["state"] and state["lr_scheduler"]["last_epoch"] == 1


@pytest.mark.slow
def test_training_resumes_from_the_saved_epoch(trained, synthetic):
    before = torch.load(trained / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    result = bundle_run("run", "train.yaml", "--dataset_dir", str(synthetic), "--bundle_root", str(trained),
                        "--epochs", "2", "--batch_size", "4", "--resume", "True", "--progress_bar", "False")
    per_epoch = before["trainer"]["epoch_length"]
    log = result.stderr + result.stdout
    assert "Restored all variables from" in log and "checkpoint_epoch=1.pt" in log
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in log
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in log  # epoch 1 is not trained again
    after = torch.load(trained / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert after["trainer"]["iteration"] == 2 * per_epoch and after["lr_scheduler"]["last_epoch"] == 2
    step = next(iter(after["optimizer"]["state"].values()))["step"]
    assert float(step) == 2 * float(next(iter(before["optimizer"]["state"].values()))["step"])


@pytest.mark.slow
def test_a_resumed_run_trains_as_the_uninterrupted_run(trained, synthetic, tmp_path):
    """After the test above: two epochs in one run give the weights of one epoch plus a resumed second one (the
    second epoch draws its own samples and augmentations, not those of the first again)."""
    bundle_run("run", "train.yaml", "--dataset_dir", str(synthetic), "--bundle_root", str(tmp_path),
               "--epochs", "2", "--batch_size", "4", "--progress_bar", "False")
    resumed = torch.load(trained / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    whole = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert resumed["model"].keys() == whole["model"].keys()
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_evaluation_and_inference_write_their_outputs(trained, synthetic):
    bundle_run("evaluating", EVALUATE, "--dataset_dir", str(synthetic), "--bundle_root", str(trained))
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    # the saved maps are the test split's labels and predictions, and the summary is their per-image PQ mean
    from scripts.data.datasets import read_info, read_label
    from scripts.nuclei.metrics import panoptic_quality, typed_prediction

    samples = dataset_list(synthetic, "test")
    num_classes = len(read_info(synthetic).classes)
    assert metrics["summary"]["n_images"] == len(samples) > 0
    per_image = []
    for sample in samples:
        saved = np.load(trained / "eval" / "predictions" / f"{sample['name']}.npz")
        np.testing.assert_array_equal(saved["gt_inst_map"].squeeze(), read_label(sample["inst_map"], "inst_map"))
        typed = typed_prediction(saved["inst_map"].squeeze(), saved["type_map"].squeeze(), num_classes)
        per_image.append(panoptic_quality(saved["gt_inst_map"].squeeze(), typed)[2])
    assert metrics["summary"]["bpq"] == pytest.approx(float(np.nanmean(per_image)), abs=1e-12)
    images = sorted(str(p) for p in (synthetic / "images").glob("*.png"))[:3]
    bundle_run("inferring", INFERENCE, "--dataset_dir", str(synthetic), "--bundle_root", str(trained),
               "--input_images", json.dumps(images))
    out = trained / "inference"
    for image in images:
        stem = Path(image).stem
        maps = np.load(out / f"{stem}.npz")
        assert maps["inst_map"].shape == (64, 64)
        geo = json.loads((out / f"{stem}.geojson").read_text())
        assert geo["type"] == "FeatureCollection"
        assert len(geo["features"]) <= int(maps["inst_map"].max())
        assert (out / f"{stem}_overlay.png").stat().st_size > 0


def test_metadata_passes_the_bundle_schema_offline():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
         "--filepath", "configs/meta_schema_20240725.json"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_on_gloo_train_on_different_data_and_write_one_checkpoint(synthetic, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
           "training", "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']", *TINY,
           "--dataset_dir", str(synthetic), "--bundle_root", str(tmp_path), "--epochs", "1", "--batch_size", "2",
           "--progress_bar", "False"]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    losses = re.findall(r"Epoch: 1/1, Iter: 1/\d+ -- train_loss: ([0-9.]+)", log)
    assert len(losses) == 2 and losses[0] != losses[1]  # each rank logs its own first batch
    # each rank draws half of the training set: its epoch is half as long as a single process's
    n_train = len(dataset_list(synthetic, "train"))
    per_rank = math.ceil(math.ceil(n_train / 2) / 2)
    assert set(re.findall(r"Epoch: 1/1, Iter: \d+/(\d+)", log)) == {str(per_rank)}
    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


@pytest.mark.slow
def test_torchscript_export_equals_the_eager_network_and_outputs_match_the_metadata(trained, synthetic, monkeypatch):
    from scripts.model.export import compare_torchscript, verify_net_io

    ts_file = trained / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_file),
           "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", "configs/metadata.json",
           "--config_file", config_arg(INFERENCE), "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]",
           "--converter_kwargs", "{'strict': False}", *TINY, "--bundle_root", str(trained)]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    monkeypatch.chdir(BUNDLE)
    overrides = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "bundle_root": str(trained)}
    inference = [f"configs/{c}" for c in INFERENCE]
    diffs = compare_torchscript(str(ts_file), inference, str(trained / "models" / "model.pt"), n=4,
                                **overrides)
    assert set(diffs) == {"nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types"}
    assert max(diffs.values()) <= 1e-4
    outputs = "_meta_#network_data_format#outputs"
    table = json.loads((trained / "models" / "dataset.json").read_text())
    classes, tissues = len(table["classes"]), len(table["tissues"])
    with pytest.raises(ValueError, match="nuclei_type_map' has shape"):
        verify_net_io(inference, n=4, **overrides)
    verify_net_io(inference, n=4, **overrides, **{
        f"{outputs}#nuclei_type_map#num_channels": classes, f"{outputs}#tissue_types#num_channels": tissues})


def test_whole_slide_workflow_writes_geojson_csv_embeddings_and_overlay(trained, synthetic, tmp_path):
    from scripts.slides.pyramid import write_pyramidal_tiff

    tiles = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
             for p in sorted((synthetic / "images").glob("*.png"))[:9]]
    slide = tmp_path / "synthetic_slide.tif"
    write_pyramidal_tiff(slide, np.vstack([np.hstack(tiles[i : i + 3]) for i in (0, 3, 6)]), mpp=0.25, min_size=10_000)
    out = tmp_path / "wsi"
    bundle_run("inferring", WHOLE_SLIDE, "--bundle_root", str(trained), "--input", str(slide),
               "--output_dir", str(out), "--tile_size", "64", "--overlap", "16", "--postprocess_workers", "1",
               "--min_tissue_fraction", "0", "--embeddings", "True")
    summary = json.loads((out / "synthetic_slide.tif.json").read_text())
    assert summary["tiles"] == 16 and summary["width"] == summary["height"] == 192
    features = json.loads((out / "synthetic_slide.tif.geojson").read_text())["features"]
    rows = (out / "synthetic_slide.tif.csv").read_text().splitlines()
    assert len(features) == len(rows) - 1 == summary["cells"]
    embeddings = np.load(out / "synthetic_slide.tif_embeddings.npy")
    ids = np.load(out / "synthetic_slide.tif_embedding_ids.npy")
    assert embeddings.shape == (summary["cells"], 64) and ids.tolist() == list(range(1, summary["cells"] + 1))
    assert np.isfinite(embeddings).all() and summary["embedding_source"] == "decoder"  # the type branch's map
    tissue = summary["tissue"]  # the network's tissue head, one map pixel per tile
    assert tissue["tiles"] == 16 and sum(tissue["fractions"].values()) == pytest.approx(1.0)
    assert cv2.imread(str(out / "synthetic_slide.tif_tissue.png")).shape == (4, 4, 3)
    assert cv2.imread(str(out / "synthetic_slide.tif_overlay.png")).shape == (192, 192, 3)
    # a cell classifier of another model's embeddings is refused before any slide is read, naming the file
    from scripts.cells.classifier import CellClassifier, save_classifier
    from scripts.cells.labels import ClassTable

    other = save_classifier(tmp_path / "other.pt", CellClassifier(64, 2),
                            ClassTable(["a", "b"], [(1, 2, 3), (4, 5, 6)]),
                            "decoder", "0123456789abcdef")
    refused = bundle_run("inferring", WHOLE_SLIDE, "--bundle_root", str(trained), "--input", str(slide),
                         "--output_dir", str(tmp_path / "refused"), "--classifier", str(other), check=False)
    assert refused.returncode != 0 and "other.pt: trained on the embeddings of another model" in refused.stderr
    assert not (tmp_path / "refused").exists()


def official_name(key: str) -> str:
    """The official CellVTA name of one of our network's keys (``scripts.model.convert`` maps it back)."""
    if key.startswith("encoder.vit."):
        return "encoder." + key[len("encoder.vit."):]
    if key.startswith("decoder.branches."):
        branch, rest = key[len("decoder.branches."):].split(".", 1)
        official = {"nuclei_binary_map": "nuclei_binary_map_decoder", "hv_map": "hv_map_decoder",
                    "nuclei_type_map": "nuclei_type_maps_decoder"}[branch]
        return f"{official}.{rest}"
    return key[len("decoder."):] if key.startswith("decoder.") else key


@pytest.mark.slow
def test_an_official_checkpoint_through_the_inference_workflow_sets_the_switches_its_weights_need(trained, synthetic,
                                                                                                   tmp_path):
    from scripts.model.convert import convert_official_key

    # the trained weights saved as the official trainer saves them
    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    official = {official_name(k): v for k, v in state.items()}
    assert {convert_official_key(k) for k in official} == set(state)
    official_ckpt = tmp_path / "official.pth"
    torch.save({"arch": "CellViTUNIAdapter", "model_state_dict": official, "config": {"model.backbone": "vit-t"}},
               official_ckpt)
    images = sorted(str(p) for p in (synthetic / "images").glob("*.png"))[:2]

    def infer(out: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return bundle_run("inferring", INFERENCE, "--bundle_root", str(trained), "--input_images", json.dumps(images),
                          "--output_dir", str(tmp_path / out), *args, check=check)

    result = infer("official", "--checkpoint", str(official_ckpt))
    log = result.stdout + result.stderr
    assert log.count("official CellVTA checkpoint; set cls_through_blocks=False, official_normalization=True") == 1
    # the same weights in the bundle's format with the switches set by hand: the same nuclei
    infer("by_hand", "--checkpoint", str(trained / "models" / "model.pt"), "--network_def#cls_through_blocks", "False",
          "--official_normalization", "True")
    # and without them: the fixed class token and the backbone's statistics change the maps
    infer("unswitched", "--checkpoint", str(trained / "models" / "model.pt"))
    changed = 0
    for image in images:
        stem = Path(image).stem
        auto, by_hand, unswitched = (np.load(tmp_path / d / f"{stem}.npz")
                                     for d in ("official", "by_hand", "unswitched"))
        for key in ("inst_map", "type_map"):
            np.testing.assert_array_equal(auto[key], by_hand[key])
        changed += int(not np.array_equal(auto["inst_map"], unswitched["inst_map"]))
        assert (tmp_path / "official" / f"{stem}.geojson").read_text() == \
               (tmp_path / "by_hand" / f"{stem}.geojson").read_text()
    assert changed > 0
    refused = infer("refused", "--checkpoint", str(official_ckpt), "--official_normalization", "False", check=False)
    assert refused.returncode != 0
    assert "official CellVTA weights need official_normalization=True" in refused.stderr
