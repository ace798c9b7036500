"""Cell classifiers on frozen embeddings against the network's own type branch and a pixel-feature baseline.

Data: the real CoNSeP Train patches of ``../shared/data`` (4 classes: other, inflammatory, epithelial,
spindle-shaped), split by source tile (``val_tile_fraction`` of the tiles held out, seeded); every classifier is
scored on the held-out tiles' ground-truth nuclei.

What is measured, honestly: no pretrained or trained weights can be fetched on this machine, so the network is a
**randomly initialised** bundle network (``configs/classifier_bench.yaml``: CellViT or CellVTA, ViT-T, seeded). Its
embeddings are random features; its own type branch is untrained (chance). The benchmark therefore measures the
pipeline on real data, the label efficiency of the head, its training and extraction cost, and how much each
source carries from the image through random weights, against the strongest peer that runs here: the same head
on hand-crafted per-nucleus pixel features (area, perimeter, eccentricity, solidity, axes, mean/std of RGB and
of the haematoxylin-eosin-DAB channels; scikit-image). With a trained network (or foundation weights) the ViT
and decoder embeddings carry what the network learnt; rerun the benchmark there.

Sources: ``vit`` (last-block tokens pooled over each nucleus; encoder only) on ``vit_patches`` patches with the
pixel baseline; ``decoder``, the type branch and ``vit`` again on the first ``full_patches`` of them (the whole
network runs). Head: the classifier of ``configs/classifier.yaml``, trained with 5..100 labelled nuclei per class and
with all (on the whole-network patches: ``full_labels_per_class`` and all), ``curve_seeds`` seeds each;
macro-F1 and balanced accuracy on the held-out nuclei. The head's training time is measured on ``timing_cells``
nuclei (train nuclei drawn with replacement, 10% noise so that no two rows are equal) for a fixed
``timing_epochs`` epochs. Last stdout line: the JSON result (also ``bench/results/cells.json``) and the curve
``bench/results/cells_curve.png``.

    python bench/cells.py
    python bench/cells.py --vit-patches 6 --full-patches 3 --seeds 1 --no-record   # a smoke run
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
from scripts.data.datasets import split_groups  # noqa: E402
from scripts.model.network import CellViT, CellVTA  # noqa: E402

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"
NAMES = ["other", "inflammatory", "epithelial", "spindle-shaped"]
COLOURS = {"vit": "tab:blue", "decoder": "tab:orange", "pixel": "tab:green"}
HEAD_KEYS = ("hidden", "dropout", "epochs", "lr", "weight_decay", "batch_size", "val_fraction", "patience")


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


def cell_labels(inst: np.ndarray, types: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N,) class 0..3 of each nucleus id (the majority of its type-map pixels, CoNSeP ids 1..4)."""
    return np.array([np.bincount(types[inst == i], minlength=5)[1:].argmax() for i in ids], np.int64)


def subsample(y: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row indices: ``per_class`` random rows of each class (all of a rarer class), or all rows for None."""
    if per_class is None:
        return np.arange(len(y))
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])


def score(head: dict, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, per_class: int | None,
          seed: int) -> dict:
    rows = subsample(y, per_class, np.random.default_rng(seed))
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_classifier(x[rows], y[rows], NAMES, seed=seed, **head)
    m = classification_metrics(yt, predict(trained.model, xt).argmax(1), NAMES)
    return {"macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"], "cells": int(len(rows)),
            "train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0, "epochs": trained.epochs}


def curve(head: dict, sets: dict, counts: list, seeds: int) -> dict:
    """{source: {count: {macro_f1 mean/sd, balanced_accuracy mean, train_s mean}}}."""
    out = {}
    for name, (x, y, xt, yt) in sets.items():
        out[name] = {}
        for n in counts:
            runs = [score(head, x, y, xt, yt, n, s) for s in range(seeds)]
            out[name][str(n or "all")] = {
                "macro_f1": round(float(np.mean([r["macro_f1"] for r in runs])), 4),
                "macro_f1_sd": round(float(np.std([r["macro_f1"] for r in runs])), 4),
                "balanced_accuracy": round(float(np.mean([r["balanced_accuracy"] for r in runs])), 4),
                "train_s": round(float(np.mean([r["train_s"] for r in runs])), 2),
                "epochs": round(float(np.mean([r["epochs"] for r in runs])), 1)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "vit_set", "vit source vs pixel features"),
                           (axes[1], "full_set", "all sources (whole network)")):
        part = result[key]
        for name, pts in part["curve"].items():
            xs = list(pts)
            ax.errorbar(range(len(xs)), [pts[k]["macro_f1"] for k in xs], yerr=[pts[k]["macro_f1_sd"] for k in xs],
                        marker="o", capsize=3, label=name, color=COLOURS[name])
        if "type_branch" in part:
            ax.axhline(part["type_branch"]["macro_f1"], color="grey", ls="--", label="network's type branch")
        ax.set(xticks=range(len(xs)), xticklabels=xs, xlabel="labelled nuclei per class",
               title=f"{title}\n{part['cells_train']} train / {part['cells_test']} test nuclei")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("macro-F1 on held-out tiles")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vit-patches", type=int)
    parser.add_argument("--full-patches", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--no-record", action="store_true", help="print the result without writing bench/results")
    args = parser.parse_args()
    cfg = yaml.safe_load((BUNDLE / "configs" / "classifier_bench.yaml").read_text())
    for key, value in (("vit_patches", args.vit_patches), ("full_patches", args.full_patches),
                       ("curve_seeds", args.seeds)):
        if value is not None:
            cfg[key] = value
    cells_cfg = yaml.safe_load((BUNDLE / "configs" / "classifier.yaml").read_text())
    head = {k: cells_cfg[f"classifier_{k}"] for k in HEAD_KEYS}
    torch.set_num_threads(cfg["threads"])
    with np.load(CONSEP) as d:
        images, inst_maps, type_maps, tiles = d["images"], d["inst_map"], d["type_map"], d["tile"]
    split = split_groups(sorted(set(tiles)), {"train": 1 - cfg["val_tile_fraction"], "val": cfg["val_tile_fraction"]},
                         cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    n = cfg["vit_patches"]
    n_val = max(1, round(n * cfg["val_tile_fraction"]))
    pick = {s: rng.permutation(np.flatnonzero([split[t] == s for t in tiles])) for s in ("train", "val")}
    n_full_val = max(1, round(cfg["full_patches"] * cfg["val_tile_fraction"]))
    order = {"train": pick["train"][: n - n_val], "val": pick["val"][:n_val]}
    full = {"train": set(order["train"][: cfg["full_patches"] - n_full_val].tolist()),
            "val": set(order["val"][:n_full_val].tolist())}

    torch.manual_seed(cfg["seed"])
    net_cls = {"cellvit": CellViT, "cellvta": CellVTA}[cfg["network"]]
    net = net_cls(cfg["backbone"], num_nuclei_classes=5, num_tissue_classes=0).eval()
    vit = CellEmbedder(net, "vit", type_head=False)
    dec = CellEmbedder(net, "decoder")
    rows = {k: {s: [] for s in ("train", "val")} for k in ("vit", "pixel", "y", "full_vit", "decoder", "head",
                                                            "full_pixel", "full_y")}
    cost = {"vit_encoder_only": [], "whole_network": [], "pixel": []}
    for s in ("train", "val"):
        for i in order[s]:
            image, inst = images[i], inst_maps[i]
            ids = np.unique(inst)[1:]
            t0 = time.process_time()
            px = pixel_features(image, inst, ids)
            cost["pixel"].append(time.process_time() - t0)
            y = cell_labels(inst, type_maps[i], ids)
            t0 = time.process_time()
            if i in full[s]:
                features, out = dec.maps(image)
                e_dec = dec.pool(features, out, inst, str(i), (256, 256))
                e_vit = vit.pool(vit.features(256, 256), {}, inst, str(i), (256, 256))
                cost["whole_network"].append(time.process_time() - t0)
                rows["full_vit"][s].append(e_vit.embeddings)
                rows["decoder"][s].append(e_dec.embeddings)
                rows["head"][s].append(e_dec.head_probs)
                rows["full_pixel"][s].append(px)
                rows["full_y"][s].append(y)
            else:
                e_vit = vit(image, inst, str(i))
                cost["vit_encoder_only"].append(time.process_time() - t0)
            assert np.array_equal(e_vit.ids, ids)
            rows["vit"][s].append(e_vit.embeddings)
            rows["pixel"][s].append(px)
            rows["y"][s].append(y)
    print(f"embedded {n} patches ({len(cost['whole_network'])} through the whole network)", file=sys.stderr, flush=True)
    cat = {k: {s: np.concatenate(v[s]) for s in v} for k, v in rows.items()}
    counts = list(cfg["labels_per_class"]) + [None]

    def part(sources: dict, y_key: str, counts: list) -> dict:
        y, yt = cat[y_key]["train"], cat[y_key]["val"]
        sets = {name: (cat[k]["train"], y, cat[k]["val"], yt) for name, k in sources.items()}
        return {"cells_train": int(len(y)), "cells_test": int(len(yt)),
                "test_class_counts": np.bincount(yt, minlength=4).tolist(),
                "curve": curve(head, sets, counts, cfg["curve_seeds"])}

    vit_set = part({"vit": "vit", "pixel": "pixel"}, "y", counts)
    full_set = part({"vit": "full_vit", "decoder": "decoder", "pixel": "full_pixel"}, "full_y",
                    list(cfg["full_labels_per_class"]) + [None])
    head_pred = cat["head"]["val"][:, 1:].argmax(1)
    full_set["type_branch"] = {k: round(v, 4) for k, v in classification_metrics(
        cat["full_y"]["val"], head_pred, NAMES).items() if k in ("macro_f1", "balanced_accuracy")}

    print("curves done", file=sys.stderr, flush=True)
    timing_rows = np.random.default_rng(cfg["seed"]).integers(0, len(cat["y"]["train"]), cfg["timing_cells"])
    x_time = cat["vit"]["train"][timing_rows]
    x_time = x_time + np.random.default_rng(cfg["seed"]).normal(0, x_time.std(0) * 0.1, x_time.shape).astype(np.float32)
    fixed = {**head, "epochs": cfg["timing_epochs"], "patience": cfg["timing_epochs"]}
    t0, c0 = time.perf_counter(), time.process_time()
    timed = train_classifier(x_time, cat["y"]["train"][timing_rows], NAMES, seed=cfg["seed"], **fixed)
    timing = {"cells": cfg["timing_cells"], "dim": int(x_time.shape[1]), "epochs": timed.epochs,
              "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
              "all_labels_epochs_run": vit_set["curve"]["vit"]["all"]["epochs"]}

    def best(part_: dict, source: str) -> float:
        return part_["curve"][source]["all"]["macro_f1"]

    all_f1 = {s: best(full_set, s) for s in ("vit", "decoder")}
    result = {
        "network": f"{cfg['network']} {cfg['backbone']} randomly initialised (seed {cfg['seed']}): random features",
        "head": head,
        "vit_set": vit_set,
        "full_set": full_set,
        "ratios": {
            "vit_over_pixel_all_labels": round(best(vit_set, "vit") / best(vit_set, "pixel"), 3),
            "decoder_over_pixel_all_labels": round(best(full_set, "decoder") / best(full_set, "pixel"), 3),
            "decoder_over_vit_all_labels": round(best(full_set, "decoder") / best(full_set, "vit"), 3),
            "vit_head_over_type_branch": (round(best(full_set, "vit") / full_set["type_branch"]["macro_f1"], 3)
                                          if full_set["type_branch"]["macro_f1"] > 0 else None),
            "vit_50_over_all": round(vit_set["curve"]["vit"]["50"]["macro_f1"] / best(vit_set, "vit"), 3),
            "pixel_50_over_all": round(vit_set["curve"]["pixel"]["50"]["macro_f1"] / best(vit_set, "pixel"), 3),
        },
        "extract_cpu_s_per_patch": {k: round(float(np.mean(v)), 3) for k, v in cost.items() if v},
        "head_training_20k": timing,
        "best_source_here": max(all_f1, key=all_f1.get),
    }
    if args.no_record:
        print(json.dumps(result))
        return
    plot(result, RESULTS / "cells_curve.png")
    record("cells", result)


if __name__ == "__main__":
    main()
