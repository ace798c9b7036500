"""Benchmark: every GPU measurement of the CUDA path, in one run on one GPU.

1. ``build``: compile the CUDA kernels (timed) and run their first-use self-check.
2. ``parity``: the CUDA parity tests (``tests/test_cuda_msda.py``, ``tests/test_cuda_predictor.py``) and the op's
   CPU tests, by pytest.
3. ``msda``: the compiled op against the grid_sample reference at CellVTA's shapes (``bench/msda.py``'s
   injector and extractor), batch 1 and 32, forward and forward+backward (speedup = reference / compiled).
4. ``models``: CellVTA-L (UNI preset) and CellViT-L, random weights, 256x256 tiles: tiles/s and peak GPU
   memory at batch 1/16/64 in float32 (TF32 off), float16 and bfloat16 autocast, and the deviation of the
   half-precision outputs from float32 on real CoNSeP tiles (max |difference| of the nuclei probability and the
   HV maps, type-map argmax agreement).
5. ``precision``: ``bench/precision.py`` on realistic weights (LayerScale, biases, BatchNorm calibrated on mosaic
   tiles): deviation, argmax agreement and binary PQ change of fp16/bf16 autocast, and of the CPU paths
   (bundle's bf16, bf16 autocast, all-bf16) with their speedup where the host CPU has native bf16.
6. ``wsi``: the whole-slide pipeline (``scripts.slides.wsi.run_slide``) on a generated 8192x8192 pyramidal slide of
   repeated CoNSeP patches with ``--workers`` post-processing workers, run three ways: the real network in bf16
   autocast with post-processing fed the ground-truth maps of the mosaic (the GPU does all the network's work,
   the CPU post-processes realistic nuclei); the ground-truth oracle alone (what reading + post-processing can
   sustain); and the network alone on the same tiles (what the GPU can sustain). ``postprocessing_keeps_up`` when
   the pipeline reaches at least 90 % of the network-alone rate. GPU utilisation is sampled by nvidia-smi.

Each stage's errors are caught and recorded, so one failing stage does not lose the others. The result is printed
as one JSON object on the last line, written to ``bench/results/gpu.json`` and, when ``$OUT`` is set, copied
there with the pytest report; ``$OUT/gpu_stages.json`` holds the stages finished so far after each one.

The GPU machine has no internet and lacks MONAI (and may lack pytest, tifffile or shapely, or hold an older timm):
on a machine with internet first run ``python bench/gpu.py --prepare outputs/gpu_bundle`` (downloads the
pure-Python and small wheels for Python 3.12 and stores the CoNSeP mosaic, about 18 MB in all), then on the GPU
machine, with ``outputs/gpu_bundle`` carried, under the interpreter that holds its CUDA torch:

    python3 bench/gpu.py --bundle outputs/gpu_bundle

The kernels are compiled for the GPU present only (``TORCH_CUDA_ARCH_LIST`` is set to its compute capability).

Without a CUDA GPU it says so and exits with status 2. ``--smoke`` runs every stage on the CPU at small shapes
(ViT-T backbone, 512x512 slide) to check the script itself before GPU time is spent on it; it prints the JSON
object and records nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO), str(REPO / "bundles" / "cellvta")]

from record import record  # noqa: E402

# Wheels the GPU machine may lack: module name -> pinned requirement (the versions of the project's venv).
WHEELS = {
    "timm": "timm==1.0.31",
    "pytest": "pytest==9.2.0",
    "pluggy": "pluggy==1.7.0",
    "iniconfig": "iniconfig==2.3.1",
    "packaging": "packaging==26.4",
    "monai": "monai==1.6.1",
    "tifffile": "tifffile==2026.3.3",
    "tqdm": "tqdm==4.70.1",
    "shapely": "shapely==2.2.0",
}
# modules installed from the bundle also where the machine has them older than the project needs (requirements.txt)
MINIMUM_VERSIONS = {"timm": "1.0.20"}
WHEEL_PYTHON = "3.12"
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


@dataclass(frozen=True)
class Scale:
    """What a run measures: the GPU run's device and shapes, or the CPU smoke run's small ones."""

    device: str
    backbone: str  # of CellVTA and CellViT (``models``, ``precision``, ``wsi``)
    batches: tuple[int, ...]  # tiles per network call in ``models``
    precisions: tuple[str, ...]  # of ``models`` (keys of PRECISIONS)
    msda_batches: tuple[int, ...]
    slide_side: int  # pixels of the generated slide of ``wsi``
    tiles: int  # mosaic tiles compared in ``models`` and ``precision``
    calibration_tiles: int  # mosaic tiles calibrating the realistic weights' BatchNorm in ``precision``
    parity_tests: tuple[str, ...]
    wsi_precision: str  # of the network in ``wsi`` (a key of PRECISIONS)
    vit_kwargs: dict = field(default_factory=dict)


GPU_RUN = Scale("cuda", "uni", (1, 16, 64), ("fp32", "fp16", "bf16"), (1, 32), 8192, 16, 16,
                ("tests/test_cuda_msda.py", "tests/test_cuda_predictor.py", "tests/test_msda_op.py"), "bf16")
# CPUs without native bf16 emulate half precision (CellVTA's autocast forward ~50x slower than float32): the smoke
# run's models and whole-slide stages stay in float32, the precision stage still runs every CPU path once
SMOKE_RUN = Scale("cpu", "vit-t", (1, 2), ("fp32",), (1,), 512, 1, 2, ("tests/test_cuda_msda.py",), "fp32",
                  {"depth": 4})


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (in a container ``os.cpu_count``
    may report the host's)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def no_gpu_exit() -> None:
    """Say clearly that there is no GPU and exit with status 2."""
    print(
        "bench/gpu.py: no CUDA GPU is present on this machine (torch.cuda.is_available() is False, torch "
        f"{torch.__version__}, CUDA build {torch.version.cuda}); every measurement here needs one. Nothing was "
        "measured.",
        file=sys.stderr,
    )
    raise SystemExit(2)


# --- preparation (on a machine with internet) -------------------------------------------------------------------


def store_mosaic(bundle: Path) -> None:
    """The CoNSeP mosaic (``bench/wsi.py``) as ``bundle/mosaic.npz``."""
    from wsi import mosaic

    bundle.mkdir(parents=True, exist_ok=True)
    image, inst, types = mosaic()
    np.savez_compressed(bundle / "mosaic.npz", image=image, inst=inst, types=types)


def prepare(bundle: Path) -> None:
    """Download the wheels into ``bundle/wheels`` and store the CoNSeP mosaic as ``bundle/mosaic.npz``."""
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
         "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), *WHEELS.values()],
        check=True,
    )
    store_mosaic(bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"prepared {bundle} ({size / 2**20:.0f} MiB): carry it to the GPU machine and run "
          f"python3 bench/gpu.py --bundle {bundle}")


def distribution(requirement: str) -> str:
    """The normalised distribution name of a pinned requirement or a wheel file name (``Foo_Bar`` -> ``foo-bar``)."""
    return requirement.split("==")[0].split("-")[0].lower().replace("_", "-")


def needs_wheel(module: str) -> bool:
    """The interpreter lacks ``module``, or has it older than ``MINIMUM_VERSIONS`` asks."""
    if importlib.util.find_spec(module) is None:
        return True
    if module not in MINIMUM_VERSIONS:
        return False
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(distribution(WHEELS[module]))) < Version(MINIMUM_VERSIONS[module])


def install_bundle(bundle: Path) -> None:
    """Install the bundle's wheels the interpreter lacks (or has too old) into ``bundle/site``, first on the path."""
    missing = {distribution(WHEELS[module]) for module in WHEELS if needs_wheel(module)}
    site = bundle / "site"
    if missing:
        wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl") if distribution(w.name) in missing)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target",
                        str(site), *wheels], check=True, stdout=subprocess.DEVNULL)
    if site.is_dir():
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()


# --- timing ---------------------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` with ``device`` synchronised around each run."""
    from precision import synchronise

    for _ in range(warmup):
        fn()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- stages ---------------------------------------------------------------------------------------------------------


def stage_build(scale: Scale) -> dict:
    import custom_ops
    from custom_ops import build, selfcheck

    started = time.perf_counter()
    path = build.load_library()
    seconds = time.perf_counter() - started
    impl = custom_ops.implementation(scale.device)
    failure = build.cuda_build_failure()
    return {"library": Path(path).name, "build_s": round(seconds, 1), "implementation": impl,
            "cuda_build_failure": None if failure is None else str(failure),
            "self_check_failure": selfcheck.failure(scale.device), "nvcc": nvcc_version()}


def nvcc_version() -> str | None:
    """The last line of ``nvcc --version`` of the toolkit the build uses (None without one)."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "") / "bin" / "nvcc"
    if CUDA_HOME is None or not nvcc.is_file():
        return None
    lines = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return lines[-1] if lines else None


def stage_parity(scale: Scale, out: Path | None) -> dict:
    report = Path(tempfile.mkdtemp()) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               *scale.parity_tests, f"--junitxml={report}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=480)
    log = result.stdout + result.stderr
    if out is not None:
        (out / "parity_pytest.log").write_text(log)
        if report.is_file():
            shutil.copy(report, out / "parity_junit.xml")
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed[:20], "exit_code": result.returncode, "seconds": round(time.perf_counter() - started, 1)}


def stage_msda(scale: Scale, repeats: int) -> dict:
    import msda
    from custom_ops import ms_deform_attn, ms_deform_attn_reference

    os.environ["CELLVTA_MSDA_IMPL"] = "compiled"
    device = torch.device(scale.device)
    generator = torch.Generator().manual_seed(0)
    result: dict[str, float] = {}
    max_diff = 0.0
    for case in msda.CASES:
        for batch in scale.msda_batches:
            inputs = tuple(t.to(device) for t in msda.make_inputs(case, batch, generator))
            with torch.no_grad():
                out = ms_deform_attn(*inputs)
                max_diff = max(max_diff, (out - ms_deform_attn_reference(*inputs)).abs().max().item())
            grad = torch.randn(out.shape, generator=generator).to(device)
            for mode in ("fwd", "fwdbwd"):
                times = {}
                for name, fn in (("compiled", ms_deform_attn), ("reference", ms_deform_attn_reference)):
                    run = msda.fwd_only(fn, inputs) if mode == "fwd" else msda.fwd_bwd(fn, inputs, grad)
                    times[name] = median_seconds(run, device, repeats)
                key = f"{case}_b{batch}_{mode}"
                result[f"{key}_compiled_ms"] = round(times["compiled"] * 1e3, 3)
                result[f"{key}_reference_ms"] = round(times["reference"] * 1e3, 3)
                result[f"{key}_speedup"] = round(times["reference"] / times["compiled"], 2)
    result["max_abs_diff_fwd"] = float(f"{max_diff:.3g}")
    result["min_speedup"] = min(v for k, v in result.items() if k.endswith("_speedup"))
    return result


def load_mosaic(bundle: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundle's ``(2048, 2048, 3)`` CoNSeP mosaic, its instance ids and its types (``store_mosaic``)."""
    if bundle is None or not (bundle / "mosaic.npz").is_file():
        raise FileNotFoundError("the CoNSeP mosaic is absent: run with --bundle (see the module docstring)")
    with np.load(bundle / "mosaic.npz") as data:
        return data["image"], data["inst"], data["types"]


def split_tiles(a: np.ndarray) -> np.ndarray:
    """A ``(2048, 2048, ...)`` mosaic map as its 64 tiles ``(64, 256, 256, ...)``, row by row."""
    return np.stack([a[y:y + 256, x:x + 256] for y in range(0, 2048, 256) for x in range(0, 2048, 256)])


def mosaic_tiles(bundle: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The mosaic's 64 real 256x256 CoNSeP tiles: uint8 ``(64, 256, 256, 3)`` and instance maps ``(64, 256, 256)``."""
    image, inst, _ = load_mosaic(bundle)
    return split_tiles(image), split_tiles(inst)


def stage_models(scale: Scale, bundle: Path | None, repeats: int) -> dict:
    from precision import compare, normalise
    from scripts.model.network import CellVTA, CellViT

    os.environ["CELLVTA_MSDA_IMPL"] = "compiled"
    device = torch.device(scale.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    real = mosaic_tiles(bundle)[0][:scale.tiles]
    result: dict[str, dict] = {}
    for name, cls in (("cellvta", CellVTA), ("cellvit", CellViT)):
        torch.manual_seed(0)
        network = cls(scale.backbone, num_nuclei_classes=len(CLASSES), num_tissue_classes=19,
                      vit_kwargs=scale.vit_kwargs, device=device).eval()
        entry: dict[str, dict] = {"backbone": scale.backbone}
        x_real = normalise(real, network).to(device)
        outputs = {}
        for precision in scale.precisions:
            dtype = PRECISIONS[precision]
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                outputs[precision] = {k: v.float() for k, v in network(x_real).items()}
                for batch in scale.batches:
                    x = x_real.repeat(-(-batch // len(x_real)), 1, 1, 1)[:batch].contiguous()
                    reset_peak_memory(device)
                    seconds = median_seconds(lambda: network(x), device, repeats)
                    entry[f"{precision}_b{batch}"] = {"tiles_per_s": round(batch / seconds, 1),
                                                      "peak_gpu_gb": peak_memory_gb(device)}
        for precision in [p for p in scale.precisions if p != "fp32"]:
            entry[f"{precision}_vs_fp32"] = compare(outputs["fp32"], outputs[precision])
        result[name] = entry
    return result


def stage_precision(scale: Scale, bundle: Path | None) -> dict:
    """``bench/precision.py``'s measurement of CellVTA (the run's backbone, realistic weights calibrated on the
    mosaic's last ``scale.calibration_tiles`` tiles) on its first ``scale.tiles``: the device's fast paths (CUDA
    fp16/bf16 autocast), and the CPU paths where the host CPU has native bf16."""
    from precision import measure, realistic_network
    from scripts.model.precision import default_precision

    os.environ["CELLVTA_MSDA_IMPL"] = "compiled"
    device = torch.device(scale.device)
    images, inst = mosaic_tiles(bundle)
    network = realistic_network(scale.backbone, images[-scale.calibration_tiles:], seed=0, device=device,
                                vit_kwargs=scale.vit_kwargs)
    result = {"weights": "realistic fixture (seed 0)", "backbone": scale.backbone, "tiles": scale.tiles,
              device.type: measure(network, images[:scale.tiles], inst[:scale.tiles], device, batch_size=8)}
    cpu = torch.device("cpu")
    if device == cpu:
        return result
    if default_precision(cpu) == torch.bfloat16:
        torch.set_num_threads(usable_cpus())
        result["cpu"] = measure(network.to(cpu), images[:4], inst[:4], cpu, batch_size=1)
    else:
        result["cpu"] = "the host CPU has no native bf16 instructions: not measured"
    return result


class GPUUtilisation:
    """Samples ``nvidia-smi`` GPU utilisation (percent) every 0.5 s while in use; ``mean`` afterwards."""

    def __enter__(self) -> GPUUtilisation:
        self.samples: list[float] = []
        self.process = None
        if shutil.which("nvidia-smi"):
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "500"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            text, _ = self.process.communicate(timeout=10)
            self.samples = [float(s) for s in text.split() if s.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


class NetworkThenOracle:
    """The real network runs on every tile batch (GPU work, maps copied back); post-processing gets the mosaic's
    ground-truth maps for the same tiles, so the CPU load is that of real nuclei whatever the random weights give."""

    def __init__(self, network_predictor, oracle) -> None:
        self.network_predictor, self.oracle = network_predictor, oracle
        self.num_classes = oracle.num_classes

    def __call__(self, tiles: np.ndarray, origins: np.ndarray):
        self.network_predictor(tiles, origins)
        return self.oracle(tiles, origins)


def stage_wsi(scale: Scale, bundle: Path | None, workers: int, batch_size: int, repeats: int) -> dict:
    from scripts.model.network import CellVTA
    from scripts.slides.predictors import NetworkPredictor
    from scripts.slides.pyramid import PeriodicImage, write_pyramidal_tiff
    from scripts.slides.wsi import WSISettings, postprocess_pool, run_slide
    from tests.oracle import GroundTruthPredictor

    image, inst, types = load_mosaic(bundle)
    device = torch.device(scale.device)
    work = Path(tempfile.mkdtemp(prefix="cellvta_gpu_wsi_"))
    slide = work / f"consep_{scale.slide_side}.tif"
    write_pyramidal_tiff(slide, PeriodicImage(image, scale.slide_side, scale.slide_side), mpp=0.25,
                         compression="deflate")
    torch.manual_seed(0)
    network = CellVTA(scale.backbone, num_nuclei_classes=len(CLASSES), num_tissue_classes=19,
                      vit_kwargs=scale.vit_kwargs, device=device)
    dtype = PRECISIONS[scale.wsi_precision] or torch.float32
    network_predictor = NetworkPredictor(network, device, len(CLASSES), dtype=dtype)
    oracle = GroundTruthPredictor(inst, types, len(CLASSES), periodic=True)
    settings = WSISettings(postprocess_workers=workers, batch_size=batch_size, chunk_tiles=256,
                           read_threads=4)
    pool = postprocess_pool(workers)
    result: dict[str, float | int | bool | None] = {"slide_px": scale.slide_side, "workers": workers,
                                                    "batch_size": batch_size, "precision": scale.wsi_precision}
    tiles = split_tiles(image)[:batch_size]
    origins = np.zeros((batch_size, 2), dtype=np.int64)
    try:
        # timed runs start warm: the GPU's kernels and plans loaded, every worker spawned and its imports done
        network_predictor(tiles, origins)
        if pool is not None:
            list(pool.map(time.sleep, [1.0] * workers))
        runs = {"pipeline": NetworkThenOracle(network_predictor, oracle), "oracle_only": oracle}
        for name, predictor in runs.items():
            with GPUUtilisation() as util:
                started = time.perf_counter()
                summary = run_slide(slide, work / name, predictor, CLASSES, settings, predictor_id=name, pool=pool)
                wall = time.perf_counter() - started
            result["tiles"] = summary["tiles"]
            result[f"{name}_tiles_per_s"] = round(summary["tiles"] / wall, 1)
            result[f"{name}_writing_s"] = round(sum(summary["write_seconds"].values()), 2)
            result[f"{name}_gpu_util_percent"] = util.mean
            if name == "pipeline":
                result["cells"] = summary.get("cells")
    finally:
        if pool is not None:
            pool.shutdown()
    seconds = median_seconds(lambda: network_predictor(tiles, origins), device, repeats)
    result["network_only_tiles_per_s"] = round(batch_size / seconds, 1)
    result["postprocessing_keeps_up"] = result["pipeline_tiles_per_s"] >= 0.9 * result["network_only_tiles_per_s"]
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="download the wheels and store the mosaic into this folder")
    parser.add_argument("--bundle", type=Path, help="the folder made by --prepare")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--workers", type=int, default=max(8, usable_cpus() - 4),
                        help="whole-slide post-processing workers")
    parser.add_argument("--wsi-batch", type=int, default=32, help="tiles per network call in the whole-slide run")
    parser.add_argument("--stages", default="build,parity,msda,models,precision,wsi",
                        help="comma-separated stages to run")
    parser.add_argument("--smoke", action="store_true",
                        help="every stage on the CPU at small shapes, recording nothing (checks the script)")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.smoke:
        scale, repeats, workers, wsi_batch = SMOKE_RUN, 1, 2, 4
        args.bundle = args.bundle or Path(tempfile.mkdtemp(prefix="cellvta_gpu_smoke_"))
        if not (args.bundle / "mosaic.npz").is_file():
            store_mosaic(args.bundle)
    else:
        if not torch.cuda.is_available():
            no_gpu_exit()
        scale, repeats, workers, wsi_batch = GPU_RUN, args.repeats, args.workers, args.wsi_batch
    if args.bundle:
        install_bundle(args.bundle)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    result: dict = {"device": torch.cuda.get_device_name() if scale.device == "cuda" else "cpu (smoke run)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": usable_cpus()}
    if scale.device == "cuda":  # the kernels are built for this GPU only, whatever architectures the image lists
        os.environ["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        result["cuda_arch"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    stages = {
        "build": lambda: stage_build(scale),
        "parity": lambda: stage_parity(scale, out),
        "msda": lambda: stage_msda(scale, repeats),
        "models": lambda: stage_models(scale, args.bundle, repeats),
        "precision": lambda: stage_precision(scale, args.bundle),
        "wsi": lambda: stage_wsi(scale, args.bundle, workers, wsi_batch, repeats),
    }
    for name in args.stages.split(","):
        started = time.perf_counter()
        try:
            result[name] = stages[name]()
        except Exception as exc:  # one failing stage must not lose the others' numbers
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"stage {name} ({time.perf_counter() - started:.0f} s): {json.dumps(result[name])}", flush=True)
        if out is not None:  # what a run stopped by its time limit had measured still comes back
            (out / "gpu_stages.json").write_text(json.dumps(result, indent=1))
    if args.smoke:
        print(json.dumps(result), flush=True)
        return
    path = record("gpu", result)
    if out is not None:
        shutil.copy(path, out / path.name)


if __name__ == "__main__":
    main()
