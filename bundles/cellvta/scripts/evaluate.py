"""Evaluate predicted instance + type maps against ground truth: ``metrics.json`` and ``metrics.md``.

The maps are any source :func:`scripts.nuclei.evaluation.load_maps` reads (folders of ``.npy``/``.npz``/``.mat``
files, stacked files). From ``bundles/cellvta``::

    python -m scripts.evaluate --pred=PRED --gt=GT --output_dir=eval --num_classes=5 \\
        --class_names='[background,other,inflammatory,epithelial,spindle]' --tissues=tissues.csv
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import fire

from .cells.apply import check_unseen
from .cells.classifier import load_classifier
from .nuclei.evaluation import evaluate, json_ready, load_tissues, markdown_report, tissue_classification, write_report


def main(
    pred: str,
    gt: str,
    output_dir: str = "eval",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    tissues: str | None = None,
    pred_tissues: str | None = None,
    pred_keys: str = "inst_map,type_map",
    gt_keys: str = "inst_map,type_map",
    iou_threshold: float = 0.5,
    radius_um: float = 3.0,
    pixel_size_um: float = 0.25,
    dummy_points: bool = False,
    pair_by_order: bool = False,
    classifier: str | None = None,
    class_map: Mapping[str, str] | None = None,
) -> None:
    """Command line: evaluate, write ``metrics.json`` and ``metrics.md`` into ``output_dir`` and print the tables.

    ``pred_tissues``: the predicted tissue of each image (tile inference's ``tissue.csv``, or any source of
    :func:`load_tissues`), scored against ``tissues`` (:func:`tissue_classification`, classes: the labels found).

    ``classifier``: the ``classifier.pt`` whose classes the predictions' type maps hold (tile inference run with
    it), mapped to ``class_names`` by name or ``class_map`` (``--class_map='{tumour: epithelial, ...}'``); refused
    when it was trained on any of the evaluated images (identified by name: the command line sees the
    predictions, not the images; the evaluation workflow compares pixels).
    """
    pred_classes, trained_on = None, {}
    if classifier is not None:
        _, table, meta = load_classifier(classifier)
        pred_classes, trained_on = table.names, meta["images"]
    result = evaluate(
        pred, gt, num_classes, class_names, tissues, pred_keys, gt_keys, iou_threshold, radius_um, pixel_size_um,
        dummy_points, pair_by_order, pred_classes, class_map,
    )
    if classifier is not None:
        # the predictions' images are not at hand: images are identified by name
        check_unseen(Path(classifier), trained_on, {record["name"]: None for record in result["per_image"]})
    if pred_tissues is not None:
        if tissues is None:
            raise ValueError("--pred_tissues needs the ground-truth tissues (--tissues) to be scored against")
        names = [record["name"] for record in result["per_image"]]
        result["summary"]["tissue_classification"] = json_ready(
            tissue_classification(load_tissues(tissues, names), load_tissues(pred_tissues, names)))
    json_path, md_path = write_report(result, output_dir)
    print(markdown_report(result))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    fire.Fire(main)
