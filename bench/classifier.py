"""Cell classifiers on frozen embeddings against the network's own type branch and a pixel-feature baseline.

Data: the real CoNSeP Train patches of ``../shared/data`` (4 classes: other, inflammatory, epithelial,
spindle-shaped), split by source tile. Every classifier is scored on the validation tiles' ground-truth nuclei.

Network (stated in the result's ``network`` and ``mode``):

* ``--network <model>.pt``: a segmentation network trained on these patches, as kept by ``bench/encoders.py``
  (``outputs/bench/encoders/cellvta_vit_s.pt``: CellVTA ViT-S/16 trained for a fixed CPU budget on the train
  tiles; the file names its validation images). The heads train on the nuclei of the network's training images
  only and are scored on its validation images, so nothing is scored on an image the network was trained on.
* without it (the fallback): a **randomly initialised** bundle network (``network``/``backbone`` of
  ``configs/classifier_bench.yaml``, seeded) and the same split by tile (``split_seed``, ``val_tile_fraction``,
  the split ``bench/encoders.py`` uses). Its embeddings are random features and its type branch is chance.

Every patch runs once through the whole network; both sources are read from that one forward: ``vit`` (the
ViT's last-block tokens pooled over each nucleus) and ``decoder`` (the type branch's last feature map averaged
over it). The peer that runs here is the same head on 18 hand-crafted nucleus features (shape, RGB and HED colour
statistics; scikit-image). The network's own type branch classifies each nucleus by the argmax over the
foreground classes of its softmax averaged over the nucleus.

Head: the classifier of ``configs/classifier.yaml``, trained with ``labels_per_class`` labelled nuclei per class
and with all, ``curve_seeds`` seeds each; macro-F1 and balanced accuracy on the validation nuclei. Its training
time is measured per source on ``timing_cells`` training nuclei (drawn with replacement, 10% noise so that no
two rows are equal) with the config's own epochs and early stopping. ``train_patches``/``val_patches`` bound
the number of patches embedded (a seeded draw; null = all). Last stdout line: the JSON result (also
``bench/results/classifier.json``) and the curve ``bench/results/classifier_curve.png``.

    python bench/classifier.py --network outputs/bench/encoders/cellvta_vit_s.pt
    python bench/classifier.py --train-patches 6 --val-patches 3 --seeds 1 --no-record   # a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # threads spinning on a shared machine would count as work

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from skimage.color import rgb2hed  # noqa: E402
from skimage.measure import regionprops_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "cellvta"
sys.path[:0] = [str(ROOT), str(BUNDLE)]

from bench.record import RESULTS, record  # noqa: E402
from scripts.cells.classifier import classification_metrics, predict, train_classifier  # noqa: E402
from scripts.cells.embeddings import CellEmbedder  # noqa: E402
from scripts.data.datasets import instance_types, split_groups  # noqa: E402
from scripts.data.prepare import CONSEP_CLASSES  # noqa: E402
from scripts.files import atomic_path  # noqa: E402
from scripts.model.network import CellViT, CellVTA  # noqa: E402

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"
NAMES = CONSEP_CLASSES[1:]
SOURCES = ("vit", "decoder", "pixel")
COLOURS = {"vit": "tab:blue", "decoder": "tab:orange", "pixel": "tab:green"}
LABELS = {"vit": "head on vit embeddings", "decoder": "head on decoder embeddings",
          "pixel": "head on 18 pixel features"}
HEAD_KEYS = ("hidden", "dropout", "epochs", "lr", "weight_decay", "batch_size", "val_fraction", "patience")
NETWORKS = {"cellvta": CellVTA, "cellvit": CellViT}


def pixel_features(image: np.ndarray, inst: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N, 18) hand-crafted features of the nuclei ``ids`` (ascending) of ``inst``: shape and colour statistics."""
    hed = rgb2hed(image)
    channels = np.concatenate([image.astype(np.float64) / 255, hed], axis=2)
    props = regionprops_table(inst, intensity_image=channels, properties=(
        "label", "area", "perimeter", "eccentricity", "solidity", "major_axis_length", "minor_axis_length",
        "intensity_mean", "intensity_std"))
    order = np.searchsorted(props["label"], ids)
    cols = [k for k in props if k != "label"]
    return np.stack([np.asarray(props[k], np.float64)[order] for k in cols], 1).astype(np.float32)


def load_network(path: Path) -> tuple[torch.nn.Module, dict]:
    """The trained network kept by ``bench/encoders.py`` and what the checkpoint says about it.

    The checkpoint holds ``state_dict``, ``model`` (e.g. ``cellvta_vit_s``), ``backbone``, ``num_classes``
    (background included), ``val_files`` (its validation image names) and ``settings`` (its training run)."""
    if not path.is_file():
        raise SystemExit(f"{path}: network checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"state_dict", "model", "backbone", "num_classes", "val_files"} - set(ckpt)
    if missing:
        raise SystemExit(f"{path}: not a bench/encoders.py checkpoint (missing {sorted(missing)})")
    kind = str(ckpt["model"]).split("_")[0]
    if kind not in NETWORKS or not ckpt["backbone"]:
        raise SystemExit(f"{path}: model {ckpt['model']!r} has no per-cell embeddings here (CellVTA or CellViT)")
    if ckpt["num_classes"] != len(CONSEP_CLASSES):
        raise SystemExit(f"{path}: {ckpt['num_classes']} classes, the CoNSeP patches have {len(CONSEP_CLASSES)}")
    net = NETWORKS[kind](ckpt["backbone"], num_nuclei_classes=ckpt["num_classes"], num_tissue_classes=0,
                         freeze="full")
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), ckpt


def kept_scores(path: Path) -> dict:
    """The segmentation scores ``bench/encoders.py`` kept next to the checkpoint (``<model>.json``), if any."""
    scores = path.with_suffix(".json")
    if not scores.is_file():
        return {}
    result = json.loads(scores.read_text())["result"]
    return {k: result[k] for k in ("bpq", "mpq", "detection_f1", "steps", "train_cpu_min") if k in result}


def split_patches(names: np.ndarray, tiles: np.ndarray, cfg: dict, val_files: list[str] | None,
                  source: str) -> dict[str, np.ndarray]:
    """Patch indices of the train and validation tiles (the network's own validation images when given),
    each a seeded draw of at most ``train_patches``/``val_patches``."""
    if val_files is not None:
        index = {f"{n}.png": i for i, n in enumerate(names)}
        unknown = sorted(set(val_files) - set(index))
        if unknown:
            raise SystemExit(f"{source}: validation images {unknown[:3]} are not CoNSeP patches of {CONSEP}")
        is_val = np.zeros(len(names), bool)
        is_val[[index[f] for f in val_files]] = True
    else:
        fractions = {"train": 1 - cfg["val_tile_fraction"], "val": cfg["val_tile_fraction"]}
        split = split_groups([str(t) for t in tiles], fractions, cfg["split_seed"])
        is_val = np.array([split[str(t)] == "val" for t in tiles])
    rng = np.random.default_rng(cfg["seed"])
    out = {}
    for part, mask in (("train", ~is_val), ("val", is_val)):
        limit = cfg[f"{part}_patches"]
        out[part] = np.sort(rng.permutation(np.flatnonzero(mask))[:limit])
    return out


def embed(net: torch.nn.Module, images: np.ndarray, inst_maps: np.ndarray, type_maps: np.ndarray,
          patches: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Per part: ``{vit, decoder, pixel}`` (N, D) features, ``y`` (N,) classes 0..3 and ``branch`` (N,) the type
    branch's classes, for the ground-truth nuclei of a foreground class; and the extraction cost."""
    rows: dict[str, dict[str, list]] = {p: {k: [] for k in (*SOURCES, "y", "branch")} for p in patches}
    cost = {"network_cpu_s": 0.0, "network_wall_s": 0.0, "pixel_cpu_s": 0.0, "patches": 0}
    with CellEmbedder(net, "vit") as vit, CellEmbedder(net, "decoder") as dec:
        for part, indices in patches.items():
            for i in indices:
                image, inst = images[i], inst_maps[i]
                ids, types = instance_types(inst, type_maps[i], len(CONSEP_CLASSES))
                t0, c0 = time.perf_counter(), time.process_time()
                features, out = dec.maps(image)
                e_dec = dec.pool(features, out, inst, str(i), inst.shape)
                e_vit = vit.pool(vit.features(*inst.shape), {}, inst, str(i), inst.shape)
                cost["network_wall_s"] += time.perf_counter() - t0
                cost["network_cpu_s"] += time.process_time() - c0
                c0 = time.process_time()
                px = pixel_features(image, inst, ids)
                cost["pixel_cpu_s"] += time.process_time() - c0
                cost["patches"] += 1
                assert np.array_equal(e_dec.ids, ids) and np.array_equal(e_vit.ids, ids)
                keep = types > 0
                for key, value in (("vit", e_vit.embeddings), ("decoder", e_dec.embeddings), ("pixel", px),
                                   ("y", types - 1), ("branch", e_dec.head_probs[:, 1:].argmax(1))):
                    rows[part][key].append(value[keep])
            print(f"embedded {len(indices)} {part} patches", file=sys.stderr, flush=True)
    return {p: {k: np.concatenate(v) for k, v in r.items()} for p, r in rows.items()}, cost


def subsample(y: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row indices: ``per_class`` random rows of each class (all of a rarer class), or all rows for None."""
    if per_class is None:
        return np.arange(len(y))
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])


def curve(head: dict, data: dict, source: str, counts: list, seeds: int) -> dict:
    """``{count: macro_f1 mean/sd, balanced_accuracy, train_s, epochs}`` of the head on ``source``."""
    out = {}
    x, y, xt, yt = data["train"][source], data["train"]["y"], data["val"][source], data["val"]["y"]
    for n in counts:
        runs = []
        for seed in range(seeds):
            rows = subsample(y, n, np.random.default_rng(seed))
            t0 = time.perf_counter()
            trained = train_classifier(x[rows], y[rows], NAMES, seed=seed, **head)
            m = classification_metrics(yt, predict(trained.model, xt).argmax(1), NAMES)
            runs.append((m["macro_f1"], m["balanced_accuracy"], time.perf_counter() - t0, trained.epochs))
        f1, bacc, secs, epochs = np.array(runs).T
        out[str(n or "all")] = {"macro_f1": round(float(f1.mean()), 4), "macro_f1_sd": round(float(f1.std()), 4),
                                "balanced_accuracy": round(float(bacc.mean()), 4),
                                "train_s": round(float(secs.mean()), 2), "epochs": round(float(epochs.mean()), 1)}
    print(f"curve of {source} done", file=sys.stderr, flush=True)
    return out


def head_timing(head: dict, x: np.ndarray, y: np.ndarray, cells: int, seed: int) -> dict:
    """Wall and CPU seconds of one head training on ``cells`` rows drawn from (x, y) with 10% noise."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(y), cells)
    xs = x[rows] + rng.normal(0, x.std(0) * 0.1, (cells, x.shape[1])).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_classifier(xs, y[rows], NAMES, seed=seed, **head)
    return {"cells": cells, "dim": int(x.shape[1]), "epochs": trained.epochs,
            "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}


def plot(result: dict, path: Path) -> None:
    """The label-efficiency curve of every source, the type branch as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, pts in result["curve"].items():
        xs = list(pts)
        ax.errorbar(range(len(xs)), [pts[k]["macro_f1"] for k in xs], yerr=[pts[k]["macro_f1_sd"] for k in xs],
                    marker="o", capsize=3, label=LABELS[name], color=COLOURS[name])
    ax.axhline(result["type_branch"]["macro_f1"], color="grey", ls="--", label="network's own type branch")
    ax.set(xticks=range(len(xs)), xticklabels=xs, xlabel="labelled nuclei per class",
           ylabel="macro-F1 on validation-tile nuclei",
           title=f"{result['mode']} network: {result['cells_train']:,} train / {result['cells_val']:,} val nuclei")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main() -> None:
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", type=Path, help="a network kept by bench/encoders.py (default: random)")
    parser.add_argument("--train-patches", type=int)
    parser.add_argument("--val-patches", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--no-record", action="store_true", help="print the result without writing bench/results")
    args = parser.parse_args()
    cfg = yaml.safe_load((BUNDLE / "configs" / "classifier_bench.yaml").read_text())
    for key, value in (("train_patches", args.train_patches), ("val_patches", args.val_patches),
                       ("curve_seeds", args.seeds)):
        if value is not None:
            cfg[key] = value
    classifier_cfg = yaml.safe_load((BUNDLE / "configs" / "classifier.yaml").read_text())
    head = {k: classifier_cfg[f"classifier_{k}"] for k in HEAD_KEYS}
    torch.set_num_threads(cfg["threads"])
    with np.load(CONSEP) as d:
        images, inst_maps, type_maps, tiles, names = (d[k] for k in ("images", "inst_map", "type_map", "tile",
                                                                      "source_name"))

    if args.network is not None:
        net, ckpt = load_network(args.network)
        budget = ckpt.get("settings", {}).get("budget_min")
        network = {"mode": "trained", "network": (
            f"{ckpt['model']} ({ckpt['backbone']}) trained {budget} CPU-min on the CoNSeP train tiles by "
            f"bench/encoders.py, cached ({args.network.name})"), "network_settings": ckpt.get("settings", {}),
            "network_segmentation": kept_scores(args.network)}
        patches = split_patches(names, tiles, cfg, list(ckpt["val_files"]), str(args.network))
    else:
        torch.manual_seed(cfg["seed"])
        net = NETWORKS[cfg["network"]](cfg["backbone"], num_nuclei_classes=len(CONSEP_CLASSES),
                                       num_tissue_classes=0).eval()
        network = {"mode": "random", "network": (f"{cfg['network']} {cfg['backbone']} randomly initialised "
                                                 f"(seed {cfg['seed']}): random features")}
        patches = split_patches(names, tiles, cfg, None, "configs/classifier_bench.yaml")
    data, cost = embed(net, images, inst_maps, type_maps, patches)

    counts = list(cfg["labels_per_class"]) + [None]
    curves = {s: curve(head, data, s, counts, cfg["curve_seeds"]) for s in SOURCES}
    branch = classification_metrics(data["val"]["y"], data["val"]["branch"], NAMES)
    timing = {s: head_timing(head, data["train"][s], data["train"]["y"], cfg["timing_cells"], cfg["seed"])
              for s in ("vit", "decoder")}
    all_f1 = {s: curves[s]["all"]["macro_f1"] for s in SOURCES}
    best = max(("vit", "decoder"), key=all_f1.get)
    type_f1 = round(branch["macro_f1"], 4)
    result = {
        **network,
        "head": head,
        "seeds": cfg["curve_seeds"],
        "patches_train": int(len(patches["train"])), "patches_val": int(len(patches["val"])),
        "cells_train": int(len(data["train"]["y"])), "cells_val": int(len(data["val"]["y"])),
        "val_class_counts": np.bincount(data["val"]["y"], minlength=len(NAMES)).tolist(),
        "curve": curves,
        "type_branch": {"macro_f1": type_f1, "balanced_accuracy": round(branch["balanced_accuracy"], 4)},
        "extraction": {"patches": cost["patches"], "network_wall_s": round(cost["network_wall_s"], 1),
                       "network_cpu_s": round(cost["network_cpu_s"], 1),
                       "network_cpu_s_per_patch": round(cost["network_cpu_s"] / cost["patches"], 3),
                       "pixel_cpu_s_per_patch": round(cost["pixel_cpu_s"] / cost["patches"], 3)},
        "head_training": timing,
        "best_source": best,
        "targets": {
            "all_labels_head_ge_type_branch": {s: all_f1[s] >= type_f1 for s in ("vit", "decoder")},
            "labels_50_within_margin_of_all": {s: all_f1[s] - curves[s]["50"]["macro_f1"] <= cfg["target_margin"]
                                               for s in SOURCES},
            "head_training_within_s": {s: timing[s]["wall_s"] <= cfg["target_train_s"] for s in timing},
            "margin": cfg["target_margin"], "train_s": cfg["target_train_s"]},
    }
    if args.no_record:
        print(json.dumps(result))
        return
    plot(result, RESULTS / "classifier_curve.png")
    record("classifier", result)


if __name__ == "__main__":
    main()
