"""The C kernel (sge_repro/models/sge_cpu.c): build, cache, fallback and the BatchNorm variants.
Its equality with the reference is tested with the other implementations in test_sge.py."""

import os
import subprocess
import sys

import pytest
import torch

from float_compare import relative_error
from sge_repro.models import sge_cpu
from sge_repro.models.sge import sge_reference
from sge_repro.models.sge_fast import batchnorm_sge
from sge_repro.models.attention import SpatialGroupEnhance


@pytest.fixture(autouse=True)
def kernel_built():
    assert sge_cpu.available(), "the C kernel should build here (gcc is on the CI image)"


@pytest.mark.parametrize("affine,track_running_stats,training",
                         [(False, True, True), (True, False, True), (True, False, False), (False, True, False)])
def test_batchnorm_variants_equal_modules_in_turn(affine, track_running_stats, training):
    generator = torch.Generator().manual_seed(20)
    pairs = []
    for impl in ("reference", "fast"):
        bn = torch.nn.BatchNorm2d(32, affine=affine, track_running_stats=track_running_stats).train(training)
        sge = SpatialGroupEnhance(32, groups=8, impl=impl)
        with torch.no_grad():
            sge.weight.copy_(torch.linspace(-2, 2, 8).view(1, 8, 1, 1))
            if affine:
                bn.weight.copy_(torch.linspace(0.5, 1.5, 32))
                bn.bias.copy_(torch.linspace(-1, 1, 32))
        pairs.append((bn, sge))
    z = torch.randn(4, 32, 6, 5, generator=generator) * 2 + 1
    grad_out = torch.randn(4, 32, 6, 5, generator=generator)
    results = []
    for bn, sge in pairs:
        z_leaf = z.clone().requires_grad_(True)
        out = batchnorm_sge(z_leaf, bn, sge) if sge.impl == "fast" else sge(bn(z_leaf))
        inputs = [z_leaf, sge.weight, sge.bias] + ([bn.weight, bn.bias] if affine else [])
        results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
        if track_running_stats:
            results[-1] += (bn.running_mean.clone(), bn.running_var.clone())
    for index, (expected, actual) in enumerate(zip(*results)):
        assert relative_error(actual, expected) <= 1e-5, index


def test_results_do_not_depend_on_the_thread_count():
    """Rows are independent and reduced in a fixed order: bitwise equal on 1 or 2 threads
    (what the bit-for-bit resume of training relies on). Bit-for-bit is sound here on any machine:
    one process, one compiled kernel, and the thread count only decides which thread takes a row,
    never the order in which a row's numbers are added."""
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(3, 64, 11, 13, generator=generator).requires_grad_(True)
    gamma, beta = torch.randn(1, 16, 1, 1, generator=generator), torch.randn(1, 16, 1, 1, generator=generator)
    grad_out = torch.randn(3, 64, 11, 13, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = sge_cpu.sge(x, gamma, beta, 16)
            results.append((out, torch.autograd.grad(out, x, grad_out)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_large_detection_sized_maps():
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(1, 64, 120, 160, generator=generator) + 0.5
    gamma, beta = torch.randn(1, 16, 1, 1, generator=generator), torch.randn(1, 16, 1, 1, generator=generator)
    with torch.no_grad():
        assert relative_error(sge_cpu.sge(x, gamma, beta, 16), sge_reference(x.double(), gamma, beta, 16)) <= 1e-5


def test_loading_keeps_denormals():
    """Built with -ffast-math but linked without it: no process-wide flush-to-zero."""
    tiny = torch.tensor(1e-40, dtype=torch.float32)
    assert tiny.item() != 0.0 and (tiny * 0.5).item() != 0.0


def _run_isolated(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SGE_REPRO_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_built_once_into_the_cache(tmp_path):
    code = "from sge_repro.models import sge_cpu; assert sge_cpu.available(); print(sge_cpu._library._name)"
    first = _run_isolated(code, tmp_path)
    assert first.returncode == 0, first.stderr
    built = list((tmp_path / "cache" / "kernels").glob("sge_cpu-*.so"))
    assert [str(path) for path in built] == [first.stdout.strip()]
    mtime = built[0].stat().st_mtime_ns
    second = _run_isolated(code, tmp_path)
    assert second.returncode == 0 and built[0].stat().st_mtime_ns == mtime
    assert list((tmp_path / "cache" / "kernels").iterdir()) == built  # no temporary left behind


def test_without_a_compiler_warns_and_uses_torch_ops(tmp_path):
    code = (
        "import warnings, torch\n"
        "from sge_repro.models.sge import sge_reference\n"
        "from sge_repro.models.sge_fast import sge_fast\n"
        "x = torch.randn(2, 16, 5, 5); g = torch.randn(1, 4, 1, 1); b = torch.randn(1, 4, 1, 1)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.testing.assert_close(sge_fast(x, g, b, 4), sge_reference(x, g, b, 4))\n"
        "print([str(w.message) for w in caught])\n"
    )
    result = _run_isolated(code, tmp_path, CC="/bin/false")
    assert result.returncode == 0, result.stderr
    assert "SGE CPU kernel unavailable" in result.stdout and "/bin/false" in result.stdout
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


def test_disabled_by_environment(tmp_path):
    code = "from sge_repro.models import sge_cpu; print(sge_cpu.available())"
    result = _run_isolated(code, tmp_path, SGE_CPU_KERNEL="0")
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_torch_compile_of_an_sge_model_matches_eager():
    """train_cls.compile: dynamo breaks the graph at the kernel's autograd Function; the compiled
    model must give eager's loss and gradients."""
    from sge_repro.models.registry import create_model

    generator = torch.Generator().manual_seed(23)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    results = []
    for compiled in (False, True):
        model = create_model("sge_resnet18", num_classes=10, width=8, groups=4, seed=0)
        runner = torch.compile(model) if compiled else model
        loss = torch.nn.functional.cross_entropy(runner(images), labels)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    # Compiled and eager run other kernels (inductor fuses the elementwise ops around the SGE
    # Function): float32 sums in another order, compared norm-wise (tests/float_compare.py).
    # Measured on AMD EPYC: loss equal, gradients <= 7.6e-6 (tolerance 13x); a gradient sums 4 images x up to
    # 32x32 positions, ~ sqrt(4e3) * 2**-24 ~ 4e-6 per reduction, through 18 layers of backward.
    assert relative_error(results[1][0], results[0][0]) <= 1e-5
    errors = {name: relative_error(results[1][1][name], grad) for name, grad in results[0][1].items()}
    assert max(errors.values()) <= 1e-4, max(errors.items(), key=lambda item: item[1])
