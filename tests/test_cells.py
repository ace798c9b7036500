"""Cell classifiers on frozen embeddings: pooling, label readers and point matching, classifier, workflows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.cells.apply import NucleiClassifier
from scripts.cells.classifier import classification_metrics, load_classifier, predict, save_classifier, train_classifier
from scripts.cells.embeddings import CellEmbedder, CellEmbeddings, pool_cells
from scripts.cells.labels import ClassTable, PointLabels, match_points, read_point_csv, read_qupath_geojson
from scripts.cells.workflow import dataset_items, run_classifying, run_embedding, run_training
from scripts.data.datasets import DatasetWriter, image_digest, image_digests, instance_types, read_image, write_png
from scripts.model.network import CellViT

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


def test_pool_cells_equals_mean_of_repeated_map():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(7, 4, 4, generator=g)
    inst = torch.zeros(64, 64, dtype=torch.long)
    inst[3:20, 5:30] = 4          # spans several 16x16 cells unevenly
    inst[40:41, 60:62] = 9        # two pixels in one cell
    inst[30:50, 10:12] = 2
    ids = torch.tensor([9, 2, 4])
    got = pool_cells(features, inst, ids)
    up = features.repeat_interleave(16, 1).repeat_interleave(16, 2)
    for row, k in enumerate(ids):
        np.testing.assert_allclose(got[row], up[:, inst == k].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], features[:, 2, 3], rtol=1e-6)
    with pytest.raises(ValueError, match="not in the instance map"):
        pool_cells(features, inst, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="integer fraction"):
        pool_cells(torch.randn(7, 5, 4), inst, ids)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return CellViT("vit-t", num_nuclei_classes=5, num_tissue_classes=0, vit_kwargs={"depth": 4}).eval()


@pytest.mark.slow
def test_embeddings_equal_direct_computation(consep, tiny_net):
    """A real CoNSeP crop: ``vit`` = timm's own forward_features tokens pooled by hand; ``decoder`` through the
    type branch's last 1x1 convolution = the network's type logits averaged over the nucleus (it is linear)."""
    image, inst = consep["images"][5][:96, :80], consep["inst_map"][5][:96, :80]
    vit = CellEmbedder(tiny_net, "vit")
    dec = CellEmbedder(tiny_net, "decoder")
    features, out = vit.maps(image)   # one forward feeds both hooks
    e_vit = vit.pool(features, out, inst, "crop", image.shape[:2])
    e_dec = dec.pool(dec.features(96, 80), out, inst, "crop", image.shape[:2])
    ids = np.unique(inst)[1:]
    np.testing.assert_array_equal(e_vit.ids, ids)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(tiny_net.mean).view(1, 3, 1, 1)
         ) / torch.tensor(tiny_net.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = tiny_net.encoder.vit.forward_features(x)[:, tiny_net.encoder.vit.num_prefix_tokens:]
        logits = tiny_net(x)["nuclei_type_map"][0]
    grid = tokens[0].T.reshape(-1, 6, 5).repeat_interleave(16, 1).repeat_interleave(16, 2)
    last = tiny_net.decoder.branches["nuclei_type_map"].decoder0_header[-1]
    for row in (0, len(ids) // 2, len(ids) - 1):
        mask = torch.from_numpy(inst == ids[row])
        np.testing.assert_allclose(e_vit.embeddings[row], grid[:, mask].mean(1), rtol=1e-4, atol=1e-4)
        via_conv = last(torch.from_numpy(e_dec.embeddings[row]).view(1, -1, 1, 1)).flatten()
        np.testing.assert_allclose(via_conv.detach(), logits[:, mask].mean(1), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(e_dec.centroids[row], [np.nonzero(mask.numpy())[1].mean(),
                                                          np.nonzero(mask.numpy())[0].mean()], atol=1e-3)
    np.testing.assert_allclose(e_vit.head_probs.sum(1), 1.0, atol=1e-5)
    encoder_only = CellEmbedder(tiny_net, "vit", type_head=False)(image, inst)
    np.testing.assert_allclose(encoder_only.embeddings, e_vit.embeddings, atol=1e-6)
    assert encoder_only.head_probs.shape == (len(ids), 0)
    assert e_vit.fingerprint == e_dec.fingerprint and len(e_vit.fingerprint) == 16


def test_embedder_removes_its_hook_on_close(consep, tiny_net, tmp_path):
    """Each embedder hooks one module of the network; closing it (or leaving its ``with`` block, as
    ``run_embedding`` does) removes exactly that hook, and a closed embedder refuses to read features."""
    vit_block = tiny_net.encoder.vit.blocks[-1]
    dec_conv = tiny_net.decoder.branches["nuclei_type_map"].decoder0_header[-2]
    hooks = (len(vit_block._forward_hooks), len(dec_conv._forward_hooks))
    image, inst = consep["images"][3][:64, :48], consep["inst_map"][3][:64, :48]
    with CellEmbedder(tiny_net, "vit", type_head=False) as vit, CellEmbedder(tiny_net, "decoder") as dec:
        assert (len(vit_block._forward_hooks), len(dec_conv._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
        e_vit = vit(image, inst)
        e_dec = dec(image, inst)
    assert (len(vit_block._forward_hooks), len(dec_conv._forward_hooks)) == hooks
    assert e_vit.embeddings.shape == (len(np.unique(inst)) - 1, tiny_net.encoder.vit.embed_dim)
    assert e_dec.embeddings.shape == (len(e_vit.ids), 64)
    with pytest.raises(RuntimeError, match="closed"):
        vit.features(64, 48)
    dec.close()   # idempotent
    assert len(dec_conv._forward_hooks) == hooks[1]
    with CellEmbedder(tiny_net, "decoder") as again:   # a fresh embedder on the same network sees the same map
        np.testing.assert_allclose(again(image, inst).embeddings, e_dec.embeddings, atol=1e-6)
    root = tmp_path / "data"
    with DatasetWriter(root, "consep", CONSEP_CLASSES, ["colon"], 40) as w:
        w.add("p3", image, inst, consep["type_map"][3][:64, :48], "train")
    assert len(run_embedding(tiny_net, dataset_items(str(root)), str(tmp_path / "emb"), "decoder")) == 1
    assert len(dec_conv._forward_hooks) == hooks[1]


def _points(xy, labels, source="pts.csv"):
    return PointLabels(np.asarray(xy, float), list(labels), source)


def test_match_points_radius_ties_and_reports():
    centroids = np.array([[10.0, 10.0], [20.0, 10.0], [50.0, 50.0]])
    pts = _points([[15.0, 10.0],   # equidistant to 0 and 1: goes to 0 (lower row)
                   [21.0, 10.0],   # 1 at distance 1
                   [50.0, 53.0],   # 2 at distance 3 = radius: matched (inclusive)
                   [50.0, 50.5],   # 2 at 0.5: nearer, takes 2 from the previous point
                   [90.0, 90.0]],  # nothing within 3
                  ["a", "b", "c", "d", "e"])
    m = match_points(pts, centroids, 3.0, image_size=(100, 100))
    got = dict(zip(m.point.tolist(), m.cell.tolist()))
    assert got == {1: 1, 3: 2}  # point 0 (tie -> cell 0) is farther than 3 px from any centroid
    reasons = {u["point"]: u["reason"] for u in m.unmatched}
    assert set(reasons) == {0, 2, 4}
    assert "already matched" in reasons[2] and "within 3" in reasons[4]
    m5 = match_points(pts, centroids, 5.0)
    assert dict(zip(m5.point.tolist(), m5.cell.tolist()))[0] == 0
    assert m5.labels == ["a", "b", "d"]
    with pytest.raises(ValueError, match=r"pts.csv: 1 point\(s\) outside the 80x60 image, first at x=90, y=90"):
        match_points(pts, centroids, 3.0, image_size=(60, 80))


def test_point_csv_and_geojson_readers(tmp_path):
    csv_path = tmp_path / "img.csv"
    csv_path.write_text("X,Y,Label\n1.5,2,tumour\n10,20.25,immune\n")
    p = read_point_csv(csv_path, scale=4.0)
    np.testing.assert_allclose(p.xy, [[6, 8], [40, 81]])
    assert p.labels == ["tumour", "immune"]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty point file"):
        read_point_csv(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("x,y,label\n1,two,a\n")
    with pytest.raises(ValueError, match="bad.csv: line 2"):
        read_point_csv(tmp_path / "bad.csv")
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 2], [0, 2], [0, 0]]]},
         "properties": {"objectType": "detection", "classification": {"name": "tumour", "color": [255, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[5, 6], [7, 8]]},
         "properties": {"classification": {"name": "immune"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
    ]}
    (tmp_path / "img.geojson").write_text(json.dumps(geo))
    g = read_qupath_geojson(tmp_path / "img.geojson")
    np.testing.assert_allclose(g.xy, [[2, 1], [5, 6], [7, 8]])
    assert g.labels == ["tumour", "immune", "immune"] and g.skipped == 1
    table = ClassTable(["tumour", "immune"], [(255, 0, 0), (0, 0, 255)])
    np.testing.assert_array_equal(table.encode(g.labels, "img.geojson"), [0, 1, 1])
    with pytest.raises(ValueError, match=r"img.csv: unknown class\(es\) \['stroma'\]"):
        table.encode(["tumour", "stroma"], "img.csv")


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 3, 300), rng.integers(0, 4, 300)   # class 3 predicted but never true
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]).tolist()
    assert m["per_class"]["d"]["support"] == 0 and m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))


def test_classifier_separable_save_load(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 32))
    y = rng.integers(0, 4, 1000)
    x = centres[y] + rng.normal(0, 1, (1000, 32))
    names = ["a", "b", "c", "d"]
    for hidden in (0, 32):
        r = train_classifier(x, y, names, hidden=hidden, dropout=0.1, epochs=15, lr=1e-2, patience=5, seed=1)
        assert r.metrics["macro_f1"] > 0.98 and r.metrics["balanced_accuracy"] > 0.98
    table = ClassTable(names, [(1, 2, 3)] * 4)
    path = save_classifier(tmp_path / "classifier.pt", r.model, table, "vit", "abc")
    model, t2, meta = load_classifier(path, "vit", "abc")
    np.testing.assert_allclose(predict(model, x[:50]), predict(r.model, x[:50]), atol=1e-6)
    assert t2.names == names and meta["hidden"] == 32
    with pytest.raises(ValueError, match="classifier.pt: trained on the embeddings of another model"):
        load_classifier(path, "vit", "other")
    with pytest.raises(ValueError, match="classifier.pt: trained on 'vit' embeddings"):
        load_classifier(path, "decoder", "abc")


@pytest.mark.slow
def test_workflow_dataset_and_points(consep, tiny_net, tmp_path):
    """Real CoNSeP crops -> cached embeddings -> classifier with new names from type maps and from points ->
    re-typed nuclei carrying the new names and colours."""
    root = tmp_path / "data"
    with DatasetWriter(root, "consep", CONSEP_CLASSES, ["colon"], 40) as w:
        for i in (0, 40, 80, 120):
            w.add(f"p{i}", consep["images"][i][:128, :128], consep["inst_map"][i][:128, :128],
                  consep["type_map"][i][:128, :128], "train")
    emb_dir = tmp_path / "emb"
    paths = run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")
    assert len(paths) == 4
    before = paths[0].stat().st_mtime_ns
    run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")   # cached: not rewritten
    assert paths[0].stat().st_mtime_ns == before
    # the cache follows the pixels: an image saved again unchanged keeps it, a changed one is embedded again
    original = CellEmbeddings.load(paths[0])
    image = read_image(root / "images" / "p0.png")
    assert original.image_digest == image_digest(image) == image_digest(consep["images"][0][:128, :128])
    write_png(root / "images" / "p0.png", image)
    run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")
    assert paths[0].stat().st_mtime_ns == before
    write_png(root / "images" / "p0.png", image // 2)  # re-normalised under the same name
    run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")
    changed = CellEmbeddings.load(paths[0])
    assert changed.image_digest == image_digest(image // 2) != original.image_digest
    assert np.array_equal(changed.ids, original.ids) and not np.allclose(changed.embeddings, original.embeddings)
    write_png(root / "images" / "p0.png", image)
    run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")
    np.testing.assert_allclose(CellEmbeddings.load(paths[0]).embeddings, original.embeddings, atol=1e-5)
    classes = [{"name": "immune", "colour": [200, 0, 0]}, {"name": "tissue", "colour": [0, 150, 0]}]
    class_map = {"inflammatory": "immune", "epithelial": "tissue", "spindle-shaped": "tissue", "other": "tissue"}
    out = tmp_path / "models"
    summary = run_training(str(emb_dir), classes, str(out), "dataset", str(root), CONSEP_CLASSES, class_map,
                           hidden=0, epochs=20, patience=5)
    n_cells = sum(len(instance_types(consep["inst_map"][i][:128, :128], consep["type_map"][i][:128, :128], 5)[0])
                  for i in (0, 40, 80, 120))
    assert sum(r["labelled"] for r in summary["labels"].values()) == n_cells
    assert summary["train_cells"] + summary["metrics"]["n"] == n_cells and len(summary["val_images"]) == 1
    assert summary["cpu_s"] > 0 and "gpu_energy_j" in summary
    for name in ("classifier.pt", "classifier_metrics.json", "classifier_metrics.md", "classifier_confusion.png"):
        assert (out / name).stat().st_size > 0
    written = run_classifying(str(emb_dir), str(out / "classifier.pt"), str(tmp_path / "cells"))
    geo = json.loads((tmp_path / "cells" / "p0_cells.geojson").read_text())
    cached = CellEmbeddings.load(emb_dir / "p0.npz")
    assert len(geo["features"]) == len(cached.ids) and len(written) == 8
    assert {f["properties"]["classification"]["name"] for f in geo["features"]} <= {"immune", "tissue"}
    assert all(f["properties"]["classification"]["color"] in ([200, 0, 0], [0, 150, 0]) for f in geo["features"])

    # points: one per nucleus of two images at its centroid + 1 px, one stray point per image
    labels = tmp_path / "points"
    labels.mkdir()
    for name in ("p0", "p40"):
        c = CellEmbeddings.load(emb_dir / f"{name}.npz")
        rows = ["x,y,label"] + [f"{x + 1},{y},{'immune' if k % 2 else 'tissue'}"
                                for k, (x, y) in enumerate(c.centroids)]
        (labels / f"{name}.csv").write_text("\n".join(rows + ["127,0,immune"]) + "\n")
    summary = run_training(str(emb_dir), classes, str(tmp_path / "m2"), "points", str(labels), hidden=0, epochs=5,
                           match_radius_um=0.5, mpp=0.25)
    rep = summary["labels"]["p0"]
    assert rep["points"] == len(cached.ids) + 1 and rep["labelled"] + len(rep["unmatched"]) == rep["points"]
    assert rep["labelled"] >= len(cached.ids) - 2 and summary["labels"]["p80"]["labelled"] == 0

    # bad input: unknown class, classifier of another model's embeddings
    (labels / "p80.csv").write_text("x,y,label\n5,5,necrosis\n")
    with pytest.raises(RuntimeError, match=r"p80.csv: unknown class\(es\) \['necrosis'\]"):
        run_training(str(emb_dir), classes, str(tmp_path / "m3"), "points", str(labels), mpp=0.25)
    c = CellEmbeddings.load(emb_dir / "p0.npz")
    c.fingerprint = "0" * 16
    c.save(emb_dir / "p0.npz")
    with pytest.raises(RuntimeError, match="classifier.pt: trained on the embeddings of another model"):
        run_classifying(str(emb_dir), str(out / "classifier.pt"), str(tmp_path / "cells2"))


def test_the_test_split_never_trains_and_validation_holds_out_whole_tiles(consep, tiny_net, tmp_path):
    """Embedding every split of a dataset (the default) must not let the test images train the classifier, and
    patches cut from one tile (one ``group``) are held out together, so validation never sees a training tile."""
    root = tmp_path / "data"
    layout = {"a0": ("train", "tile_a"), "a1": ("train", "tile_a"), "b0": ("train", "tile_b"),
              "b1": ("train", "tile_b"), "c0": ("val", "tile_c"), "t0": ("test", "tile_t")}
    with DatasetWriter(root, "consep", CONSEP_CLASSES, ["colon"], 40) as w:
        for k, (name, (split, group)) in enumerate(layout.items()):
            i = 7 * k  # crops that all hold nuclei
            w.add(name, consep["images"][i][:96, :96], consep["inst_map"][i][:96, :96],
                  consep["type_map"][i][:96, :96], split, group=group)
    emb_dir = tmp_path / "emb"
    run_embedding(tiny_net, dataset_items(str(root)), str(emb_dir), "decoder")
    classes = [{"name": n, "colour": [9 * k, 0, 0]} for k, n in enumerate(CONSEP_CLASSES[1:])]
    nuclei = {name: len(instance_types(consep["inst_map"][7 * k][:96, :96], consep["type_map"][7 * k][:96, :96],
                                       5)[0]) for k, name in enumerate(layout)}
    assert min(nuclei.values()) > 0
    held = set()
    for seed in range(4):
        summary = run_training(str(emb_dir), classes, str(tmp_path / f"m{seed}"), "dataset", str(root),
                               CONSEP_CLASSES, hidden=0, epochs=2, val_fraction=0.34, seed=seed,
                               held_out_splits=["test"])
        val = summary["val_images"]
        assert val in (["a0", "a1"], ["b0", "b1"], ["c0"]) and summary["held_out_splits"] == ["test"]
        assert summary["train_cells"] + summary["metrics"]["n"] == sum(nuclei.values()) - nuclei["t0"]
        held.add(tuple(val))
    assert len(held) > 1  # the seed chooses which tile
    # the classifier records the images it has seen by their pixels: scored on the test image it passes, on its
    # own images it is refused, under any name; another image under a training image's name passes
    classifier = tmp_path / "m0" / "classifier.pt"
    digests = image_digests(dataset_items(str(root)))
    assert load_classifier(classifier)[2]["images"] == {n: digests[n] for n in ("a0", "a1", "b0", "b1", "c0")}
    NucleiClassifier(classifier, evaluated={"t0": digests["t0"]})
    with pytest.raises(ValueError, match=r"classifier.pt: trained on 2 of the 3 evaluated images \(a1, c0\)"):
        NucleiClassifier(classifier, evaluated={n: digests[n] for n in ("a1", "c0", "t0")})
    with pytest.raises(ValueError, match=r"trained on 1 of the 1 evaluated images \(renamed\)"):
        NucleiClassifier(classifier, evaluated={"renamed": digests["b0"]})
    NucleiClassifier(classifier, evaluated={"a1": digests["t0"]})
    # without the pixels (the evaluation command line), images are identified by name
    with pytest.raises(ValueError, match=r"trained on 1 of the 2 evaluated images \(a1\)"):
        NucleiClassifier(classifier, evaluated={"a1": None, "t0": None})


def test_cells_config_resolves(monkeypatch, tmp_path):
    """configs/classifier.yaml merged over common.yaml: its keys resolve and its workflows name real functions."""
    from monai.bundle import ConfigParser

    from scripts.cells import workflow
    from scripts.cells.embeddings import SOURCES

    monkeypatch.chdir(Path(__file__).resolve().parents[1] / "bundles" / "cellvta")
    parser = ConfigParser()
    parser.read_config(["configs/common.yaml", "configs/classifier.yaml"])
    parser["bundle_root"] = str(tmp_path)
    assert parser.get_parsed_content("classifier_path") == str(tmp_path / "models" / "classifier.pt")
    assert parser.get_parsed_content("embedding_source") in SOURCES
    assert parser.get_parsed_content("cells") is workflow
    assert len(ClassTable.from_config(parser.get_parsed_content("classifier_classes")).names) >= 2
    for key, function in (("embedding", "run_embedding"), ("training_classifier", "run_training"),
                          ("classifying", "run_classifying")):
        assert f"@cells.{function}(" in parser.get(key)[0] and callable(getattr(workflow, function))
    assert parser.get("run") == "@training_classifier"
