"""The README's and the model card's result tables and the bundle's ``eval_metrics``, from ``bench/results/*.json``.

Each document holds its tables between marker lines, ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
(NAME ``components``, ``train_consep``, ``encoders``, ``classifier`` or ``precision``); this script rewrites
what lies between them, so a quoted figure is always the one a benchmark recorded.

Usage: ``python bench/tables.py`` (rewrite) or ``python bench/tables.py --check`` (exit 1 when a document is
out of date, naming it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCUMENTS = (REPO / "README.md", REPO / "bundles" / "cellvta" / "docs" / "README.md")
METADATA = REPO / "bundles" / "cellvta" / "configs" / "metadata.json"
Result = dict[str, Any]


def _msda(r: Result) -> str:
    return (f"injector fwd ×{r['injector_b1_fwd_speedup']} (b1), fwd+bwd ×{r['injector_b1_fwdbwd_speedup']} (b1), "
            f"×{r['injector_b8_fwdbwd_speedup']} (b8); extractor fwd ×{r['extractor_b1_fwd_speedup']} (b1), "
            f"fwd+bwd ×{r['extractor_b1_fwdbwd_speedup']} (b1), ×{r['extractor_b8_fwdbwd_speedup']} (b8); "
            f"max abs diff {r['max_abs_diff_fwd']:.2g}")


def _model(r: Result) -> str:
    return (f"{r['precision']} {r['cellvta_l_b1_s']} s, fp32 {r['cellvta_l_b1_fp32_s']} s, CellViT-L "
            f"{r['cellvit_l_b1_s']} s; {r['params_total']:,} parameters ({r['params_trainable']:,} trainable); "
            f"{r['model_gflop']} GFLOP counted, roofline ratio {r['roofline_ratio']}; "
            f"max abs diff bf16 vs fp32 {r['max_abs_diff_bf16_vs_fp32']:.2g}")


def _data(r: Result) -> str:
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in r.items() if isinstance(v, (int, float)) and k != "n_samples"]
    return "; ".join(parts) + (f" ({r['n_samples']} samples)" if "n_samples" in r else "")


def _postprocess(r: Result) -> str:
    return (f"ours {r['ours_ms_per_tile']} ms per 256² tile vs MONAI {r['monai_ms_per_tile']} ms "
            f"(×{round(r['monai_ms_per_tile'] / r['ours_ms_per_tile'], 1)}); 1024² ours {r['ours_ms_1024']} ms vs "
            f"MONAI {r['monai_ms_1024']} ms (×{round(r['monai_ms_1024'] / r['ours_ms_1024'], 1)})")


def _metrics(r: Result) -> str:
    return (f"{r['pq_ms_per_tile']} ms per tile for the PQ family vs MONAI {r['monai_pq_ms_per_tile']} ms "
            f"(×{r['speedup_vs_monai']}); max diff {r['max_abs_diff_vs_monai']:.2g}")


def _wsi(r: Result) -> str:
    return (f"{r['cells']:,} nuclei, {r['duplicates']} duplicates, peak RSS {r['peak_rss_gb']} GB, "
            f"{r['tiles']:,} tiles at {r['tiles_per_s']} tiles/s, {r['cells_per_s']} nuclei/s, "
            f"GeoJSON {r['geojson_gb']} GB written ×{r['geojson_write_speedup']} faster than per-feature json.dumps "
            f"(write s: " + ", ".join(f"{k} {v}" for k, v in r["write_seconds"].items()) + ")")


def _encoders(r: Result) -> str:
    models = [k for k, v in r.items() if isinstance(v, dict) and "bpq" in v]
    cells = [f"{k} bPQ {r[k]['bpq']}, mPQ {r[k]['mpq']}, F1 {r[k]['detection_f1']}, {r[k]['s_per_step']} s/step"
             for k in models]
    return f"{r['budget_min']} {r['budget']} per model, {r['weights']}: " + "; ".join(cells)


def _classifier(r: Result) -> str:
    curve, best = r["curve"], r["best_source"]
    return (f"{r['network']}: head macro-F1 with all labels vit {curve['vit']['all']['macro_f1']}, decoder "
            f"{curve['decoder']['all']['macro_f1']}, pixel features {curve['pixel']['all']['macro_f1']}, the "
            f"network's type branch {r['type_branch']['macro_f1']}; {best} with 50 labels per class "
            f"{curve[best]['50']['macro_f1']}; head training on {r['head_training'][best]['cells']:,} cells "
            f"{r['head_training'][best]['wall_s']} s; default source {best}")


def _generic(r: Result) -> str:
    leaves = [f"{k} {v}" for k, v in r.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return "; ".join(leaves[:12])


RENDERERS: dict[str, tuple[str, Callable[[Result], str]]] = {
    "classifier": ("cell classifiers on frozen embeddings, CoNSeP nuclei", _classifier),
    "msda": ("compiled op / `grid_sample` reference, float32", _msda),
    "model": ("CellVTA-L (UNI preset), one 256² tile", _model),
    "data": ("training data chain, CoNSeP patches, samples/s", _data),
    "postprocess": ("HoVer-Net post-processing, 40 fixture tiles", _postprocess),
    "metrics": ("PQ family, 40 fixture pairs", _metrics),
    "wsi": ("whole slide, ground-truth oracle network", _wsi),
    "encoders": ("encoders under one decoder, CoNSeP, same CPU budget", _encoders),
    "encoders_loaded": ("the same command, an earlier run while other jobs loaded the machine", _encoders),
}


def load_results(results_dir: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """``{name: recorded entry}`` for every ``<name>.json`` in ``results_dir``."""
    entries = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            entries[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if "result" not in entries[path.stem]:
            raise ValueError(f"{path}: no 'result' key (write it with bench/record.py)")
    return entries


def _machine(entry: dict[str, Any]) -> str:
    machine = entry.get("machine", "")
    if isinstance(machine, dict):
        gpu = machine.get("gpu")
        return gpu or f"{machine.get('cpus', '?')} CPUs, load {machine.get('load_average_1min', '?')}"
    return str(machine).split(";")[0]


def components_table(entries: dict[str, dict[str, Any]]) -> str:
    """The table of every recorded benchmark except the training comparison, one row each."""
    rows = ["| benchmark | what | result | machine, date |", "|---|---|---|---|"]
    for name, entry in entries.items():
        if name == "train_consep" or name.startswith("precision"):
            continue
        what, render = RENDERERS.get(name, ("", _generic))
        script = next((w for w in entry.get("command", "").split() if w.endswith(".py")), f"bench/{name}.py")
        rows.append(f"| `{script}` | {what} | {render(entry['result'])} | "
                    f"{_machine(entry)}, {entry.get('date', '')} |")
    return "\n".join(rows)


def budget_table(entries: dict[str, dict[str, Any]], name: str, labels: dict[str, str],
                 columns: dict[str, str]) -> str:
    """Models trained for the same CPU budget (``bench/<name>.py``), one row each: the run's settings, then
    ``columns`` ({result key: heading}) of every model in ``labels`` ({result key: row label})."""
    entry = entries.get(name)
    if entry is None:
        return f"(no recorded run of `bench/{name}.py`)"
    r = entry["result"]
    weights = f", {r['weights']}" if "weights" in r else ""
    where = ", ".join(part for part in (_machine(entry), entry.get("date")) if part)
    rows = [f"`{entry.get('command', f'bench/{name}.py')}`: {r['budget_min']} {r['budget']} per model, "
            f"{r['crop']}² crops, batch {r['batch_size']}{weights}, {r['identical_batches']} identical batches; "
            f"{where}.", "",
            "| model | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label in labels.items():
        if key in r:
            rows.append(f"| {label} | " + " | ".join(str(r[key][c]) for c in columns) + " |")
    return "\n".join(rows)


SCORE_COLUMNS = {"bpq": "bPQ", "mpq": "mPQ", "dice": "Dice", "aji": "AJI"}


def train_consep_table(entries: dict[str, dict[str, Any]]) -> str:
    """CellVTA against MONAI HoVerNet on CoNSeP for the same CPU budget."""
    return budget_table(entries, "train_consep",
                        {"cellvta": "CellVTA (ViT-S/16 size, adapter)", "hovernet": "MONAI HoVerNet (fast)"},
                        {"params_m": "parameters (M)", "steps": "steps", **SCORE_COLUMNS})


def encoders_table(entries: dict[str, dict[str, Any]]) -> str:
    """Every encoder under the one decoder for the same CPU budget, one row each."""
    return budget_table(entries, "encoders", {
        "cellvta_vit_s": "CellVTA ViT-S/16 (adapter)",
        "cellvit_vit_s": "CellViT ViT-S/16 (no adapter)",
        "cellvit_sam_b": "CellViT-SAM-B",
        "cellvit_convnext_t": "ConvNeXt-T",
        "cellvit_swinv2_t": "Swin V2-T",
        "hovernet": "MONAI HoVerNet (fast)",
    }, {"params_m": "parameters (M)", "steps": "steps", "s_per_step": "CPU s/step", **SCORE_COLUMNS,
        "detection_f1": "detection F1"})


def eval_metrics(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``metadata.json``'s ``eval_metrics``: the bundle's own CellVTA scores on CoNSeP, saying what was measured."""
    entry = entries.get("train_consep")
    if entry is None:
        return {}
    r = entry["result"]
    m = r["cellvta"]
    return {
        "measured_on": (f"CoNSeP Train patches, validation tiles split by source tile ({m['val_tiles']} tiles of 256², "
                        f"40x); CellVTA with a randomly initialised ViT-S/16 trained for {r['budget_min']} "
                        f"{r['budget']} on CPU (bench/train_consep.py), not the paper's frozen-UNI setting"),
        "bpq": m["bpq"], "mpq": m["mpq"], "dice": m["dice"], "aji": m["aji"],
    }


def render_metadata(text: str, entries: dict[str, dict[str, Any]]) -> str:
    """``metadata.json``'s text with ``eval_metrics`` generated."""
    meta = json.loads(text)
    meta["eval_metrics"] = eval_metrics(entries)
    return json.dumps(meta, indent=4, ensure_ascii=False) + "\n"


def classifier_table(entries: dict[str, dict[str, Any]]) -> str:
    """The cell-classifier benchmark: macro-F1 per source and number of labels, the type branch, the costs."""
    entry = entries.get("classifier")
    if entry is None:
        return "(no recorded run of `bench/classifier.py`)"
    r = entry["result"]
    counts = list(r["curve"]["vit"])
    rows = [f"`{entry.get('command', 'bench/classifier.py')}`: {r['network']}; {r['patches_train']} train / "
            f"{r['patches_val']} validation patches ({r['cells_train']:,} / {r['cells_val']:,} nuclei, validation "
            f"nuclei per class {r['val_class_counts']}); {r['seeds']} seeds.", "",
            "| macro-F1 on validation-tile nuclei, mean ± sd | " + " | ".join(
                f"{c}/class" if c != "all" else "all" for c in counts) + " |",
            "|---|" + "---|" * len(counts)]
    for source, label in (("vit", "head on `vit` embeddings"), ("decoder", "head on `decoder` embeddings"),
                          ("pixel", "head on 18 pixel features")):
        pts = r["curve"][source]
        rows.append(f"| {label} | " + " | ".join(f"{pts[c]['macro_f1']:.3f} ± {pts[c]['macro_f1_sd']:.3f}"
                                                  for c in counts) + " |")
    rows.append("| the network's own type branch (no labels) | " + " | ".join(
        [""] * (len(counts) - 1) + [f"{r['type_branch']['macro_f1']:.3f}"]) + " |")
    ext, timing, goals = r["extraction"], r["head_training"], r["targets"]

    def yes(flags: dict) -> str:
        return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())

    rows += ["", f"Embedding extraction: {ext['patches']} patches through the whole network, "
             f"{ext['network_cpu_s_per_patch']} CPU-s per 256² patch ({ext['network_wall_s']} s wall in all; pixel "
             f"features {ext['pixel_cpu_s_per_patch']} CPU-s). Head training on "
             f"{timing['vit']['cells']:,} nuclei: " + "; ".join(
                 f"`{s}` {t['wall_s']} s wall / {t['cpu_s']} CPU-s ({t['epochs']} epochs)" for s, t in timing.items())
             + f". Targets: all-labels head ≥ type branch: {yes(goals['all_labels_head_ge_type_branch'])}; 50 "
             f"labels per class within {goals['margin']} of all: {yes(goals['labels_50_within_margin_of_all'])}; "
             f"head training ≤ {goals['train_s']} s: {yes(goals['head_training_within_s'])}."]
    return "\n".join(rows)


PRECISION_PATHS = {
    "cpu_bf16": "CPU bf16, the bundle's path (bf16 weights, float32 streams)",
    "cpu_bf16_autocast": "CPU bf16 autocast (the official code's)",
    "cpu_bf16_uniform": "CPU, everything in bf16",
    "cuda_fp16_autocast": "CUDA fp16 autocast",
    "cuda_bf16_autocast": "CUDA bf16 autocast",
}
PRECISION_COLUMNS = {"max_abs_diff_nuclei_prob": "max \\|Δ\\| nuclei prob.", "max_abs_diff_hv": "max \\|Δ\\| HV",
                     "type_argmax_agreement": "type argmax agreement", "bpq": "bPQ", "bpq_change": "bPQ change",
                     "max_tile_bpq_change": "max \\|bPQ change\\| of a tile", "speedup": "speed vs fp32"}


def precision_table(entries: dict[str, dict[str, Any]]) -> str:
    """Every fast inference path against float32 (``bench/precision.py``), one table per recorded run."""
    runs = {name: entry for name, entry in entries.items() if name.startswith("precision")}
    if not runs:
        return "(no recorded run of `bench/precision.py`)"
    rows: list[str] = []
    for entry in runs.values():
        r = entry["result"]
        native = "native bf16" if r["native_bf16"] else "no native bf16: bf16 is emulated, its speed means nothing"
        fp32 = r["paths"]["fp32"]
        rows += [f"`{entry.get('command', 'bench/precision.py')}`: {r['weights']}, {r['backbone']} backbone, "
                 f"{r['tiles']} CoNSeP tiles of {r['size']}², {r['device']} ({native}); float32 bPQ {fp32['bpq']}, "
                 f"{fp32['s_per_tile']} s per tile; {_machine(entry)}, {entry.get('date', '')}.", "",
                 "| path | " + " | ".join(PRECISION_COLUMNS.values()) + " |",
                 "|---" * (len(PRECISION_COLUMNS) + 1) + "|"]
        rows += [f"| {label} | " + " | ".join(str(r["paths"][key][c]) for c in PRECISION_COLUMNS) + " |"
                 for key, label in PRECISION_PATHS.items() if key in r["paths"]]
        rows.append("")
    return "\n".join(rows[:-1])


TABLES: dict[str, Callable[[dict[str, dict[str, Any]]], str]] = {
    "components": components_table,
    "train_consep": train_consep_table,
    "encoders": encoders_table,
    "classifier": classifier_table,
    "precision": precision_table,
}


def render(text: str, entries: dict[str, dict[str, Any]]) -> str:
    """``text`` with every marked table replaced by its generated content."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->)\n(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: f"{m.group(1)}\n{make(entries)}\n{m.group(2)}", text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report documents that are out of date")
    args = parser.parse_args()
    entries = load_results()
    stale = []
    for doc in (*DOCUMENTS, METADATA):
        text = doc.read_text()
        new = render_metadata(text, entries) if doc == METADATA else render(text, entries)
        if new != text:
            stale.append(doc)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("out of date (run python bench/tables.py): " + ", ".join(str(d.relative_to(REPO)) for d in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
