"""The Label app's inference progress lines: one every N sliding windows and one at the end, counting the windows
the bundle's sliding-window inferer really runs (in the Label environment, where ``cellvta_label.infer`` imports)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.test_monailabel_app import APP, label_python  # noqa: F401

SCRIPT = """
import json, logging, sys
import torch
from monai.inferers import SlidingWindowInferer
sys.path.insert(0, sys.argv[1])
from cellvta_label.infer import ProgressInferer, window_count

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
log = logging.getLogger("cellvta_label.infer")
log.addHandler(Keep())
log.setLevel(logging.INFO)
torch.manual_seed(0)
net = torch.nn.Conv2d(3, 2, 3, padding=1)
seen = []
def counting(x):
    seen.append(x.shape[0])
    return net(x)
sw = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=4, overlap=0.25, mode="gaussian")
x = torch.rand(1, 3, 200, 150)
with torch.no_grad():
    ours = ProgressInferer(sw, 8, "slide region [0, 0] [150, 200]")(x, counting)
    plain = sw(x, net)
print(json.dumps({"batches": seen, "count": window_count((200, 150), (64, 64), 0.25), "lines": lines,
                  "same": bool(torch.equal(ours, plain)), "small": window_count((40, 30), (64, 64), 0.25),
                  "whole": window_count((64, 64), (64, 64), 0.25)}))
"""


@pytest.mark.slow  # a fresh interpreter of the Label environment importing torch and MONAI
def test_progress_lines_count_the_real_windows(label_python):  # noqa: F811
    done = subprocess.run([str(label_python), "-c", SCRIPT, str(APP)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # 200 rows: windows at 0, 48, 96, 136; 150 columns: at 0, 48, 86 -> 12 windows in batches of 4
    assert out["count"] == 12 and out["batches"] == [4, 4, 4]
    assert out["small"] == 1 and out["whole"] == 1
    assert out["same"]  # the wrapper changes nothing in the prediction
    assert len(out["lines"]) == 2, out["lines"]
    assert out["lines"][0].startswith("slide region [0, 0] [150, 200]: 8 / 12 windows of 150 x 200 px in ")
    assert out["lines"][1].startswith("slide region [0, 0] [150, 200]: 12 / 12 windows of 150 x 200 px in ")
