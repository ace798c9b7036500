"""Benchmark: CPU forward time per 256x256 tile of CellVTA-L (UNI preset) and CellViT-L.

In one process and at 2 threads it measures, for batch 1 in inference mode with the compiled
MSDA op: the forward time of both models in float32 and in the CPU's default inference
precision (bfloat16 weights, channels-last, where the CPU has bf16 instructions; median of
``--repeats`` runs after a warm-up), the model's FLOPs (``torch.utils.flop_counter``) and the
machine's matmul throughput at the same precisions (a 4096² matmul). roofline_ratio =
time × matmul throughput / model FLOPs for the default precision (1 means as fast as a model
made only of large matmuls would run).

Usage: ``python bench/model.py [--repeats 5] [--counts-only]``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bundles" / "cellvta")]

from scripts.model.network import CellVTA, CellViT  # noqa: E402
from scripts.model.precision import prepare_for_inference  # noqa: E402

from record import record


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(4096, 4096, dtype=dtype)
    b = torch.randn(4096, 4096, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats)
    return 2 * 4096**3 / seconds / 1e9


def forward_fn(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts-only", action="store_true", help="print the parameter counts only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    cellvta = CellVTA("uni", num_nuclei_classes=6, num_tissue_classes=19, device="meta" if args.counts_only else None)
    total = sum(p.numel() for p in cellvta.parameters())
    trainable = sum(p.numel() for p in cellvta.parameters() if p.requires_grad)
    if args.counts_only:
        record("model_counts", {"params_total": total, "params_trainable": trainable})
        return

    cellvta.eval()
    cellvit = CellViT("uni", num_nuclei_classes=6, num_tissue_classes=19).eval()
    x = torch.randn(1, 3, 256, 256)

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        reference = cellvta(x)
    gflop = counter.get_total_flops() / 1e9
    fp32_s = median_time(forward_fn(cellvta, x), args.repeats)

    cpu = torch.device("cpu")
    dtype = prepare_for_inference(cellvta, cpu)
    prepare_for_inference(cellvit, cpu)
    x_low = x.to(dtype=dtype, memory_format=torch.channels_last)
    times = {
        "cellvta_l_b1_s": median_time(forward_fn(cellvta, x_low), args.repeats),
        "cellvit_l_b1_s": median_time(forward_fn(cellvit, x_low), args.repeats),
        "cellvta_l_b1_fp32_s": fp32_s,
    }
    throughput = matmul_gflops(dtype, args.repeats)
    with torch.inference_mode():
        low = cellvta(x_low)
    diff = max((low[k].float() - reference[k]).abs().max().item()
               for k in ("nuclei_binary_map", "hv_map", "nuclei_type_map"))
    for name, seconds in times.items():
        print(f"{name}: {seconds:.3f} s")
    record("model", {
        "params_total": total,
        "params_trainable": trainable,
        "model_gflop": round(gflop, 1),
        "precision": {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
        "matmul_gflops": round(throughput, 1),
        **{k: round(v, 3) for k, v in times.items()},
        "roofline_ratio": round(times["cellvta_l_b1_s"] * throughput / gflop, 3),
        "max_abs_diff_bf16_vs_fp32": round(diff, 5),
    })


if __name__ == "__main__":
    main()
