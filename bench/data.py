"""Throughput of the training data pipeline on the real CoNSeP patches.

Converts the patches into the bundle's layout (temporary folder), then measures samples per second of
the full training chain (read PNG + npz, augment, targets, normalise) through a DataLoader with 2
workers and in a single process. Peer: the same chain with MONAI's ``ComputeHoVerMaps`` computing
the HV targets, measured in the same run (interleaved rounds after a warm-up, best round kept).
Prints one JSON object as the last line.

    python bench/data.py [--n 432] [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import ComputeHoVerMaps

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bundles" / "cellvta")]

from scripts.data.datasets import dataset_list
from scripts.data.prepare import CONSEP_CLASSES, arrays
from scripts.data.transforms import NucleiTargetsd, hv_maps, train_transforms

from record import record

CONSEP = ROOT.parent / "shared" / "data" / "consep" / "consep_train.npz"


def loader_rate(data: list[dict], chain, workers: int, epochs: int, batch: int = 8) -> float:
    """Samples per second through a DataLoader, the first batch (worker start-up) excluded."""
    loader = DataLoader(
        Dataset(data, chain), batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    seen, start = 0, None
    for _ in range(epochs):
        for batch_data in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += batch_data["image"].shape[0]
    return seen / (time.perf_counter() - start)


def chain_rate(data: list[dict], chain, repeats: int = 1) -> float:
    """Samples per second of the chain called directly in this process."""
    start = time.perf_counter()
    for _ in range(repeats):
        for item in data:
            chain(item)
    return repeats * len(data) / (time.perf_counter() - start)


def monai_hv_chain():
    chain = train_transforms()
    for op in chain.transforms:
        if isinstance(op, NucleiTargetsd):
            op.hv = ComputeHoVerMaps()
    return chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=432, help="number of CoNSeP patches")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved single-process rounds (best kept)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    with tempfile.TemporaryDirectory() as tmp:
        with np.load(CONSEP) as z:
            np.savez(Path(tmp) / "tiles.npz", **{k: z[k][: args.n] for k in ("images", "inst_map", "type_map", "tile")})
        arrays(str(Path(tmp) / "tiles.npz"), str(Path(tmp) / "consep"), CONSEP_CLASSES, group_key="tile")
        data = dataset_list(Path(tmp) / "consep")
        ours, peer = train_transforms(), monai_hv_chain()
        ours.set_random_state(0)
        peer.set_random_state(0)
        subset = data[:48]
        for chain in (ours, peer):
            chain_rate(data[:16], chain)
        rates: dict[str, list[float]] = {"ours": [], "peer": []}
        for _ in range(args.rounds):
            rates["ours"].append(chain_rate(subset, ours))
            rates["peer"].append(chain_rate(subset, peer))
        single_ours, single_peer = max(rates["ours"]), max(rates["peer"])
        two_workers = loader_rate(data, train_transforms(), workers=2, epochs=args.epochs)
        with np.load(CONSEP) as z:
            inst = z["inst_map"][:64]
        t0 = time.perf_counter()
        for m in inst:
            hv_maps(m)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in inst:
            ComputeHoVerMaps()(m[None])
        t_monai = time.perf_counter() - t0
    result = {
        "samples_per_s": round(two_workers, 1),
        "workers": 2,
        "samples_per_s_single_process": round(single_ours, 1),
        "peer_single_process_monai_hv": round(single_peer, 1),
        "chain_speedup_vs_monai_hv": round(single_ours / single_peer, 2),
        "hv_target_speedup_vs_monai": round(t_monai / t_ours, 2),
        "n_samples": len(data),
    }
    record("data", result)


if __name__ == "__main__":
    main()
