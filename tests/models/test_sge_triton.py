"""The Triton kernels (impl="triton") against the reference, run on the CPU by Triton's
interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is imported), and on
CUDA where there is one."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sge_repro.models.attention import SpatialGroupEnhance

CHECK = textwrap.dedent("""
    import torch
    import sge_repro.models.sge_triton as kernels
    from sge_repro.models.attention import SpatialGroupEnhance

    assert kernels.applies(torch.zeros(1, 4, 2, 2)), "the interpreter should run the kernels on CPU tensors"
    launches = []
    original_apply = kernels.SGETritonFunction.apply
    kernels.SGETritonFunction.apply = lambda *args: launches.append(1) or original_apply(*args)

    def relative_error(actual, expected):
        actual, expected = actual.detach().double(), expected.detach().double()
        return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))

    generator = torch.Generator().manual_seed(30)
    # whole rows in one tile; K not a power of two; positions looping over several tiles; each
    # again channels_last (read in place: the output and dx stay channels_last)
    cases = (((2, 16, 5, 7), 4, None), ((2, 24, 6, 5), 4, None), ((1, 8, 40, 30), 2, 256))
    for (shape, groups, tile), channels_last in [(case, layout) for layout in (False, True) for case in cases]:
        kernels.TILE_ELEMENTS = tile or 4096
        x = torch.randn(*shape, generator=generator) * 2 + 0.7
        grad_out = torch.randn(*shape, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        results = []
        for impl in ("reference", "triton"):
            module = SpatialGroupEnhance(shape[1], groups=groups, impl=impl)
            with torch.no_grad():
                module.weight.copy_(torch.linspace(-1.5, 1.5, groups).view(1, groups, 1, 1))
                module.bias.copy_(torch.linspace(0.5, -0.5, groups).view(1, groups, 1, 1))
            leaf = x.clone().requires_grad_(True)
            out = module(leaf)
            results.append((out, *torch.autograd.grad(out, (leaf, module.weight, module.bias), grad_out)))
        errors = [relative_error(t, r) for r, t in zip(*results)]
        print(shape, channels_last, errors)
        assert max(errors) <= 1e-5, (shape, errors)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert results[1][0].is_contiguous(memory_format=layout) and results[1][1].is_contiguous(memory_format=layout)
    assert len(launches) == 6, launches
    print("ok")
""")


def test_triton_kernels_equal_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_triton_impl_on_cpu_falls_back_to_fast_with_a_warning():
    module = SpatialGroupEnhance(16, groups=4, impl="triton")
    reference = SpatialGroupEnhance(16, groups=4, impl="reference")
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(31))
    import sge_repro.models.sge_triton as kernels

    kernels._warned = False
    with pytest.warns(UserWarning, match="impl 'triton'.*using the 'fast' implementation"):
        out = module(x)
    torch.testing.assert_close(out, reference(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_equals_reference(dtype):
    generator = torch.Generator().manual_seed(32)
    x = (torch.randn(4, 256, 14, 14, generator=generator) * 2 + 0.5).cuda().to(dtype)
    grad_out = torch.randn(4, 256, 14, 14, generator=generator).cuda().to(dtype)
    results = []
    for impl in ("reference", "triton"):
        module = SpatialGroupEnhance(256, groups=64, impl=impl).cuda()
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-1.5, 1.5, 64).view(1, 64, 1, 1))
        leaf = (x.float() if impl == "reference" else x).clone().requires_grad_(True)
        out = module(leaf)
        results.append((out, *torch.autograd.grad(out, (leaf, module.weight, module.bias), grad_out.to(out.dtype))))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for reference, triton in zip(*results):
        error = (triton.double() - reference.double()).norm() / reference.double().norm()
        assert error <= tolerance
