"""Every benchmark ends the same way: its result printed as the last line and kept in ``bench/results/<name>.json``.

The recorded file holds the command that produced it, when and on what machine, and the result itself; the
README's and the model card's result tables are generated from these files (``bench/tables.py``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU count, load, Python and torch versions, the GPU if one was used."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 1)
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def record(name: str, result: dict[str, Any], results_dir: Path = RESULTS) -> Path:
    """Print ``result`` as one JSON line (the benchmark's last line) and write it to ``<results_dir>/<name>.json``."""
    entry = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
        "result": result,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(entry, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result), flush=True)
    return path
