"""CellVTA against MONAI's HoVerNet on the real CoNSeP patches, for the same CPU-time budget each.

Data: the 432 CoNSeP Train patches (256x256, 40x) of ``../shared/data``, split by source tile (about 20% of
the tiles for validation, seeded). CellVTA: a randomly initialised ViT (``--backbone``, ViT-S/16 by default:
nothing pretrained can be downloaded here, so the encoder trains) with the adapter, built from the bundle's
``configs/common.yaml`` and trained with the bundle's loss and the CellVTA optimiser (AdamW, betas
0.85/0.95, weight decay 1e-4, ExponentialLR 0.85 per epoch, lr 3e-4). Peer: MONAI's ``HoVerNet`` (fast mode,
no pretrained weights, ``decoder_padding=True`` as in HoVer-Net's CoNIC branch, so that it predicts the whole
tile) with MONAI's ``HoVerNetLoss``, the same optimiser and schedule and lr 1e-4 (the model zoo's).

Equal footing: both models see the same batches. Training samples are random ``--crop`` squares of the
tiles, then the bundle's augmentation chain (the CellVTA recipe), with the same seeds for the sampler and
the transforms, so batch i is identical for both models (checked by comparing every batch's SHA-1). MONAI's
HoVerNet forward refuses inputs other than 256x256 in fast mode; with ``decoder_padding`` the network is
fully convolutional, so :class:`HoVerNetAnySize` runs the same modules in the same order on the crops (it is
checked to equal MONAI's forward on a 256x256 input before training). Validation always runs on the full
256x256 tiles; both outputs go through the bundle's HoVer-Net post-processing (40x) and metrics.

Budget: CPU time, not wall clock. The machine is shared, so each model trains in its own process (both at
once, ``--threads`` each) and stops when that process's ``time.process_time()`` (all its threads, data
loading included) has grown by ``--budget-min`` minutes; load from other jobs slows both alike without eating
into either budget. Threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) so that threads spinning while they
wait for each other on a busy machine do not count as work. The budget is checked before every step, so no
model overshoots by more than one step; the learning rate decays once per completed epoch.

    python bench/train_consep.py [--budget-min 40] [--batch-size 4] [--crop 128] [--backbone vit-s]
    python bench/train_consep.py --budget-min 0.2 --max-val 4      # a smoke run of a few minutes

The last line of stdout is ``{"budget": "cpu-minutes", "budget_min": n, "cellvta": {"bpq", "mpq", "dice",
"aji", "epochs", "steps", "train_cpu_min", "train_wall_min", ...}, "hovernet": {...}, "identical_batches": n}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.apps.pathology.losses import HoVerNetLoss  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.networks.nets import HoVerNet  # noqa: E402
from monai.transforms import Compose, RandSpatialCropd  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "cellvta"
sys.path[:0] = [str(ROOT), str(BUNDLE)]

from scripts.data.datasets import dataset_list, read_info  # noqa: E402
from scripts.training.losses import CellVTALoss  # noqa: E402
from scripts.nuclei.metrics import evaluate_image, summarize  # noqa: E402
from scripts.nuclei.postprocess_transforms import HoVerNetPostProcessing  # noqa: E402
from scripts.data.prepare import CONSEP_CLASSES, arrays  # noqa: E402
from scripts.data.sampling import CellTissueSampler  # noqa: E402
from scripts.data.transforms import LABEL_KEYS, IMAGE_KEY, train_transforms, val_transforms  # noqa: E402

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"
TILE = 256
MODELS = ("cellvta", "hovernet")
SCORE_KEYS = ("bpq", "mpq", "dice", "aji")


def prepare_consep(tmp: Path, seed: int) -> Path:
    """Write the CoNSeP patches in the bundle layout, split by source tile into train (80%) and val (20%)."""
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    out = tmp / "consep"
    arrays(str(CONSEP), str(out), CONSEP_CLASSES, name="consep", group_key="tile", name_key="source_name",
           fractions={"train": 0.8, "val": 0.2}, seed=seed)
    return out


def bundle_config(dataset_dir: str, backbone: str, device: str = "cpu") -> ConfigParser:
    """``configs/common.yaml`` of the bundle for ``dataset_dir`` and ``backbone``, the network built on ``device``."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "common.yaml"))
    parser["dataset_dir"] = dataset_dir
    parser["backbone"] = backbone
    parser["network_def#device"] = device
    return parser


def image_stats(dataset_dir: str, backbone: str) -> tuple[list[float], list[float]]:
    """The normalisation both models use: the bundle's (the backbone's own mean and std)."""
    parser = bundle_config(dataset_dir, backbone, device="meta")
    return list(parser.get_parsed_content("image_mean")), list(parser.get_parsed_content("image_std"))


class HoVerNetAnySize(HoVerNet):
    """MONAI's HoVerNet (fast mode, padded decoder) with the bundle's output names, for any input size.

    ``forward``: ``(B, 3, H, W)`` with H, W multiples of 32 -> ``nuclei_binary_map`` (B, 2, H, W),
    ``hv_map`` (B, 2, H, W), ``nuclei_type_map`` (B, C, H, W) logits. It calls the modules of
    :class:`monai.networks.nets.HoVerNet` in the order of its forward, without that forward's 256x256 guard.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(mode="fast", in_channels=3, out_classes=num_classes, decoder_padding=True,
                         pretrained_url=None, freeze_encoder=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"HoVerNetAnySize: input size {tuple(x.shape[-2:])} is not a multiple of 32")
        x = self.conv0(x)
        skips = []
        for i, block in enumerate(self.res_blocks):
            x = block(x)
            if i <= 2:
                skips.append(x)
        x = self.upsample(self.bottleneck(x))
        return {"nuclei_binary_map": self.nucleus_prediction(x, skips),
                "hv_map": self.horizontal_vertical(x, skips),
                "nuclei_type_map": self.type_prediction(x, skips)}


def check_hovernet_forward(net: HoVerNetAnySize) -> float:
    """Largest difference between :class:`HoVerNetAnySize` and MONAI's own forward on a 256x256 input."""
    net.eval()
    x = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, monai_out = net(x), HoVerNet.forward(net, x)
    names = {"nuclei_binary_map": "nucleus_prediction", "hv_map": "horizontal_vertical",
             "nuclei_type_map": "type_prediction"}
    diff = max(float((ours[k] - monai_out[v]).abs().max()) for k, v in names.items())
    if diff > 1e-5:
        raise RuntimeError(f"HoVerNetAnySize differs from MONAI's HoVerNet forward by {diff:.3g}")
    net.train()
    return diff


def hovernet_loss(num_classes: int) -> Callable:
    """MONAI's HoVerNetLoss on the bundle's targets (class indices turned into one-hot maps)."""
    loss = HoVerNetLoss()

    def compute(pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        target = {
            "nucleus_prediction": F.one_hot(batch["nuclei_binary_map"][:, 0].long(), 2).permute(0, 3, 1, 2).float(),
            "horizontal_vertical": batch["hv_map"],
            "type_prediction": F.one_hot(batch["nuclei_type_map"][:, 0].long(),
                                         num_classes).permute(0, 3, 1, 2).float(),
        }
        return loss({"nucleus_prediction": pred["nuclei_binary_map"], "horizontal_vertical": pred["hv_map"],
                     "type_prediction": pred["nuclei_type_map"]}, target)

    return compute


def cellvta_loss() -> Callable:
    """The bundle's CellVTA loss without the tissue term (CoNSeP has one tissue)."""
    loss = CellVTALoss(weights={"tissue_ce": 0.0})

    def compute(pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss(pred, batch)

    return compute


def crop_transforms(mean: Sequence[float], std: Sequence[float], crop: int) -> Compose:
    """The bundle's training chain (load, augment, targets, normalise) on a random ``crop`` x ``crop`` square of
    each tile: image (3, crop, crop), ``inst_map``, ``nuclei_binary_map``, ``nuclei_type_map`` (1, crop, crop),
    ``hv_map`` (2, crop, crop)."""
    chain = train_transforms(mean, std, size=crop).transforms
    keys = [IMAGE_KEY, *LABEL_KEYS]
    return Compose([chain[0], RandSpatialCropd(keys, roi_size=crop, random_size=False), *chain[1:]])


def batch_digest(batch: Mapping[str, torch.Tensor]) -> str:
    """SHA-1 of a batch's images and instance maps (to check that both models see the same data)."""
    h = hashlib.sha1()
    for key in (IMAGE_KEY, "inst_map"):
        h.update(batch[key].detach().cpu().numpy().tobytes())
    return h.hexdigest()


def train(net: nn.Module, loss_fn: Callable, loader: DataLoader, budget_s: float, lr: float,
          label: str) -> dict[str, object]:
    """Train until this process has used ``budget_s`` CPU seconds; AdamW and ExponentialLR(0.85) per epoch."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, betas=(0.85, 0.95),
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.85)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    steps, samples, epochs, digests, spent = 0, 0, 0, [], False
    net.train()
    while not spent:
        total, n = 0.0, 0
        for batch in loader:
            if time.process_time() - cpu0 >= budget_s:
                spent = True
                break
            digests.append(batch_digest(batch))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch[IMAGE_KEY]), batch)
            loss.backward()
            opt.step()
            steps, samples, n = steps + 1, samples + batch[IMAGE_KEY].shape[0], n + 1
            total += float(loss.detach())
            if steps % 10 == 0:
                print(f"{label}: step {steps} loss {total / n:.4f} ({(time.process_time() - cpu0) / 60:.1f} cpu-min, "
                      f"{(time.perf_counter() - wall0) / 60:.1f} wall-min)", file=sys.stderr, flush=True)
        else:
            sched.step()
            epochs += 1
            print(f"{label}: epoch {epochs} done, mean loss {total / max(n, 1):.4f}", file=sys.stderr, flush=True)
    return {"epochs": round(samples / len(loader.dataset), 2), "steps": steps, "batch_sha1": digests,
            "train_cpu_min": round((time.process_time() - cpu0) / 60, 2),
            "train_wall_min": round((time.perf_counter() - wall0) / 60, 2)}


@torch.no_grad()
def score(net: nn.Module, loader: DataLoader, num_classes: int) -> dict[str, float]:
    """Post-process every full validation tile and score it (bPQ, per-image mPQ, Dice, AJI)."""
    net.eval()
    post = HoVerNetPostProcessing(magnification=40)
    scores = []
    for batch in loader:
        out = net(batch[IMAGE_KEY])
        for i in range(batch[IMAGE_KEY].shape[0]):
            inst, types, _ = post(out["nuclei_binary_map"][i], out["hv_map"][i], out["nuclei_type_map"][i].softmax(0))
            scores.append(evaluate_image(batch["inst_map"][i, 0].numpy(), batch["nuclei_type_map"][i, 0].numpy(),
                                         inst[0], types[0], num_classes, detection_radius_px=None))
    s = summarize(scores, num_classes)
    return {k: round(float(s[k]), 4) for k in SCORE_KEYS}


def run_model(name: str, args: argparse.Namespace, data_dir: str, result_file: str) -> None:
    """Train and score one model in this process; write its result as JSON to ``result_file``."""
    torch.set_num_threads(args.threads)
    info = read_info(data_dir)
    mean, std = image_stats(data_dir, args.backbone)
    train_data, val_data = dataset_list(data_dir, "train"), dataset_list(data_dir, "val")
    if args.max_val:
        val_data = val_data[: args.max_val]
    torch.manual_seed(args.seed)
    sampler = CellTissueSampler(train_data, gamma=0.85, seed=args.seed)
    loader = DataLoader(Dataset(train_data, crop_transforms(mean, std, args.crop)), batch_size=args.batch_size,
                        sampler=sampler, num_workers=0)
    val_loader = DataLoader(Dataset(val_data, val_transforms(mean, std)), batch_size=1, num_workers=0)
    torch.manual_seed(args.seed)
    extra: dict[str, object] = {}
    if name == "cellvta":
        net = bundle_config(data_dir, args.backbone).get_parsed_content("network_def")
        loss_fn, lr = cellvta_loss(), 3e-4
    else:
        net, loss_fn, lr = HoVerNetAnySize(info.num_classes), hovernet_loss(info.num_classes), 1e-4
        extra["forward_check_max_diff"] = check_hovernet_forward(net)
    extra["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
    trained = train(net, loss_fn, loader, args.budget_min * 60.0, lr, name)
    cpu0 = time.process_time()
    scores = score(net, val_loader, info.num_classes)
    result = {**scores, **trained, **extra, "val_tiles": len(val_data),
              "eval_cpu_min": round((time.process_time() - cpu0) / 60, 2)}
    print(f"{name}: { {k: v for k, v in result.items() if k != 'batch_sha1'} }", file=sys.stderr, flush=True)
    tmp = Path(result_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=40.0, help="training CPU minutes per model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128, help="side of the random training crops (multiple of 32)")
    parser.add_argument("--backbone", default="vit-s", help="the bundle's backbone preset for CellVTA")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model process")
    parser.add_argument("--max-val", type=int, default=0, help="score only the first N validation tiles (0: all)")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    if args.crop % 32 or not 32 <= args.crop <= TILE:
        parser.error(f"--crop {args.crop}: must be a multiple of 32 between 32 and {TILE}")

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_consep(Path(tmp), args.seed)
        train_data, val_data = dataset_list(data_dir, "train"), dataset_list(data_dir, "val")
        print(f"CoNSeP: {len(train_data)} train and {len(val_data)} val tiles "
              f"({len({d['name'].rsplit('_', 1)[0] for d in val_data})} val source tiles)", file=sys.stderr)
        ctx = mp.get_context("spawn")
        files = {name: str(Path(tmp) / f"{name}.json") for name in MODELS}
        procs = {name: ctx.Process(target=run_model, args=(name, args, str(data_dir), files[name]), name=name)
                 for name in MODELS}
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.join()
        failed = [f"{name} (exit code {p.exitcode})" for name, p in procs.items() if p.exitcode != 0]
        if failed:
            raise SystemExit(f"training failed: {', '.join(failed)}")
        results = {name: json.loads(Path(files[name]).read_text()) for name in MODELS}
    digests = [results[name].pop("batch_sha1") for name in MODELS]
    common = min(len(d) for d in digests)
    differ = [i for i in range(common) if len({d[i] for d in digests}) != 1]
    if differ:
        raise SystemExit(f"the models saw different training batches (first at step {differ[0] + 1})")
    print(json.dumps({"budget": "cpu-minutes", "budget_min": args.budget_min, "crop": args.crop,
                      "batch_size": args.batch_size, "identical_batches": common, **results}))


if __name__ == "__main__":
    main()
