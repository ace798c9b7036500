"""Benchmark: compiled MSDA kernels against the grid_sample reference at CellVTA's shapes.

Shapes for a 256x256 input (bundles/cellvta/docs/architecture.md, "Deformable-attention inputs"), 8 heads x 64
channels, 4 points: injector = 256 queries over levels 64², 32², 16² (5376 values); extractor = 5376 queries over
one 16² level. Both implementations run in the same process on 2 threads, float32, their
runs interleaved; each time is the median of ``--repeats`` runs after warm-up.

Prints one line per case and, last, one JSON object of speedups (reference time / compiled
time) and the largest forward difference.

Usage: ``python bench/msda.py [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom_ops import implementation, ms_deform_attn, ms_deform_attn_reference  # noqa: E402

from record import record

HEADS, HEAD_DIM, POINTS = 8, 64, 4
CASES = {
    "injector": {"queries": (16, 16), "levels": [(64, 64), (32, 32), (16, 16)]},
    "extractor": {"queries": None, "levels": [(16, 16)]},
}


def reference_points(grids: list[tuple[int, int]]) -> torch.Tensor:
    """Cell centres of row-major grids, concatenated: ``(sum H*W, 2)`` as ``(x, y)``."""
    points = []
    for h, w in grids:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)


def make_inputs(case: str, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Inputs as MSDeformAttn builds them: reference points plus offsets of a few pixels, softmax weights."""
    levels, queries = CASES[case]["levels"], CASES[case]["queries"]
    # the extractor's queries are the adapter's spatial tokens at the injector's three levels
    query_grids = [queries] if queries else CASES["injector"]["levels"]
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    ref = reference_points(query_grids)  # (Lq, 2)
    lq, n_levels = ref.shape[0], len(levels)
    value = torch.randn(batch, int(sizes.sum()), HEADS, HEAD_DIM, generator=generator)
    offsets = 2.0 * torch.randn(batch, lq, HEADS, n_levels, POINTS, 2, generator=generator)
    normaliser = shapes.flip(-1).to(torch.float32)  # (W, H)
    locations = ref[None, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    logits = torch.randn(batch, lq, HEADS, n_levels * POINTS, generator=generator)
    weights = logits.softmax(-1).view(batch, lq, HEADS, n_levels, POINTS)
    return value, shapes, starts, locations, weights


def fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> Callable[[], None]:
    """A closure running forward and backward to value, locations and weights."""
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]

    def run() -> None:
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad)

    return run


def fwd_only(fn: Callable, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(*inputs)

    return run


def interleaved_medians(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each closure, timed in alternation so machine noise hits both alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if implementation("cpu") != "compiled":
        raise SystemExit("bench/msda.py: the compiled MSDA kernels are not available (see the warning above)")
    generator = torch.Generator().manual_seed(0)
    result: dict[str, float] = {}
    max_diff = 0.0
    for case in CASES:
        for batch in (1, 8):
            inputs = make_inputs(case, batch, generator)
            with torch.no_grad():
                out = ms_deform_attn(*inputs)
                max_diff = max(max_diff, (out - ms_deform_attn_reference(*inputs)).abs().max().item())
            grad = torch.randn(out.shape, generator=generator)
            modes = {"fwd": lambda fn: fwd_only(fn, inputs), "fwdbwd": lambda fn: fwd_bwd(fn, inputs, grad)}
            for mode, wrap in modes.items():
                med = interleaved_medians(
                    {"compiled": wrap(ms_deform_attn), "reference": wrap(ms_deform_attn_reference)}, args.repeats
                )
                speedup = med["reference"] / med["compiled"]
                result[f"{case}_b{batch}_{mode}_speedup"] = round(speedup, 2)
                print(
                    f"{case} batch {batch} {mode}: compiled {med['compiled'] * 1e3:.2f} ms, "
                    f"reference {med['reference'] * 1e3:.2f} ms, speedup {speedup:.2f}"
                )
    keys = [
        "injector_b1_fwd_speedup",
        "injector_b1_fwdbwd_speedup",
        "injector_b8_fwdbwd_speedup",
        "extractor_b1_fwd_speedup",
        "extractor_b1_fwdbwd_speedup",
        "extractor_b8_fwdbwd_speedup",
    ]
    summary = {key: result[key] for key in keys}
    summary["max_abs_diff_fwd"] = float(f"{max_diff:.3g}")
    record("msda", summary)


if __name__ == "__main__":
    main()
