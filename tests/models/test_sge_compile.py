"""The fast path's torch.compile (CUDA only in use), run here on the CPU: compile failures, the
strict switch, recompiles over many feature-map sizes, and the compiled math against the reference."""

import warnings

import pytest
import torch

from float_compare import relative_error
from sge_repro.models import sge_fast as fast_path
from sge_repro.models import sge_cpu
from sge_repro.models.sge import sge_reference
from sge_repro.models.sge_fast import STRICT_COMPILE_ENV, CompileFallbackError, sge_fast


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """torch.compile of the fast path on the CPU, from empty caches (dynamo keeps compiled code
    per function across torch.compile wrappers: reset before and after)."""
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", {"cpu"})
    monkeypatch.setattr(fast_path, "_compiled", {})
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture
def cuda_formulation(monkeypatch):
    """The CUDA formulation (elementwise, channels_last read in place) in float32 on the CPU:
    the C kernel would otherwise take float32."""
    monkeypatch.setattr(fast_path, "ELEMENTWISE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(sge_cpu, "_library", None)
    monkeypatch.setattr(sge_cpu, "_failed", True)


def refusing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def inputs(shape, groups, seed=0, dtype=torch.float64, channels_last=False):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=generator) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = (torch.randn(1, groups, 1, 1, generator=generator) for _ in range(2))
    return x, gamma, beta


def test_a_compile_failure_warns_once_and_runs_eager(compile_on_cpu, monkeypatch):
    monkeypatch.delenv(STRICT_COMPILE_ENV, raising=False)
    monkeypatch.setitem(fast_path.COMPILE_OPTIONS, "backend", refusing_backend)
    x, gamma, beta = inputs((2, 16, 5, 6), 4)  # float64: the torch-ops path, not the C kernel
    with pytest.warns(UserWarning, match=r"torch.compile failed \(.*this backend compiles nothing.*\); using eager"):
        out = sge_fast(x, gamma, beta, 4)
    assert relative_error(out, sge_reference(x, gamma, beta, 4)) <= 1e-12
    assert "cpu" not in fast_path.COMPILE_DEVICES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sge_fast(x, gamma, beta, 4)  # said once


def test_strict_compile_turns_the_eager_fallback_into_an_error(compile_on_cpu, monkeypatch):
    monkeypatch.setenv(STRICT_COMPILE_ENV, "1")
    monkeypatch.setitem(fast_path.COMPILE_OPTIONS, "backend", refusing_backend)
    x, gamma, beta = inputs((2, 16, 5, 6), 4)
    with pytest.raises(CompileFallbackError, match=r"this backend compiles nothing.*SGE_REPRO_STRICT_COMPILE=1 "
                                                   r"forbids the eager fallback"):
        sge_fast(x.requires_grad_(True), gamma, beta, 4)
    assert fast_path.COMPILE_DEVICES == {"cpu"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_cuda_formulation_over_many_sizes_equals_reference(compile_on_cpu, cuda_formulation, monkeypatch,
                                                                    channels_last):
    """Nine feature-map sizes (more than dynamo's recompile limit of 8, which compiles with
    dynamic=False exhaust) under strict: every call runs compiled, outputs and gradients equal
    the reference, and channels_last stays channels_last."""
    monkeypatch.setenv(STRICT_COMPILE_ENV, "1")
    sizes = [(5, 6), (7, 9), (4, 11), (12, 10), (3, 3), (9, 16), (6, 6), (13, 7), (8, 20)]
    for index, (height, width) in enumerate(sizes):
        x, gamma, beta = inputs((2, 32, height, width), 8, seed=index, dtype=torch.float32, channels_last=channels_last)
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + index))
        results = {}
        for name, function in (("reference", sge_reference), ("fast", sge_fast)):
            leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
            out = function(*leaves, 8)
            results[name] = (out, *torch.autograd.grad(out, leaves, grad_out))
        with torch.no_grad():
            evaluated = sge_fast(x, gamma, beta, 8)
        assert results["fast"][0].is_contiguous(memory_format=torch.channels_last) == channels_last
        assert evaluated.is_contiguous(memory_format=torch.channels_last) == channels_last
        for label, fast, reference in zip(("out", "dx", "dgamma", "dbeta"), results["fast"], results["reference"]):
            assert relative_error(fast, reference) <= 1e-5, ((height, width), label)
        assert relative_error(evaluated, results["reference"][0]) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_fused_batchnorm_sge_equals_modules_in_turn(compile_on_cpu, cuda_formulation, monkeypatch,
                                                             channels_last):
    from sge_repro.models.sge_fast import batchnorm_sge
    from sge_repro.models.attention import SpatialGroupEnhance

    monkeypatch.setenv(STRICT_COMPILE_ENV, "1")
    generator = torch.Generator().manual_seed(7)
    for height, width in ((6, 9), (10, 7)):
        z = torch.randn(2, 32, height, width, generator=generator) * 2 + 0.3
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn(z.shape, generator=generator)
        results = []
        for impl in ("reference", "fast"):
            torch.manual_seed(0)
            bn, sge = torch.nn.BatchNorm2d(32), SpatialGroupEnhance(32, groups=8, impl=impl)
            with torch.no_grad():
                sge.weight.copy_(torch.linspace(-1.5, 1.5, 8).view(1, 8, 1, 1))
            leaf = z.clone().requires_grad_(True)
            out = batchnorm_sge(leaf, bn, sge)
            grads = torch.autograd.grad(out, (leaf, bn.weight, bn.bias, sge.weight, sge.bias), grad_out)
            results.append((out, *grads, bn.running_mean, bn.running_var))
        assert results[1][0].is_contiguous(memory_format=torch.channels_last) == channels_last
        labels = ("out", "dz", "dbn_weight", "dbn_bias", "dgamma", "dbeta", "running_mean", "running_var")
        for label, expected, actual in zip(labels, *results):
            assert relative_error(actual, expected) <= 1e-5, ((height, width), label)
