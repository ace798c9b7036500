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

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Build the CPU kernels once; every test here runs the compiled op unless it says otherwise."""
    os.environ[custom_ops.IMPL_ENV] = "compiled"
    assert custom_ops.implementation("cpu") == "compiled"
    yield
    os.environ.pop(custom_ops.IMPL_ENV, None)


def make_inputs(
    batch: int, heads: int, points: int, levels: list[tuple[int, int]], queries: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs; a quarter of the locations fall outside [0, 1] and a quarter exactly on pixel borders."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    d = 8
    value = torch.randn(batch, int(sizes.sum()), heads, d, generator=g, dtype=dtype)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    border = torch.rand(loc.shape[:-1], generator=g) < 0.25
    for level, (h, w) in enumerate(levels):
        # Pixel borders sit at k / W (x) and k / H (y), including 0 and 1 themselves.
        kx = torch.randint(0, w + 1, loc.shape[:3] + (points,), generator=g).to(dtype) / w
        ky = torch.randint(0, h + 1, loc.shape[:3] + (points,), generator=g).to(dtype) / h
        sel = border[:, :, :, level]
        loc[:, :, :, level, :, 0] = torch.where(sel, kx, loc[:, :, :, level, :, 0])
        loc[:, :, :, level, :, 1] = torch.where(sel, ky, loc[:, :, :, level, :, 1])
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, shapes, starts, loc, weights


def outputs_and_grads(fn, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    value, shapes, starts, loc, weights = (t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(value, shapes, starts, loc, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(grad)
    return [out.detach(), value.grad, loc.grad, weights.grad]


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
    inputs = make_inputs(*case, dtype=dtype)
    ours = outputs_and_grads(ms_deform_attn, inputs)
    ref = outputs_and_grads(ms_deform_attn_reference, inputs)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), ours, ref):
        assert a.dtype == dtype
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale, name


def test_locations_outside_every_level_give_zero_output_and_gradients():
    value, shapes, starts, loc, weights = make_inputs(2, 2, 2, [(4, 4)], 3, torch.float64)
    loc = loc.abs() + 1.5  # every sample more than a pixel beyond the right and bottom borders
    out, grad_value, grad_loc, grad_weights = outputs_and_grads(ms_deform_attn, (value, shapes, starts, loc, weights))
    assert out.abs().max() == 0 and grad_value.abs().max() == 0
    assert grad_loc.abs().max() == 0 and grad_weights.abs().max() == 0


def test_gradcheck_float64():
    value, shapes, starts, loc, weights = make_inputs(2, 2, 2, [(3, 4), (2, 2)], 3, torch.float64, seed=3)
    loc = loc.clamp(0.05, 0.95)  # away from pixel borders, where bilinear sampling is not differentiable
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-8)


def test_opcheck_schema_fake_and_autograd():
    for case in CASES[:3]:
        value, shapes, starts, loc, weights = make_inputs(*case, dtype=torch.float32)
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
    value, shapes, starts, loc, weights = make_inputs(1, 8, 4, [(8, 8), (4, 4)], 6, torch.float32)
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
    args = change(make_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float32))
    with pytest.raises(error, match=message):
        ms_deform_attn(*args)


def test_half_precision_inputs_compute_in_float32_and_keep_their_dtype():
    value, shapes, starts, loc, weights = make_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float32)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, loc.bfloat16(), weights.bfloat16())
    expected = ms_deform_attn_reference(value.bfloat16().float(), shapes, starts, loc.bfloat16().float(),
                                        weights.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16())


def test_non_contiguous_inputs_are_handled():
    value, shapes, starts, loc, weights = make_inputs(2, 4, 2, [(4, 4), (2, 2)], 5, torch.float64)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(value_nc, shapes, starts, loc_nc, weights),
                               ms_deform_attn_reference(value, shapes, starts, loc, weights), rtol=0, atol=1e-12)


def test_the_kernel_itself_refuses_bad_levels():
    """The C++ checks hold even when the Python checks are bypassed."""
    value, shapes, starts, loc, weights = prepare_inputs(*make_inputs(1, 2, 2, [(4, 4)], 3, torch.float32))
    with pytest.raises(RuntimeError, match="describe"):
        torch.ops.cellvta.ms_deform_attn(value[:, :-1].contiguous(), shapes, starts, loc, weights)


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
def test_cuda_kernels_compile(tmp_path):
    home = _cuda_toolkit()
    if home is None:
        pytest.skip("nvcc or a CUDA-enabled torch build is absent: the CUDA kernels cannot be compiled here")
    code = (
        "import sys, torch\n"
        "from custom_ops import build\n"
        "path = build.build(cuda=True, build_directory=sys.argv[1] if len(sys.argv) > 1 else None)\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('cellvta::ms_deform_attn', 'CUDA')\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('cellvta::ms_deform_attn_backward', 'CUDA')\n"
        "print('built', path)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built" in result.stdout
