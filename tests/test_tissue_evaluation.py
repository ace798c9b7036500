"""Tissue accuracy and confusion matrix: the scoring function and the ignite metric against scikit-learn, and the
evaluation workflow's numbers against the tiny network called by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score

from scripts.data.datasets import dataset_list, read_image, read_info
from scripts.nuclei.evaluation import markdown_report, tissue_classification
from scripts.nuclei.ignite_metrics import TissueAccuracy

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
NAMES = ["breast", "colon", "lung", "skin"]


def test_tissue_classification_equals_scikit_learn_and_renders_its_confusion_matrix():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, 200)
    predicted = np.minimum(np.where(rng.random(200) < 0.6, true, rng.integers(0, 4, 200)), 2)  # never 'skin'
    result = tissue_classification([NAMES[t] for t in true], [NAMES[p] for p in predicted], NAMES)
    assert result["n_images"] == 200 and result["classes"] == NAMES
    assert result["accuracy"] == pytest.approx(accuracy_score(true, predicted), abs=1e-12)
    np.testing.assert_array_equal(result["confusion_matrix"], confusion_matrix(true, predicted, labels=[0, 1, 2, 3]))
    recall = recall_score(true, predicted, labels=[0, 1, 2, 3], average=None)
    precision = precision_score(true, predicted, labels=[0, 1, 2, 3], average=None, zero_division=np.nan)
    for i, name in enumerate(NAMES):
        assert result["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert result["per_class"][name]["n_images"] == int((true == i).sum())
    assert result["per_class"]["skin"]["precision"] is None and np.isnan(precision[3])
    assert result["per_class"]["lung"]["precision"] == pytest.approx(precision[2])
    # indices and names are the same labels; without names the classes are the sorted labels found
    assert tissue_classification(true, predicted, NAMES) == result
    assert tissue_classification(["b", "a"], ["a", "a"])["confusion_matrix"] == [[1, 0], [1, 0]]
    summary = {"n_images": 1, "n_images_with_nuclei": 1, "per_class": [], "per_tissue": {},
               "tissue_classification": result}
    text = markdown_report({"summary": summary})
    row = confusion_matrix(true, predicted)[1]
    assert f"| colon | {' | '.join(map(str, row))} | {recall[1]:.4f} |" in text
    assert f"200 images, accuracy {accuracy_score(true, predicted):.4f}" in text
    with pytest.raises(ValueError, match="'bone' is not one of the tissue classes"):
        tissue_classification(["bone"], ["lung"], NAMES)
    with pytest.raises(ValueError, match="2 true and 1 predicted"):
        tissue_classification(["lung", "lung"], ["lung"], NAMES)


def test_tissue_accuracy_metric_takes_the_argmax_and_skips_images_without_a_prediction():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), 30)
    labels = rng.integers(0, 4, 30)
    metric = TissueAccuracy(NAMES)
    metric.reset()
    for start in range(0, 30, 8):
        metric.update([{"pred": {"tissue": torch.as_tensor(p)}, "label": {"tissue_types": torch.tensor(t)}}
                       for p, t in zip(probabilities[start:start + 8], labels[start:start + 8])])
    metric.update([{"pred": {}, "label": {"tissue_types": torch.tensor(0)}}])  # no tissue head
    accuracy = metric.compute()
    assert accuracy == pytest.approx(accuracy_score(labels, probabilities.argmax(1)))
    np.testing.assert_array_equal(metric.summary["confusion_matrix"],
                                  confusion_matrix(labels, probabilities.argmax(1), labels=[0, 1, 2, 3]))
    metric.reset()
    assert np.isnan(metric.compute()) and metric.summary == {}
    with pytest.raises(ValueError, match="for the 4 tissue classes"):
        metric.update([{"pred": {"tissue": np.ones(3) / 3}, "label": {"tissue_types": 1}}])


def test_command_line_scores_the_tissue_csv_of_tile_inference(tmp_path):
    from scripts.evaluate import main

    inst = np.zeros((4, 32, 32), np.int32)
    inst[:, 4:12, 4:12] = 1
    np.savez(tmp_path / "maps.npz", inst_map=inst, type_map=inst, name=np.array(["a", "b", "c", "d"]))
    (tmp_path / "gt.csv").write_text("name,tissue\na,colon\nb,colon\nc,lung\nd,skin\n")
    (tmp_path / "tissue.csv").write_text("name,tissue,p_colon,p_lung,p_skin\nd,skin,0.1,0.2,0.7\n"
                                         "c,colon,0.5,0.3,0.2\nb,colon,0.9,0.05,0.05\na,lung,0.2,0.6,0.2\n")
    main(str(tmp_path / "maps.npz"), str(tmp_path / "maps.npz"), str(tmp_path / "eval"), num_classes=2,
         tissues=str(tmp_path / "gt.csv"), pred_tissues=str(tmp_path / "tissue.csv"))
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]["tissue_classification"]
    true, predicted = ["colon", "colon", "lung", "skin"], ["lung", "colon", "colon", "skin"]
    assert result["accuracy"] == pytest.approx(accuracy_score(true, predicted)) == 0.5
    assert result["confusion_matrix"] == confusion_matrix(true, predicted, labels=["colon", "lung", "skin"]).tolist()
    with pytest.raises(ValueError, match="needs the ground-truth tissues"):
        main(str(tmp_path / "maps.npz"), str(tmp_path / "maps.npz"), str(tmp_path / "eval"), num_classes=2,
             pred_tissues=str(tmp_path / "tissue.csv"))


@pytest.mark.slow
def test_evaluation_workflow_scores_the_tissue_head_as_the_network_predicts_by_hand(tmp_path):
    data = tmp_path / "synthetic"
    subprocess.run([sys.executable, "-m", "scripts.data.prepare", "synthetic", "--out", str(data), "--n", "16",
                    "--size", "64"], cwd=BUNDLE, check=True, capture_output=True, timeout=300)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.yaml", "evaluate.yaml")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data), "backbone": "vit-t",
                   "vit_kwargs": {"depth": 4}, "patch_size": 64, "num_workers": 0, "amp": False,
                   "official_normalization": True, "eval_split": "train"})
    torch.manual_seed(1)
    network = parser.get_parsed_content("network_def").eval()
    head = [m for m in network.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2][-1]
    samples = dataset_list(data, parser.get_parsed_content("split")["train"])
    x = torch.as_tensor(np.stack([read_image(s["image"]) for s in samples]).transpose(0, 3, 1, 2) / 255.0,
                        dtype=torch.float32) * 2 - 1
    with torch.no_grad():  # centre and spread the random head so that both tissues are predicted
        logits = network(x)["tissue_types"]
        head.weight *= 20
        head.bias.copy_(20 * (head.bias - logits.median(0).values))
        predicted = network(x)["tissue_types"].argmax(1).numpy()
    (tmp_path / "models").mkdir()
    torch.save(network.state_dict(), tmp_path / "models" / "model.pt")
    true = np.array([s["tissue"] for s in samples])
    assert len(set(predicted)) == 2 and len(samples) >= 8
    parser.get_parsed_content("evaluator").run()
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]["tissue_classification"]
    assert result["classes"] == read_info(data).tissues and result["n_images"] == len(samples)
    assert result["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    np.testing.assert_array_equal(result["confusion_matrix"], confusion_matrix(true, predicted, labels=[0, 1]))
    assert "## Tissue classification" in (tmp_path / "eval" / "metrics.md").read_text()
