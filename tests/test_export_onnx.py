"""ONNX export of CellVTA: the deformable attention as ONNX GridSample, run by onnxruntime, equal to eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements-dev.txt lists it)")
pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (requirements-dev.txt lists it)")

from custom_ops import IMPL_ENV, MSDeformAttn  # noqa: E402
from scripts.model.export import compare_onnx, export_onnx_model, run_onnx  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
TISSUES = ["colon", "breast", "skin"]
TINY = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}}
SIZE = 64  # metadata spatial shape "16*n" at n = 4
N = SIZE // 16
# 4 injectors x 3 levels + (4 + 2 extra) extractors x 1 level
GRID_SAMPLES = 18
# the inference workflow: common keys, then inference (relative to the bundle folder)
INFERENCE_CONFIGS = ("configs/common.yaml", "configs/inference.yaml")


def _tiny_network(bundle_root: Path) -> torch.nn.Module:
    """The inference config's network (ViT-T, 4 blocks) for the classes of ``bundle_root/models/dataset.json``."""
    parser = ConfigParser()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(BUNDLE)
        parser.read_config(list(INFERENCE_CONFIGS))
        for key, value in {**TINY, "bundle_root": str(bundle_root)}.items():
            parser[key] = value
        return parser.get_parsed_content("network_def")


def _make_attention_matter(net: torch.nn.Module) -> None:
    """Input-dependent sampling offsets and attention weights, injector scale 1: the deformable attention then
    changes the outputs by far more than the comparison tolerance (at initialisation it barely does)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, MSDeformAttn):
                for layer in (module.sampling_offsets, module.attention_weights):
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        for name, p in net.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    """A bundle root with ``models/dataset.json`` and ``models/model.pt`` of a tiny CellVTA (ViT-T, 4 blocks)."""
    root = tmp_path_factory.mktemp("onnx_bundle")
    (root / "models").mkdir()
    (root / "models" / "dataset.json").write_text(json.dumps(
        {"name": "tiny", "classes": CLASSES, "tissues": TISSUES, "magnification": 40, "samples": []}))
    torch.manual_seed(0)
    net = _tiny_network(root)
    _make_attention_matter(net)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def onnx_file(bundle_root) -> Path:
    """The tiny model exported through the command line, as a user runs it."""
    out = bundle_root / "models" / "model.onnx"
    cmd = [sys.executable, "-m", "scripts.model.export", "export_onnx", "--config_file", str(list(INFERENCE_CONFIGS)),
           "--onnx_file", str(out), "--ckpt_file", str(bundle_root / "models" / "model.pt"), "--n", str(N),
           "--bundle_root", str(bundle_root), "--backbone", "vit-t", "--vit_kwargs", "{'depth': 4}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_onnxruntime_outputs_equal_eager_for_any_batch_size(onnx_file, bundle_root, monkeypatch):
    monkeypatch.chdir(BUNDLE)
    overrides = {**TINY, "bundle_root": str(bundle_root)}
    ckpt = str(bundle_root / "models" / "model.pt")
    for batch in (1, 3):
        diffs = compare_onnx(str(onnx_file), list(INFERENCE_CONFIGS), ckpt, batch=batch, n=N, **overrides)
        assert set(diffs) == {"nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types"}
        assert max(diffs.values()) <= 1e-4

    # the 1e-4 agreement means something: it would fail if every sampling point moved by a quarter pixel
    net = _tiny_network(bundle_root)
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    exported = run_onnx(str(onnx_file), x)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, MSDeformAttn):
                module.sampling_offsets.bias.add_(0.25)
        moved = net(x)
    assert float(np.abs(exported["hv_map"] - moved["hv_map"].numpy()).max()) > 2e-4


@pytest.mark.slow
def test_graph_holds_gridsample_in_the_standard_domain_and_a_free_batch(onnx_file):
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GridSample") == GRID_SAMPLES
    assert {node.domain for node in model.graph.node} <= {""}
    assert {o.domain: o.version for o in model.opset_import}[""] >= 16
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert [o.name for o in model.graph.output] == ["nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types"]


@pytest.mark.slow
def test_wrong_tile_size_is_refused_with_the_file_name(onnx_file):
    with pytest.raises(ValueError, match=rf"{onnx_file.name}: input of shape \(1, 3, 128, 128\)"):
        run_onnx(str(onnx_file), np.zeros((1, 3, 128, 128), np.float32))
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        run_onnx(str(onnx_file.parent / "missing.onnx"), np.zeros((1, 3, SIZE, SIZE), np.float32))


def test_export_refuses_an_opset_without_gridsample_and_restores_the_msda_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(IMPL_ENV, "auto")
    with pytest.raises(ValueError, match="GridSample"):
        export_onnx_model(torch.nn.Identity(), str(tmp_path / "m.onnx"), (SIZE, SIZE), opset=15)
    with pytest.raises(ValueError, match="multiples of 16"):
        export_onnx_model(torch.nn.Identity(), str(tmp_path / "m.onnx"), (SIZE, 60))

    class Failing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            assert os.environ[IMPL_ENV] == "reference"
            raise RuntimeError("stop inside the export")

    with pytest.raises(RuntimeError, match="stop inside the export"):
        export_onnx_model(Failing(), str(tmp_path / "m.onnx"), (SIZE, SIZE))
    assert os.environ[IMPL_ENV] == "auto"
    assert not list(tmp_path.iterdir())
