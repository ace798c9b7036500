"""CellVTA against MONAI's HoVerNet on the real CoNSeP patches, for the same CPU time budget each.

Data: the 432 CoNSeP Train patches (256x256, 40x) of ``../shared/data``, split by source tile (about 20% of
the tiles for validation, seeded). CellVTA: a randomly initialised ViT (``--backbone``, ViT-S/16 by default:
nothing pretrained can be downloaded here, so the encoder trains) with the adapter, built from the bundle's
``configs/common.yaml``, trained with the bundle's transforms, loss and optimiser settings. Peer: MONAI's
``HoVerNet`` (fast mode, no pretrained weights) with ``HoVerNetLoss``, trained on the same tiles and
augmentations. Each model trains for ``--budget-min`` minutes of wall-clock (whole epochs; the last epoch
that starts within the budget finishes), then both are post-processed with the bundle's HoVer-Net
post-processing and scored with the bundle's metrics. HoVerNet fast mode predicts the central 164x164 of a
256x256 tile, so both models are scored on that central region.

    python bench/train_consep.py [--budget-min 40] [--batch-size 8] [--backbone vit-s]

The last line of stdout is
``{"budget_min": n, "cellvta": {"bpq", "mpq", "dice", "aji", "epochs"}, "hovernet": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.pathology.losses import HoVerNetLoss
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.networks.nets import HoVerNet
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "cellvta"
sys.path[:0] = [str(ROOT), str(BUNDLE)]

from scripts.data import dataset_list, read_info  # noqa: E402
from scripts.losses import CellVTALoss  # noqa: E402
from scripts.metrics import evaluate_image, summarize  # noqa: E402
from scripts.postprocess_transforms import HoVerNetPostProcessing  # noqa: E402
from scripts.prepare import CONSEP_CLASSES, arrays  # noqa: E402
from scripts.sampling import CellTissueSampler  # noqa: E402
from scripts.transforms import train_transforms, val_transforms  # noqa: E402

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"
TILE, HOVERNET_OUT = 256, 164
MARGIN = (TILE - HOVERNET_OUT) // 2


def prepare_consep(tmp: Path, seed: int) -> Path:
    """Write the CoNSeP patches in the bundle layout, split by source tile into train (80%) and val (20%)."""
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    out = tmp / "consep"
    arrays(str(CONSEP), str(out), CONSEP_CLASSES, name="consep", group_key="tile", name_key="source_name",
           fractions={"train": 0.8, "val": 0.2}, seed=seed)
    return out


def bundle_config(dataset_dir: Path, overrides: Mapping[str, object]) -> ConfigParser:
    """``configs/common.yaml`` of the bundle with ``dataset_dir`` and the overrides applied."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "common.yaml"))
    parser["dataset_dir"] = str(dataset_dir)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def centre(x: torch.Tensor) -> torch.Tensor:
    """(..., 256, 256) -> the central (..., 164, 164)."""
    return x[..., MARGIN : MARGIN + HOVERNET_OUT, MARGIN : MARGIN + HOVERNET_OUT]


class HoVerNetAdapter(nn.Module):
    """MONAI HoVerNet with the bundle's output names, and its targets in HoVerNetLoss's form."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = HoVerNet(mode="fast", in_channels=3, out_classes=num_classes, pretrained_url=None,
                            freeze_encoder=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"nuclei_binary_map": out["nucleus_prediction"], "hv_map": out["horizontal_vertical"],
                "nuclei_type_map": out["type_prediction"]}


def hovernet_loss(num_classes: int) -> Callable:
    loss = HoVerNetLoss(lambda_hv_mse=2.0)

    def compute(pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        np_t = centre(batch["nuclei_binary_map"])[:, 0].long()
        nt_t = centre(batch["nuclei_type_map"])[:, 0].long()
        target = {
            "nucleus_prediction": F.one_hot(np_t, 2).permute(0, 3, 1, 2).float(),
            "horizontal_vertical": centre(batch["hv_map"]),
            "type_prediction": F.one_hot(nt_t, num_classes).permute(0, 3, 1, 2).float(),
        }
        pred = {"nucleus_prediction": pred["nuclei_binary_map"], "horizontal_vertical": pred["hv_map"],
                "type_prediction": pred["nuclei_type_map"]}
        return loss(pred, target)

    return compute


def cellvta_loss() -> Callable:
    loss = CellVTALoss(weights={"tissue_ce": 0.0})

    def compute(pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss(pred, batch)

    return compute


def train(
    net: nn.Module, loss_fn: Callable, loader: DataLoader, budget_s: float, lr: float, label: str
) -> tuple[int, float]:
    """Train whole epochs until the budget is spent; AdamW and ExponentialLR(0.85) as the CellVTA recipe."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=(0.85, 0.95),
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.85)
    start, epochs = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < budget_s:
        total = 0.0
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        epochs += 1
        print(f"{label}: epoch {epochs} loss {total / len(loader):.4f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return epochs, time.perf_counter() - start


@torch.no_grad()
def score(net: nn.Module, loader: DataLoader, num_classes: int, crop_output: bool) -> dict[str, float]:
    """Post-process every validation tile and score the central 164x164 region."""
    net.eval()
    post = HoVerNetPostProcessing(magnification=40)
    scores = []
    for batch in loader:
        out = net(batch["image"])
        for i in range(batch["image"].shape[0]):
            maps = {k: (v[i] if not crop_output else centre(v[i])) for k, v in out.items() if v.ndim == 4}
            inst, types, _ = post(maps["nuclei_binary_map"], maps["hv_map"], maps["nuclei_type_map"].softmax(0))
            gt_inst = centre(batch["inst_map"][i, 0]).numpy()
            gt_type = centre(batch["nuclei_type_map"][i, 0]).numpy()
            scores.append(evaluate_image(gt_inst, gt_type, inst[0], types[0], num_classes, detection_radius_px=None))
    s = summarize(scores, num_classes)
    return {k: round(float(s[k]), 4) for k in ("bpq", "mpq", "dice", "aji")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=40.0, help="training minutes per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="vit-s", help="the bundle's backbone preset for CellVTA")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_consep(Path(tmp), args.seed)
        info = read_info(data_dir)
        num_classes = info.num_classes
        config = bundle_config(data_dir, {"backbone": args.backbone})
        mean, std = config.get_parsed_content("image_mean"), config.get_parsed_content("image_std")
        train_data, val_data = dataset_list(data_dir, "train"), dataset_list(data_dir, "val")
        print(f"CoNSeP: {len(train_data)} train and {len(val_data)} val tiles "
              f"({len({d['name'].rsplit('_', 1)[0] for d in val_data})} val source tiles)", file=sys.stderr)
        train_ds = Dataset(train_data, train_transforms(mean, std, size=TILE))
        val_loader = DataLoader(Dataset(val_data, val_transforms(mean, std)), batch_size=args.batch_size,
                                num_workers=args.workers)
        budget_s = args.budget_min * 60.0
        results = {}
        builders = {
            "cellvta": (lambda: config.get_parsed_content("network_def"), cellvta_loss, 3e-4, False),
            "hovernet": (lambda: HoVerNetAdapter(num_classes), lambda: hovernet_loss(num_classes), 1e-4, True),
        }
        for name, (build, make_loss, lr, predicts_centre) in builders.items():
            torch.manual_seed(args.seed)
            sampler = CellTissueSampler(train_data, gamma=0.85, seed=args.seed)
            loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                persistent_workers=args.workers > 0)
            net = build()
            epochs, seconds = train(net, make_loss(), loader, budget_s, lr, name)
            results[name] = {**score(net, val_loader, num_classes, crop_output=not predicts_centre), "epochs": epochs,
                             "train_s": round(seconds, 1)}
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(json.dumps({"budget_min": args.budget_min, **results}))


if __name__ == "__main__":
    main()
