"""The compiled MSDA op against the grid_sample reference: values, gradients, registration, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_ops
from custom_ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from custom_ops.checks import prepare_inputs
from custom_ops.inputs import outputs_and_gradients, random_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Build the CPU kernels once; every test here runs the compiled op unless it says otherwise."""
    os.environ[custom_ops.IMPL_ENV] = "compiled"
    assert custom_ops.implementation("cpu") == "compiled"
    yield
    os.environ.pop(custom_ops.IMPL_ENV, None)


CASES = [
    # batch, heads, points, levels, queries
    (1, 1, 1, [(5, 7)], 11),
    (3, 8, 4, [(6, 4), (3, 5)], 9),
    (1, 8, 4, [(8, 8), (4, 4), (2, 2)], 16),
    (65, 1, 4, [(4, 6), (2, 3), (1, 1)], 3),
    (3, 1, 1, [(3, 3), (7, 2), (1, 4)], 5),
    (65, 8, 1, [(5, 5)], 2),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-m{c[1]}-p{c[2]}-l{len(c[3])}")
def test_compiled_matches_reference_values_and_gradients(case, dtype, tol):
    inputs = random_inputs(*case, dtype=dtype)
    ours = outputs_and_gradients(ms_deform_attn, inputs)
    ref = outputs_and_gradients(ms_deform_attn_reference, inputs)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), ours, ref):
        assert a.dtype == dtype
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale, name


def test_locations_outside_every_level_give_zero_output_and_gradients():
    value, shapes, starts, loc, weights = random_inputs(2, 2, 2, [(4, 4)], 3, torch.float64)
    loc = loc.abs() + 1.5  # every sample more than a pixel beyond the right and bottom borders
    out, grad_value, grad_loc, grad_weights = outputs_and_gradients(
        ms_deform_attn, (value, shapes, starts, loc, weights)
    )
    assert out.abs().max() == 0 and grad_value.abs().max() == 0
    assert grad_loc.abs().max() == 0 and grad_weights.abs().max() == 0


def test_gradcheck_float64():
    value, shapes, starts, loc, weights = random_inputs(2, 2, 2, [(3, 4), (2, 2)], 3, torch.float64, seed=3)
    loc = loc.clamp(0.05, 0.95)  # away from pixel borders, where bilinear sampling is not differentiable
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-8)


def test_opcheck_schema_fake_and_autograd():
    for case in CASES[:3]:
        value, shapes, starts, loc, weights = random_inputs(*case, dtype=torch.float32)
        args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
        torch.library.opcheck(torch.ops.cellvta.ms_deform_attn.default, args)


class _Attend(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)

    def forward(self, query, ref, values, shapes, starts):
        return self.attn(query, ref, values, shapes, starts)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = _Attend()
    shapes = torch.tensor([[6, 6], [3, 3]])
    starts = torch.tensor([0, 36])
    query, values = torch.randn(2, 10, 32), torch.randn(2, 45, 32)
    ref = torch.rand(1, 10, 1, 2)
    eager = module(query, ref, values, shapes, starts)
    compiled_module = torch.compile(module, fullgraph=True)
    out = compiled_module(query, ref, values, shapes, starts)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_autocast_bfloat16_computes_in_float32():
    value, shapes, starts, loc, weights = random_inputs(1, 8, 4, [(8, 8), (4, 4)], 6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.bfloat16(), weights.bfloat16())
    assert out.dtype == torch.float32
    expected = ms_deform_attn_reference(value.bfloat16().float(), shapes, starts, loc.bfloat16().float(),
                                        weights.bfloat16().float())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_module_offsets_start_on_the_deformable_detr_grid():
    layer = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    bias = layer.sampling_offsets.bias.view(8, 3, 4, 2)
    assert torch.equal(bias[0, :, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(3, 4))  # head 0 looks right
    assert torch.allclose(bias[2, 0, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # head 2 looks down
    assert layer.attention_weights.weight.abs().max() == 0


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: (a[0].double(),) + a[1:], TypeError, "share one dtype"),
        (lambda a: (a[0].long(), a[1], a[2], a[3].long(), a[4].long()), TypeError, "float32 or float64"),
        (lambda a: (a[0][:, :-1],) + a[1:], ValueError, "describe"),
        (lambda a: a[:2] + (a[2] + 1,) + a[3:], ValueError, "level_start_index"),
        (lambda a: a[:3] + (a[3][:, :, :1],) + a[4:], ValueError, "share N"),
        (lambda a: a[:4] + (a[4][..., :1],), ValueError, "attention_weights"),
        (lambda a: (a[0], a[1].float()) + a[2:], TypeError, "integer"),
        (lambda a: (a[0], a[1][:1]) + a[2:], ValueError, "spatial_shapes"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(change, error, message):
    args = change(random_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float32))
    with pytest.raises(error, match=message):
        ms_deform_attn(*args)


def test_half_precision_inputs_compute_in_float32_and_keep_their_dtype():
    value, shapes, starts, loc, weights = random_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float32)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.bfloat16(), weights.bfloat16())
    expected = ms_deform_attn_reference(value.bfloat16().float(), shapes, starts, loc.bfloat16().float(),
                                        weights.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16())


def test_non_contiguous_inputs_are_handled():
    value, shapes, starts, loc, weights = random_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float64)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(value_nc, shapes, starts, loc_nc, weights),
                               ms_deform_attn_reference(value, shapes, starts, loc, weights), rtol=0, atol=1e-12)


def test_the_kernel_itself_refuses_bad_levels():
    """The layout check lives in the kernels (C++), shared by CPU and CUDA: it holds without any Python check."""
    value, shapes, starts, loc, weights = prepare_inputs(*random_inputs(1, 2, 2, [(4, 4), (2, 2)], 3, torch.float32))
    with pytest.raises(ValueError, match="describe 20 values but value has S = 19"):
        torch.ops.cellvta.ms_deform_attn(value[:, :-1].contiguous(), shapes, starts, loc, weights)
    with pytest.raises(ValueError, match=r"level_start_index\[1\] is 15 but the preceding levels"):
        torch.ops.cellvta.ms_deform_attn(value, shapes, starts - torch.tensor([0, 1]), loc, weights)
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\] must be positive"):
        torch.ops.cellvta.ms_deform_attn(value, shapes * torch.tensor([[0, 1], [1, 1]]), starts, loc, weights)
    grad = torch.zeros(1, 3, 16)
    with pytest.raises(ValueError, match="level_start_index"):
        torch.ops.cellvta.ms_deform_attn_backward(grad, value, shapes, starts + 1, loc, weights)
    for bad in (grad[:, :2], grad.double(), torch.zeros(1, 16, 3).transpose(1, 2)):  # shape, dtype, layout
        with pytest.raises(RuntimeError, match=r"grad_output must be a contiguous \(N, Lq, M \* D\) tensor"):
            torch.ops.cellvta.ms_deform_attn_backward(bad, value, shapes, starts, loc, weights)


def test_layout_check_runs_under_torch_compile():
    """Inside torch.compile the Python checks are traced away; the kernel's own check still refuses bad levels."""
    value, shapes, starts, loc, weights = random_inputs(1, 2, 2, [(4, 4), (2, 2)], 3, torch.float32)
    compiled_op = torch.compile(ms_deform_attn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_op(value, shapes, starts, loc, weights),
                               ms_deform_attn_reference(value, shapes, starts, loc, weights), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="level_start_index"):
        compiled_op(value, shapes, starts + 1, loc, weights)


def _run(code: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_import_never_compiles_and_reference_can_be_forced(tmp_path):
    code = (
        "import os, torch, custom_ops\n"
        "assert 'cellvta::ms_deform_attn' not in torch._C._dispatch_get_all_op_names()\n"
        "assert custom_ops.implementation('cpu') == 'reference'\n"
        "assert not os.listdir(os.environ['TORCH_EXTENSIONS_DIR'])\n"
        "print('ok')\n"
    )
    result = _run(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path), custom_ops.IMPL_ENV: "reference"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_failed_build_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings, torch, custom_ops\n"
        "v = torch.randn(1, 4, 1, 2); s = torch.tensor([[2, 2]]); st = torch.tensor([0])\n"
        "loc = torch.rand(1, 3, 1, 1, 1, 2); w = torch.ones(1, 3, 1, 1, 1)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out1 = custom_ops.ms_deform_attn(v, s, st, loc, w); out2 = custom_ops.ms_deform_attn(v, s, st, loc, w)\n"
        "msgs = [str(c.message) for c in caught if 'MSDA' in str(c.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "torch.testing.assert_close(out1, custom_ops.ms_deform_attn_reference(v, s, st, loc, w))\n"
        "print(msgs[0])\n"
    )
    result = _run(code, {"TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "/bin/false", custom_ops.IMPL_ENV: "auto"})
    assert result.returncode == 0, result.stderr
    assert "pure-PyTorch MSDA reference" in result.stdout and "failed" in result.stdout


def _cuda_toolkit() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None or torch.version.cuda is None:
        return None
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(nvcc).resolve().parents[1])):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_kernels_compile():
    """nvcc compiles and links the CUDA kernels (no GPU needed), with nothing but nvcc on the PATH (no CUDA_HOME:
    torch then guesses the toolkit from nvcc's folder). The build folder persists under the torch extensions
    folder, so only the first run after a source change compiles (minutes); later runs take seconds."""
    if _cuda_toolkit() is None:
        pytest.skip("nvcc or a CUDA-enabled torch build is absent: the CUDA kernels cannot be compiled here")
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    code = (
        "import sys, torch\n"
        "from custom_ops import build\n"
        "path = build.build(cuda=True, build_directory=sys.argv[1])\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('cellvta::ms_deform_attn', 'CUDA')\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('cellvta::ms_deform_attn_backward', 'CUDA')\n"
        "print('built', path)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(cache / "cellvta_cuda_compile_test")], cwd=REPO, capture_output=True,
        text=True, timeout=900,
        env={**{k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")},
             "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built" in result.stdout


def test_self_check_passes_for_the_real_kernel_and_is_configured_by_the_environment(monkeypatch):
    from custom_ops import selfcheck

    assert selfcheck.compare(torch.device("cpu")) is None
    monkeypatch.delenv(custom_ops.SELF_CHECK_ENV, raising=False)
    assert selfcheck.checked_device_types() == {"cuda"}
    monkeypatch.setenv(custom_ops.SELF_CHECK_ENV, " cpu, cuda ")
    assert selfcheck.checked_device_types() == {"cpu", "cuda"}
    monkeypatch.setenv(custom_ops.SELF_CHECK_ENV, "0")
    assert selfcheck.checked_device_types() == frozenset()


# A kernel with the sampling-coordinate drift this check exists for (loc * size instead of
# loc * size - 0.5), registered for the CPU in place of the real one.
_DRIFTED_KERNEL = (
    "import os, warnings, torch, custom_ops\n"
    "from custom_ops import build\n"
    "build.load_library()\n"
    "def drifted(value, shapes, starts, loc, weights):\n"
    "    size = shapes.flip(-1).to(loc.dtype)[None, None, None, :, None, :]\n"
    "    return custom_ops.ms_deform_attn_reference(value, shapes, starts, loc + 0.5 / size, weights)\n"
    "lib = torch.library.Library('cellvta', 'IMPL')\n"
    "with warnings.catch_warnings():\n"
    "    warnings.simplefilter('ignore')\n"
    "    lib.impl('ms_deform_attn', drifted, 'CPU')\n"
    "v = torch.randn(1, 20, 2, 4); s = torch.tensor([[4, 4], [2, 2]]); st = torch.tensor([0, 16])\n"
    "loc = torch.rand(1, 6, 2, 2, 2, 2); w = torch.rand(1, 6, 2, 2, 2)\n"
    "expected = custom_ops.ms_deform_attn_reference(v, s, st, loc, w)\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
    "        first = custom_ops.ms_deform_attn(v, s, st, loc, w)\n"
    "    second = custom_ops.ms_deform_attn(v, s, st, loc, w)\n"
    "msgs = [str(c.message) for c in caught if 'MSDA' in str(c.message)]\n"
    "print('warnings', len(msgs), msgs)\n"
    "print('impl', custom_ops.implementation('cpu'))\n"
    "print('first', (first - expected).abs().max().item(), 'second', (second - expected).abs().max().item())\n"
    "os.environ[custom_ops.IMPL_ENV] = 'compiled'\n"
    "try:\n"
    "    custom_ops.implementation('cpu')\n"
    "except build.BuildError as exc:\n"
    "    print('forced raises', 'self-check' in str(exc))\n"
)


def test_self_check_disagreement_warns_once_and_keeps_the_reference():
    result = _run(_DRIFTED_KERNEL, {custom_ops.IMPL_ENV: "auto", custom_ops.SELF_CHECK_ENV: "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["warnings"].startswith("1 "), result.stdout
    assert "failed its first-use self-check" in lines["warnings"]
    assert "output differs from the grid_sample reference" in lines["warnings"]
    assert f"{custom_ops.SELF_CHECK_ENV}=0" in lines["warnings"]
    assert lines["impl"] == "reference"
    first, second = (float(x) for x in lines["first"].split(" second "))
    assert first <= 1e-6 and second <= 1e-6  # the reference ran, also for the first call
    assert lines["forced"] == "raises True"

