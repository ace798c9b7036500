"""The CUDA kernels against the grid_sample reference on a GPU: values, gradients, autocast, opcheck, network.

Every test here needs a CUDA device and is skipped with the reason elsewhere. The CUDA build of the
kernels is compiled on first use (``custom_ops.build``, cached).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_ops
from custom_ops import ms_deform_attn, ms_deform_attn_reference
from custom_ops.inputs import outputs_and_gradients, random_inputs
from tests.test_msda_op import CASES  # the shapes of the CPU tests: unequal levels, batch 1/3/65, heads 1/8, points 1/4

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels cannot run here"),
]

NAMES = ("output", "grad value", "grad locations", "grad weights")


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Every test here runs the compiled CUDA op (forced: a build or self-check failure fails the test)."""
    previous = os.environ.get(custom_ops.IMPL_ENV)
    os.environ[custom_ops.IMPL_ENV] = "compiled"
    assert custom_ops.implementation("cuda") == "compiled"
    yield
    if previous is None:
        os.environ.pop(custom_ops.IMPL_ENV, None)
    else:
        os.environ[custom_ops.IMPL_ENV] = previous


def on_cuda(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.cuda() for t in inputs)


def assert_agree(ours: list[torch.Tensor], ref: list[torch.Tensor], tol: float) -> None:
    for name, a, b in zip(NAMES, ours, ref):
        assert a.is_cuda and a.dtype == b.dtype, name
        scale = max(1.0, b.abs().max().item())
        error = (a - b).abs().max().item()
        assert error <= tol * scale, f"{name}: max |difference| {error:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-m{c[1]}-p{c[2]}-l{len(c[3])}")
def test_cuda_matches_reference_values_and_gradients(case, dtype, tol):
    inputs = on_cuda(random_inputs(*case, dtype=dtype))
    assert_agree(outputs_and_gradients(ms_deform_attn, inputs), outputs_and_gradients(ms_deform_attn_reference, inputs),
                 tol)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: f"b{c[0]}-m{c[1]}-p{c[2]}-l{len(c[3])}")
def test_cuda_autocast_half_inputs_compute_in_float32(case, half):
    value, shapes, starts, loc, weights = on_cuda(random_inputs(*case, dtype=torch.float32))
    halves = [t.to(half).requires_grad_() for t in (value, loc, weights)]
    with torch.autocast("cuda", dtype=half):
        out = ms_deform_attn(halves[0], shapes, starts, halves[1], halves[2])
    assert out.dtype == torch.float32
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda()
    out.backward(grad)
    upcast = [t.detach().float() for t in halves]
    ref = outputs_and_gradients(ms_deform_attn_reference, (upcast[0], shapes, starts, upcast[1], upcast[2]))
    assert_agree([out.detach()] + [t.grad.float() for t in halves], ref, 1e-2)  # gradients rounded to half
    torch.testing.assert_close(out.detach(), ref[0], rtol=1e-5, atol=1e-5)


def test_cuda_gradcheck_float64():
    value, shapes, starts, loc, weights = on_cuda(random_inputs(2, 2, 2, [(3, 4), (2, 2)], 3, torch.float64, seed=3))
    loc = loc.clamp(0.05, 0.95)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    # the backward accumulates value gradients with atomicAdd, so two backward passes may differ in the last bits
    assert torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-8, nondet_tol=1e-12)


def test_cuda_opcheck_schema_fake_and_autograd():
    for case in CASES[:3]:
        value, shapes, starts, loc, weights = on_cuda(random_inputs(*case, dtype=torch.float32))
        args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
        torch.library.opcheck(torch.ops.cellvta.ms_deform_attn.default, args)


def test_cuda_kernel_refuses_bad_levels_and_devices():
    value, shapes, starts, loc, weights = on_cuda(random_inputs(1, 2, 2, [(4, 4), (2, 2)], 3, torch.float32))
    with pytest.raises(ValueError, match="describe 20 values but value has S = 19"):
        torch.ops.cellvta.ms_deform_attn(value[:, :-1].contiguous(), shapes, starts, loc, weights)
    with pytest.raises(ValueError, match=r"level_start_index\[1\]"):
        torch.ops.cellvta.ms_deform_attn(value, shapes, starts + torch.tensor([0, 1], device="cuda"), loc, weights)
    with pytest.raises(ValueError, match="value's device"):
        torch.ops.cellvta.ms_deform_attn(value, shapes.cpu(), starts, loc, weights)
    compiled_op = torch.compile(ms_deform_attn, backend="eager", fullgraph=True)
    with pytest.raises(ValueError, match="level_start_index"):
        compiled_op(value, shapes, starts + 1, loc, weights)


def test_cuda_backward_checks_grad_output_and_is_flagged_nondeterministic():
    value, shapes, starts, loc, weights = on_cuda(random_inputs(1, 2, 2, [(4, 4), (2, 2)], 3, torch.float32))
    grad = torch.ones_like(torch.ops.cellvta.ms_deform_attn(value, shapes, starts, loc, weights))
    with pytest.raises(RuntimeError, match="grad_output must be .* of value's dtype and device"):
        torch.ops.cellvta.ms_deform_attn_backward(grad.cpu(), value, shapes, starts, loc, weights)
    torch.use_deterministic_algorithms(True)
    try:  # grad_value accumulates by atomicAdd
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda does not have a deterministic"):
            torch.ops.cellvta.ms_deform_attn_backward(grad, value, shapes, starts, loc, weights)
    finally:
        torch.use_deterministic_algorithms(False)


def test_first_use_self_check_passes_on_cuda():
    code = (
        "import warnings, torch, custom_ops\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    impl = custom_ops.implementation('cuda')\n"
        "print(impl, [str(c.message) for c in caught if 'MSDA' in str(c.message)])\n"
    )
    env = {**os.environ, custom_ops.IMPL_ENV: "auto"}
    env.pop(custom_ops.SELF_CHECK_ENV, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "compiled []", result.stdout


def test_cellvta_forward_compiled_op_matches_reference_op_on_cuda(no_tf32):
    from scripts.model.network import CellVTA

    torch.manual_seed(0)
    model = CellVTA("vit-s", num_nuclei_classes=5, num_tissue_classes=3, vit_kwargs={"depth": 4}).cuda().eval()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)).cuda()
    outputs = {}
    for impl in ("compiled", "reference"):
        os.environ[custom_ops.IMPL_ENV] = impl
        with torch.no_grad():
            outputs[impl] = model(x)
    os.environ[custom_ops.IMPL_ENV] = "compiled"
    assert outputs["compiled"].keys() == outputs["reference"].keys()
    for key, ours in outputs["compiled"].items():
        ref = outputs["reference"][key]
        scale = max(1.0, ref.abs().max().item())
        assert (ours - ref).abs().max().item() <= 1e-4 * scale, key
