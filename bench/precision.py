"""Benchmark: how far each fast inference path is from float32, on realistic weights and real CoNSeP tiles.

The network is CellVTA with the official checkpoints' layout (class token outside the blocks, 0.5/0.5
normalisation), made realistic by ``realistic_weights.make_realistic`` (LayerScale ~0.1, biases, BatchNorm
calibrated on other CoNSeP patches). Paths, each against the same network in float32:

| path | what runs |
|---|---|
| ``cpu_bf16`` | the bundle's CPU path (``prepare_for_inference``): bf16 linear/conv weights, float32 residual streams |
| ``cpu_bf16_autocast`` | the official code's: float32 weights under ``torch.autocast("cpu", bfloat16)`` |
| ``cpu_bf16_uniform`` | every parameter and buffer in bf16 (the residual streams in bf16 too) |
| ``cuda_fp16_autocast`` / ``cuda_bf16_autocast`` | float32 weights under CUDA autocast (with ``--device cuda``) |

With ``--network`` a network trained by ``bench/encoders.py`` replaces the fixture (its PQ against the ground
truth means something; the fixture's is near 0). For each path: the max |difference| of the nuclei probability
and of the HV maps, the type-map argmax agreement, the binary PQ of the HoVer-Net post-processed instances
against the ground truth (mean over tiles) and its change from float32's, and the forward time per tile relative
to float32 (``speedup``). bf16 is fast on CPUs with native bf16 instructions (AVX512-BF16, AMX: ``native_bf16``);
elsewhere the CPU emulates it and the speedup says nothing about the path.

    python bench/precision.py [--backbone uni] [--tiles 8] [--device cpu|cuda]
    python bench/precision.py --network outputs/bench/encoders/cellvta_vit_s.pt

The last line is one JSON object, recorded in ``bench/results/precision[_trained][_cuda].json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT), str(ROOT / "bundles" / "cellvta")]

from realistic_weights import make_realistic  # noqa: E402
from record import record  # noqa: E402

from scripts.model.network import CellVTA  # noqa: E402
from scripts.model.precision import convert_to_low_precision, default_precision  # noqa: E402
from scripts.nuclei.metrics import panoptic_quality  # noqa: E402
from scripts.nuclei.postprocess_transforms import HoVerNetPostProcessing  # noqa: E402

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"
NUM_CLASSES = 5  # CoNSeP: background, other, inflammatory, epithelial, spindle-shaped
CALIBRATION_PATCHES = 16  # BatchNorm statistics from the last patches of the file, disjoint from the tiles


def consep(count: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` tiles spread over the CoNSeP patches and the calibration patches: uint8 ``(N, size, size, 3)``
    images and ``(N, size, size)`` instance maps of the tiles, then the calibration images."""
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    with np.load(CONSEP) as data:
        images, inst = data["images"], data["inst_map"]
    picked = np.linspace(0, len(images) - CALIBRATION_PATCHES - 1, count).astype(int)
    return images[picked, :size, :size], inst[picked, :size, :size], images[-CALIBRATION_PATCHES:, :size, :size]


def normalise(images: np.ndarray, network: nn.Module) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` with the network's mean and std."""
    mean = torch.as_tensor(network.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(network.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def realistic_network(backbone: str, calibration: np.ndarray, seed: int,
                      device: torch.device = torch.device("cpu"), vit_kwargs: dict | None = None) -> nn.Module:
    """CellVTA in the official layout (``vit_kwargs`` passed to the backbone) with realistic weights calibrated on
    the uint8 ``calibration`` images (float32, eval mode, on ``device``)."""
    torch.manual_seed(seed)
    network = CellVTA(backbone, num_nuclei_classes=NUM_CLASSES, num_tissue_classes=0, cls_through_blocks=False,
                      official_normalization=True, vit_kwargs=vit_kwargs, device=device)
    return make_realistic(network, normalise(calibration, network).to(device), seed=seed)


Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def paths(network: nn.Module, device: torch.device) -> dict[str, Forward]:
    """Every fast path of ``device`` and float32 (``fp32``), each a function of a float32 batch."""
    network = network.to(device).eval()
    if device.type == "cuda":
        def autocast(dtype: torch.dtype) -> Forward:
            def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
                with torch.autocast("cuda", dtype=dtype):
                    return network(x)
            return forward
        return {"fp32": network, "cuda_fp16_autocast": autocast(torch.float16),
                "cuda_bf16_autocast": autocast(torch.bfloat16)}
    bundle_path = copy.deepcopy(network)
    convert_to_low_precision(bundle_path, torch.bfloat16)
    uniform = copy.deepcopy(network).to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    def low(model: nn.Module) -> Forward:
        return lambda x: model(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))

    def autocast_cpu(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return network(x)

    return {"fp32": network, "cpu_bf16": low(bundle_path), "cpu_bf16_autocast": autocast_cpu,
            "cpu_bf16_uniform": low(uniform)}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run(forward: Forward, x: torch.Tensor, device: torch.device, batch_size: int) -> tuple[dict, float]:
    """Outputs (float32, on CPU) of every tile and the median forward seconds per tile (after a warm-up)."""
    outputs: list[dict[str, torch.Tensor]] = []
    times = []
    forward(x[:batch_size].to(device))
    for start in range(0, x.shape[0], batch_size):
        batch = x[start:start + batch_size].to(device)
        synchronise(device)
        began = time.perf_counter()
        out = forward(batch)
        synchronise(device)
        times.append((time.perf_counter() - began) / batch.shape[0])
        outputs.append({k: out[k].float().cpu() for k in ("nuclei_binary_map", "hv_map", "nuclei_type_map")})
    return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}, statistics.median(times)


def binary_pq(out: dict[str, torch.Tensor], inst: np.ndarray) -> list[float]:
    """Binary PQ of each tile's HoVer-Net post-processed instances against its ground truth ``(N, H, W)``."""
    post = HoVerNetPostProcessing(magnification=40)
    scores = []
    for i in range(inst.shape[0]):
        pred, _, _ = post(out["nuclei_binary_map"][i], out["hv_map"][i], None)
        scores.append(float(panoptic_quality(inst[i], np.asarray(pred[0]))[2]))
    return scores


def compare(reference: dict[str, torch.Tensor], fast: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |difference| of the nuclei probability and the HV maps, type-map argmax agreement."""
    def probability(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["nuclei_binary_map"].softmax(1)[:, 1]

    agreement = reference["nuclei_type_map"].argmax(1) == fast["nuclei_type_map"].argmax(1)
    return {
        "max_abs_diff_nuclei_prob": float(f"{(probability(fast) - probability(reference)).abs().max():.3g}"),
        "max_abs_diff_hv": float(f"{(fast['hv_map'] - reference['hv_map']).abs().max():.3g}"),
        "type_argmax_agreement": round(agreement.float().mean().item(), 5),
    }


def measure(network: nn.Module, images: np.ndarray, inst: np.ndarray, device: torch.device,
            batch_size: int) -> dict[str, dict]:
    """Every path of ``device`` against float32 on ``images`` with ground truth ``inst`` (module docstring)."""
    x = normalise(images, network)
    results: dict[str, dict] = {}
    reference = reference_seconds = reference_pq = None
    for name, forward in paths(network, device).items():
        out, seconds = run(forward, x, device, batch_size)
        pq = binary_pq(out, inst)
        if name == "fp32":
            reference, reference_seconds, reference_pq = out, seconds, pq
            results[name] = {"s_per_tile": round(seconds, 3), "bpq": round(statistics.mean(pq), 4)}
            continue
        results[name] = {
            **compare(reference, out),
            "bpq": round(statistics.mean(pq), 4),
            "bpq_change": round(statistics.mean(pq) - statistics.mean(reference_pq), 4),
            "max_tile_bpq_change": round(max(abs(a - b) for a, b in zip(pq, reference_pq)), 4),
            "s_per_tile": round(seconds, 3),
            "speedup": round(reference_seconds / seconds, 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="uni", help="the ViT preset (uni: CellVTA-L as released)")
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="tile side (CoNSeP patches are 256)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--network", type=Path, help="a network kept by bench/encoders.py (default: the fixture)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, inst, calibration = consep(args.tiles, args.size)
    if args.network is not None:
        from classifier import load_network  # scikit-learn-free machines (the GPU one) never need it

        network, checkpoint = load_network(args.network)
        weights, backbone = f"trained: {checkpoint['model']} ({args.network.name})", checkpoint["backbone"]
    else:
        network = realistic_network(args.backbone, calibration, args.seed)
        weights, backbone = f"realistic fixture (seed {args.seed})", args.backbone
    native_bf16 = device.type == "cuda" or default_precision(device) == torch.bfloat16
    result = {"weights": weights, "backbone": backbone, "tiles": args.tiles, "size": args.size,
              "device": str(device), "native_bf16": native_bf16,
              "paths": measure(network, images, inst, device, args.batch_size)}
    name = "precision" + ("_trained" if args.network is not None else "") + ("_cuda" if device.type == "cuda" else "")
    record(name, result)


if __name__ == "__main__":
    main()
