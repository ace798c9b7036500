"""Encoders compared under one decoder: CellVTA, CellViT, CellViT-SAM, ConvNeXt, Swin V2, and MONAI's HoVerNet.

Data: the CoNSeP Train patches (256x256, 40x) of ``../shared/data``, split by source tile (about 20% of the
tiles for validation, seeded), as ``bench/train_consep.py``. Every bundle model has the same HoVer-Net decoder
(``scripts.model.network``), the same loss (the bundle's CellVTA loss without the tissue term), the same
optimiser (AdamW lr 3e-4, betas 0.85/0.95, weight decay 1e-4, ExponentialLR 0.85 per epoch), the same batches
(random ``--crop`` squares through the bundle's augmentation chain, same seeds: checked by SHA-1) and the same
post-processing (HoVer-Net, 40x) and metrics on the full validation tiles. MONAI's HoVerNet (fast mode) is the
field's baseline, with MONAI's loss and lr 1e-4 (``bench/train_consep.py``'s ``HoVerNetAnySize``).

Every encoder is randomly initialised and trains (``freeze=full``): no pretrained weights can be downloaded on
this machine, so the table compares architectures from scratch, not foundation models.

| model | encoder |
|---|---|
| ``cellvta_vit_s`` | ViT-S/16 + the adapter (CellVTA) |
| ``cellvit_vit_s`` | ViT-S/16, skips from its quarter blocks (CellViT: the adapter ablation) |
| ``cellvit_sam_b`` | SAM ViT-B image encoder, skips from its quarter blocks (CellViT-SAM-B) |
| ``cellvit_convnext_t`` | ConvNeXt-T stages at strides 4-32 |
| ``cellvit_swinv2_t`` | Swin V2-T stages at strides 4-32 |
| ``hovernet`` | MONAI HoVerNet (fast) |

Budget: CPU time per model (``time.process_time()`` of its own process, data loading included), checked
before every step; ``--jobs`` models train at once, ``--threads`` torch threads each.

Nothing is lost: ``--work-dir`` (default ``outputs/bench/encoders``) keeps the dataset split, each finished
model's result (``<model>.json``) and trained weights (``<model>.pt``, with the validation file names); a rerun
with the same settings reuses them and trains only the models still missing. ``bench/classifier.py --network``
reuses a trained network from there.

    python bench/encoders.py                                                    # 20 CPU-minutes per model
    python bench/encoders.py --budget-min 0.25 --max-val 4 --crop 64 --batch-size 2   # a CPU smoke run (minutes)

The last line of stdout is one JSON object: per model ``bpq, mpq, dice, aji, detection_f1, params_m, steps,
s_per_step`` (CPU seconds), and ``ratios`` of each model's bPQ and mPQ to the strongest model's; it is
kept in ``bench/results/encoders.json`` with the command and the machine (``bench/record.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT), str(ROOT / "bundles" / "cellvta")]

from record import record  # noqa: E402
from train_consep import (  # noqa: E402
    HoVerNetAnySize, cellvta_loss, check_hovernet_forward, crop_transforms, hovernet_loss, prepare_consep, train,
)

from scripts.data.datasets import dataset_list, read_info  # noqa: E402
from scripts.files import atomic_path, write_text_atomic  # noqa: E402
from scripts.data.sampling import CellTissueSampler  # noqa: E402
from scripts.data.transforms import IMAGE_KEY, val_transforms  # noqa: E402
from scripts.model.backbones import image_statistics  # noqa: E402
from scripts.model.network import CellVTA, CellViT  # noqa: E402
from scripts.nuclei.metrics import evaluate_image, summarize  # noqa: E402
from scripts.nuclei.postprocess_transforms import HoVerNetPostProcessing  # noqa: E402

MODELS = {  # name -> (network class, backbone); None: MONAI's HoVerNet
    "cellvta_vit_s": (CellVTA, "vit-s"),
    "cellvit_vit_s": (CellViT, "vit-s"),
    "cellvit_sam_b": (CellViT, "sam-b"),
    "cellvit_convnext_t": (CellViT, "convnext-t"),
    "cellvit_swinv2_t": (CellViT, "swinv2-t"),
    "hovernet": None,
}
SCORE_KEYS = ("bpq", "mpq", "dice", "aji", "detection_f1")
DETECTION_RADIUS_PX = 12  # 3 um at 40x


@torch.no_grad()
def score(net: torch.nn.Module, loader: DataLoader, num_classes: int) -> dict[str, float]:
    """Post-process every full validation tile and score it (bPQ, per-image mPQ, Dice, AJI, detection F1)."""
    net.eval()
    post = HoVerNetPostProcessing(magnification=40)
    scores = []
    for batch in loader:
        out = net(batch[IMAGE_KEY])
        for i in range(batch[IMAGE_KEY].shape[0]):
            inst, types, _ = post(out["nuclei_binary_map"][i], out["hv_map"][i], out["nuclei_type_map"][i].softmax(0))
            scores.append(evaluate_image(batch["inst_map"][i, 0].numpy(), batch["nuclei_type_map"][i, 0].numpy(),
                                         inst[0], types[0], num_classes, detection_radius_px=DETECTION_RADIUS_PX))
    s = summarize(scores, num_classes)
    return {k: round(float(s[k]), 4) for k in SCORE_KEYS}


def build(name: str, num_classes: int, seed: int):
    """The network, its loss, its learning rate and its image statistics."""
    torch.manual_seed(seed)
    if MODELS[name] is None:
        net = HoVerNetAnySize(num_classes)
        check_hovernet_forward(net)
        return net, hovernet_loss(num_classes), 1e-4, image_statistics("vit-s")
    cls, backbone = MODELS[name]
    net = cls(backbone, num_nuclei_classes=num_classes, num_tissue_classes=0, freeze="full")
    return net, cellvta_loss(), 3e-4, image_statistics(backbone)


def settings(args: argparse.Namespace) -> dict:
    """The arguments that change a model's result: a kept result is reused only under the same ones."""
    return {k: getattr(args, k) for k in ("budget_min", "batch_size", "crop", "threads", "max_val", "seed")}


def run_model(name: str, args: argparse.Namespace, data_dir: str, work_dir: str) -> None:
    """Train and score one model in this process; keep its weights and its result in ``work_dir``."""
    torch.set_num_threads(args.threads)
    info = read_info(data_dir)
    net, loss_fn, lr, (mean, std) = build(name, info.num_classes, args.seed)
    train_data, val_data = dataset_list(data_dir, "train"), dataset_list(data_dir, "val")
    if args.max_val:
        val_data = val_data[: args.max_val]
    torch.manual_seed(args.seed)
    sampler = CellTissueSampler(train_data, gamma=0.85, seed=args.seed)
    loader = DataLoader(Dataset(train_data, crop_transforms(mean, std, args.crop)), batch_size=args.batch_size,
                        sampler=sampler, num_workers=0)
    val_loader = DataLoader(Dataset(val_data, val_transforms(mean, std)), batch_size=1, num_workers=0)
    trained = train(net, loss_fn, loader, args.budget_min * 60.0, lr, name)
    cpu0 = time.process_time()
    result = {**score(net, val_loader, info.num_classes), **trained,
              "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
              "s_per_step": round(trained["train_cpu_min"] * 60 / max(trained["steps"], 1), 2),
              "val_tiles": len(val_data), "eval_cpu_min": round((time.process_time() - cpu0) / 60, 2)}
    print(f"{name}: { {k: v for k, v in result.items() if k != 'batch_sha1'} }", file=sys.stderr, flush=True)
    work = Path(work_dir)
    with atomic_path(work / f"{name}.pt") as tmp:
        torch.save({"state_dict": net.state_dict(), "model": name, "backbone": (MODELS[name] or (None, None))[1],
                    "num_classes": info.num_classes, "val_files": [Path(d[IMAGE_KEY]).name for d in val_data],
                    "settings": settings(args)}, tmp)
    write_text_atomic(work / f"{name}.json", json.dumps({"settings": settings(args), "result": result}))


def kept_result(work_dir: Path, name: str, args: argparse.Namespace) -> dict | None:
    """A model's result kept by an earlier run with the same settings, or None."""
    path = work_dir / f"{name}.json"
    if not path.is_file() or not (work_dir / f"{name}.pt").is_file():
        return None
    kept = json.loads(path.read_text())
    return kept["result"] if kept["settings"] == settings(args) else None


def run_all(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Every model in its own process, ``args.jobs`` at a time; per-model failures are reported at the end."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = {n: r for n in names if (r := kept_result(work, n, args)) is not None}
    if results:
        print(f"reusing the kept results of {sorted(results)} from {work}", file=sys.stderr)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(prepare_consep(Path(tmp), args.seed))
        ctx = mp.get_context("spawn")
        pending = [n for n in names if n not in results]
        while pending:
            group, pending = pending[: args.jobs], pending[args.jobs:]
            procs = {n: ctx.Process(target=run_model, args=(n, args, data_dir, str(work))) for n in group}
            for p in procs.values():
                p.start()
            for n, p in procs.items():
                p.join()
                if p.exitcode != 0:
                    failed.append(f"{n} (exit code {p.exitcode})")
                else:
                    results[n] = kept_result(work, n, args)
    if failed:
        raise SystemExit(f"training failed: {', '.join(failed)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=20.0, help="training CPU minutes per model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128, help="side of the random training crops (multiple of 32)")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    parser.add_argument("--max-val", type=int, default=0, help="score only the first N validation tiles (0: all)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the models")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench" / "encoders"),
                        help="kept per-model results and trained weights (reused by a rerun with the same settings)")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    if args.crop % 32 or not 32 <= args.crop <= 256:
        parser.error(f"--crop {args.crop}: must be a multiple of 32 between 32 and 256")
    results = run_all(args, names)
    digests = [results[n].pop("batch_sha1") for n in names]
    common = min(len(d) for d in digests)
    if any(len({d[i] for d in digests}) != 1 for i in range(common)):
        raise SystemExit("the models saw different training batches")
    best = max(names, key=lambda n: results[n]["bpq"])
    ratios = {n: {k: round(results[n][k] / results[best][k], 3) if results[best][k] else None for k in ("bpq", "mpq")}
              for n in names}
    summary = {"budget": "cpu-minutes", "budget_min": args.budget_min, "crop": args.crop,
               "batch_size": args.batch_size, "max_val": args.max_val, "weights": "random initialisation",
               "identical_batches": common, "strongest": best, "ratios": ratios, **results}
    record("encoders", summary)


if __name__ == "__main__":
    main()
