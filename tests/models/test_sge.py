"""SpatialGroupEnhance against an independent float64 re-derivation of the paper's formula."""

import math

import pytest
import torch

from float_compare import relative_error
from sge_repro.errors import UserError
from sge_repro.models import sge_cpu
from sge_repro.models.sge import sge_reference
from sge_repro.models.sge_fast import sge_fast
from sge_repro.models.attention import SpatialGroupEnhance


def formula_float64(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                    normalize: bool = True) -> torch.Tensor:
    """The five steps of paper-results.md, with explicit loops over samples and groups; without
    normalize, step 3 is skipped (the raw similarity goes into step 4)."""
    x = x.double()
    batch, channels, height, width = x.shape
    per_group = channels // groups
    out = torch.empty_like(x)
    for b in range(batch):
        for g in range(groups):
            xg = x[b, g * per_group:(g + 1) * per_group].reshape(per_group, height * width)
            descriptor = xg.sum(dim=1) / (height * width)
            similarity = (descriptor[:, None] * xg).sum(dim=0)
            if not normalize:
                gate = 1.0 / (1.0 + torch.exp(-(float(gamma.flatten()[g]) * similarity + float(beta.flatten()[g]))))
                out[b, g * per_group:(g + 1) * per_group] = (xg * gate[None, :]).reshape(per_group, height, width)
                continue
            mean = similarity.sum() / similarity.numel()
            unbiased_std = math.sqrt(float(((similarity - mean) ** 2).sum()) / (similarity.numel() - 1))
            normalized = (similarity - mean) / (unbiased_std + 1e-5)
            affine = float(gamma.flatten()[g]) * normalized + float(beta.flatten()[g])
            gate = 1.0 / (1.0 + torch.exp(-affine))
            out[b, g * per_group:(g + 1) * per_group] = (xg * gate[None, :]).reshape(per_group, height, width)
    return out


@pytest.fixture(params=["cpu_kernel", "torch_ops"])
def cpu_backend(request, monkeypatch):
    """Runs a test once with the C kernel (sge_cpu.c) and once with the torch-ops fast path."""
    if request.param == "cpu_kernel":
        assert sge_cpu.available(), "the C kernel should build here (gcc is on the CI image)"
    else:
        monkeypatch.setattr(sge_cpu, "_library", None)
        monkeypatch.setattr(sge_cpu, "_failed", True)
        assert not sge_cpu.available()
    return request.param


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_matches_float64_formula(impl, cpu_backend):
    generator = torch.Generator().manual_seed(0)
    module = SpatialGroupEnhance(24, groups=6, impl=impl)
    with torch.no_grad():
        module.weight.copy_(torch.randn(1, 6, 1, 1, generator=generator))
        module.bias.copy_(torch.randn(1, 6, 1, 1, generator=generator))
    x = torch.randn(3, 24, 5, 7, generator=generator) * 2 + 0.5
    expected = formula_float64(x, module.weight.detach(), module.bias.detach(), 6)
    actual = module(x)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "fast", "triton"])
@pytest.mark.parametrize("shape", [(3, 24, 5, 7), (2, 24, 1, 1)])
def test_without_normalization_the_raw_similarity_is_the_logit(impl, shape, cpu_backend):
    """normalize=False: sigmoid(gamma * c + beta) with c the raw dot product, under every impl
    (the fast kernels hand this variant to the reference formula); no spatial std, so a single
    position is fine."""
    generator = torch.Generator().manual_seed(20)
    module = SpatialGroupEnhance(24, groups=6, impl=impl, normalize=False)
    with torch.no_grad():
        module.weight.copy_(torch.randn(1, 6, 1, 1, generator=generator) * 0.3)
        module.bias.copy_(torch.randn(1, 6, 1, 1, generator=generator))
    x = torch.randn(*shape, generator=generator) + 0.2
    expected = formula_float64(x, module.weight.detach(), module.bias.detach(), 6, normalize=False)
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert module.computed_impl == "reference"
    normalized = formula_float64(x, module.weight.detach(), module.bias.detach(), 6) if shape[2] * shape[3] > 1 else None
    assert normalized is None or relative_error(expected, normalized) > 1e-2  # the variant computes something else


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("impl", ["fast", "triton"])
def test_every_impl_equals_reference_in_the_model_with_and_without_normalization(impl, normalize, cpu_backend):
    """The dispatch of a whole SGE model (fused BN + SGE, eval without grad) for both settings:
    outputs and gradients equal the reference implementation's."""
    from sge_repro.models import create_model

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    results = {}
    for name in ("reference", impl):
        model = create_model("sge_resnet18", num_classes=3, groups=4, width=8, sge_impl=name, seed=0,
                             sge_weight_init=0.5, sge_bias_init=-0.5, sge_normalize=normalize)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [model.layer2[0].sge.weight, model.conv1.weight])
        model.eval()
        with torch.no_grad():
            results[name] = (out, *grads, model(x))
    for label, actual, expected in zip(("out", "dgamma", "dconv1", "eval"), results[impl], results["reference"]):
        assert relative_error(actual, expected) <= 1e-5, label


def test_parameters_match_official_names_and_init():
    module = SpatialGroupEnhance(256, groups=64)
    assert dict((k, tuple(v.shape)) for k, v in module.state_dict().items()) == {
        "weight": (1, 64, 1, 1), "bias": (1, 64, 1, 1)}
    assert torch.count_nonzero(module.weight) == 0
    assert torch.all(module.bias == 1)


def test_init_values_set_every_group():
    module = SpatialGroupEnhance(32, groups=8, weight_init=0.25, bias_init=-3)
    assert torch.all(module.weight == 0.25) and torch.all(module.bias == -3.0)
    assert module.weight.dtype == module.bias.dtype == torch.float32


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_zero_gamma_is_constant_sigmoid_one_gate(impl):
    module = SpatialGroupEnhance(32, groups=8, impl=impl)
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(x), x * torch.sigmoid(torch.tensor(1.0)))


@pytest.mark.parametrize("channels,groups", [(30, 4), (64, 128), (10, 0)])
def test_group_validation_names_both_numbers(channels, groups):
    with pytest.raises(UserError) as error:
        SpatialGroupEnhance(channels, groups=groups)
    assert f"channels={channels}" in str(error.value) and f"groups={groups}" in str(error.value)


def test_unknown_impl_is_user_error():
    with pytest.raises(UserError, match="impl"):
        SpatialGroupEnhance(8, groups=2, impl="tensorrt")


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_gradcheck(impl):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    gamma = torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    beta = torch.randn(1, 4, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    function = sge_reference if impl == "reference" else sge_fast
    assert torch.autograd.gradcheck(lambda a, w, b: function(a, w, b, 4), (x, gamma, beta))


@pytest.mark.parametrize(
    "shape,groups,channels_last",
    [((2, 64, 14, 14), 8, False), ((3, 48, 7, 5), 16, False), ((2, 64, 9, 11), 64, True),
     ((1, 12, 1, 2), 3, False), ((4, 256, 8, 8), 64, True)],
)
def test_fast_equals_reference_outputs_and_grads(shape, groups, channels_last, cpu_backend):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=generator) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(1, groups, 1, 1, generator=generator)
    beta = torch.randn(1, groups, 1, 1, generator=generator)
    grad_out = torch.randn(*shape, generator=generator)
    results = {}
    for name, function in (("reference", sge_reference), ("fast", sge_fast)):
        inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
        if channels_last:
            inputs[0] = x.clone().requires_grad_(True)
        out = function(inputs[0], inputs[1], inputs[2], groups)
        grads = torch.autograd.grad(out, inputs, grad_out)
        results[name] = (out, *grads)
    if channels_last:
        assert results["fast"][0].is_contiguous(memory_format=torch.channels_last)
    for label, fast, reference in zip(("out", "dx", "dgamma", "dbeta"), results["fast"], results["reference"]):
        assert relative_error(fast, reference) <= 1e-5, label


def _bn_sge_pair(channels, groups, momentum, seed):
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for impl in ("reference", "fast"):
        bn = torch.nn.BatchNorm2d(channels, momentum=momentum)
        sge = SpatialGroupEnhance(channels, groups=groups, impl=impl)
        modules.append((bn, sge))
    state_generator = torch.Generator().manual_seed(seed + 1)
    for bn, sge in modules:
        state_generator.manual_seed(seed + 1)
        with torch.no_grad():
            for tensor in (bn.weight, bn.bias, sge.weight, sge.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=state_generator))
            bn.running_var.uniform_(0.5, 2.0, generator=state_generator)
    return modules, generator


@pytest.mark.parametrize("training,momentum", [(True, 0.1), (True, None), (False, 0.1)])
def test_fused_batchnorm_sge_equals_modules_in_turn(training, momentum, cpu_backend):
    from sge_repro.models.sge_fast import batchnorm_sge

    (reference, fast), generator = _bn_sge_pair(128, 16, momentum, seed=4)
    z = torch.randn(3, 128, 9, 7, generator=generator) * 2 + 0.3
    grad_out = torch.randn(3, 128, 9, 7, generator=generator)
    results = []
    for bn, sge in (reference, fast):
        bn.train(training)
        z_leaf = z.clone().requires_grad_(True)
        out = batchnorm_sge(z_leaf, bn, sge) if sge.impl == "fast" else sge(bn(z_leaf))
        grads = torch.autograd.grad(out, (z_leaf, bn.weight, bn.bias, sge.weight, sge.bias), grad_out)
        results.append((out, *grads, bn.running_mean.clone(), bn.running_var.clone()))
        assert int(bn.num_batches_tracked) == (1 if training else 0)
    labels = ("out", "dz", "dbn_weight", "dbn_bias", "dgamma", "dbeta", "running_mean", "running_var")
    for label, expected, actual in zip(labels, *results):
        assert relative_error(actual, expected) <= 1e-5, label


def test_fused_batchnorm_sge_saves_no_block_sized_tensor(cpu_backend):
    from sge_repro.models.sge_fast import batchnorm_sge

    (reference, fast), generator = _bn_sge_pair(256, 64, 0.1, seed=5)
    z = torch.randn(2, 256, 14, 14, generator=generator).requires_grad_(True)
    saved = {}
    for (bn, sge) in (reference, fast):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            batchnorm_sge(z, bn, sge) if sge.impl == "fast" else sge(bn(z))
        saved[sge.impl] = sizes
    block = z.numel()
    assert sum(size >= block for size in saved["fast"]) == 1  # only z, which BN alone saves too
    assert sum(size >= block for size in saved["reference"]) >= 2


def test_fused_path_falls_back_when_hooked():
    from sge_repro.models.sge_fast import batchnorm_sge

    (_, (bn, sge)), generator = _bn_sge_pair(32, 8, 0.1, seed=6)
    calls = []
    sge.register_forward_hook(lambda module, args, out: calls.append(out.shape) and None)
    batchnorm_sge(torch.randn(2, 32, 4, 4, generator=generator, requires_grad=True), bn, sge)
    assert calls == [(2, 32, 4, 4)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fast_low_precision_keeps_dtype_and_matches_float32(device):
    generator = torch.Generator().manual_seed(8)
    x = (torch.randn(2, 64, 7, 7, generator=generator) * 2).to(device=device, dtype=torch.bfloat16)
    gamma = torch.randn(1, 8, 1, 1, generator=generator).to(device).requires_grad_(True)
    beta = torch.randn(1, 8, 1, 1, generator=generator).to(device).requires_grad_(True)
    x_leaf = x.clone().requires_grad_(True)
    out = sge_fast(x_leaf, gamma, beta, 8)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and x_leaf.grad.dtype == torch.bfloat16 and gamma.grad.dtype == torch.float32
    expected = sge_reference(x.float(), gamma.detach(), beta.detach(), 8)
    assert relative_error(out.float(), expected) <= 2e-2


def test_sge_model_trains_under_bfloat16_autocast():
    from sge_repro.models import create_model

    model = create_model("sge_resnet18", num_classes=3, groups=8, width=16, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).float().sum()
    loss.backward()
    assert torch.isfinite(model.layer1[0].sge.weight.grad).all()


@pytest.mark.parametrize("shape,groups,channels_last", [((2, 64, 9, 11), 8, False), ((3, 48, 7, 5), 16, True)])
def test_elementwise_formulation_equals_reference(monkeypatch, shape, groups, channels_last):
    """The CUDA formulation (broadcast product + channel sum instead of batched matvecs), run here on CPU."""
    from sge_repro.models import sge_fast as fast_path

    monkeypatch.setattr(fast_path, "ELEMENTWISE_DEVICES", {"cpu", "cuda"})
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=generator) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.randn(1, groups, 1, 1, generator=generator), torch.randn(1, groups, 1, 1, generator=generator)
    grad_out = torch.randn(*shape, generator=generator)
    results = {}
    for name, function in (("reference", sge_reference), ("fast", sge_fast)):
        inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
        out = function(*inputs, groups)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out))
    with torch.no_grad():
        results["fast_eval"] = (sge_fast(x, gamma, beta, groups),)
    for label, fast, reference in zip(("out", "dx", "dgamma", "dbeta"), results["fast"], results["reference"]):
        assert relative_error(fast, reference) <= 1e-5, label
    assert relative_error(results["fast_eval"][0], results["reference"][0]) <= 1e-5


def test_inplace_eval_overwrites_only_when_asked(cpu_backend):
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(2, 32, 6, 5, generator=generator) * 2 - 0.5
    gamma, beta = torch.randn(1, 8, 1, 1, generator=generator), torch.randn(1, 8, 1, 1, generator=generator)
    expected = sge_reference(x, gamma, beta, 8)
    original = x.clone()
    with torch.no_grad():
        assert relative_error(sge_fast(x, gamma, beta, 8), expected) <= 1e-5
        assert torch.equal(x, original)
        out = sge_fast(x, gamma, beta, 8, inplace=True)
    assert out.data_ptr() == x.data_ptr() and relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm_sge_eval_no_grad_equals_modules_in_turn(channels_last, cpu_backend):
    from sge_repro.models.sge_fast import batchnorm_sge

    (reference, fast), generator = _bn_sge_pair(64, 16, 0.1, seed=11)
    z = torch.randn(3, 64, 7, 9, generator=generator) * 2 + 0.3
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z_before = z.clone()
    with torch.no_grad():
        outputs = [batchnorm_sge(z, bn.eval(), sge) for bn, sge in (reference, fast)]
    assert torch.equal(z, z_before)
    assert outputs[1].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert relative_error(outputs[1], outputs[0]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_cuda_compiled_equals_reference(channels_last):
    generator = torch.Generator().manual_seed(12)
    x = (torch.randn(4, 256, 14, 14, generator=generator) * 3 + 1).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = (torch.randn(1, 64, 1, 1, generator=generator).cuda() for _ in range(2))
    grad_out = torch.randn(4, 256, 14, 14, generator=generator).cuda()
    results = {}
    for name, function in (("reference", sge_reference), ("fast", sge_fast)):
        inputs = [t.clone().requires_grad_(True) for t in (x, gamma, beta)]
        out = function(*inputs, 64)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out))
    assert results["fast"][0].is_contiguous(memory_format=torch.channels_last) == channels_last
    for label, fast, reference in zip(("out", "dx", "dgamma", "dbeta"), results["fast"], results["reference"]):
        assert relative_error(fast, reference) <= 1e-5, label


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_single_position_maps_are_refused_not_nan(impl):
    from sge_repro.errors import UserError
    from sge_repro.models import create_model

    model = create_model("sge_resnet18", num_classes=4, groups=4, width=8, sge_impl=impl)
    with pytest.raises(UserError, match=r"1x1 positions: the spatial std needs at least 2"):
        model(torch.randn(2, 3, 32, 32))  # layer4 sees 1x1
    assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()  # 2x2 is enough


def _block_copies(function, block_numel: int) -> int:
    """aten::copy_ calls on block-sized tensors while `function` runs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        function()
    return sum(1 for event in prof.events() if event.name == "aten::copy_" and event.input_shapes
               and event.input_shapes[0] and math.prod(event.input_shapes[0]) == block_numel)


def test_cuda_formulation_reads_channels_last_in_place(monkeypatch):
    """The CUDA formulation (run here on CPU) computes on a channels_last block where it lies: the
    same outputs and gradients as for NCHW, channels_last out and back, no block-sized copy."""
    from sge_repro.models import sge_fast as fast_path

    monkeypatch.setattr(fast_path, "ELEMENTWISE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(sge_cpu, "_library", None)
    monkeypatch.setattr(sge_cpu, "_failed", True)
    generator = torch.Generator().manual_seed(13)
    shape, groups = (3, 64, 9, 11), 16
    x = torch.randn(*shape, generator=generator) * 3 + 1
    gamma, beta = torch.randn(1, groups, 1, 1, generator=generator), torch.randn(1, groups, 1, 1, generator=generator)
    grad_out = torch.randn(*shape, generator=generator)
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        leaves = [x.contiguous(memory_format=layout).requires_grad_(True), gamma.clone().requires_grad_(True),
                  beta.clone().requires_grad_(True)]
        out = sge_fast(*leaves, groups)
        grads = torch.autograd.grad(out, leaves, grad_out.contiguous(memory_format=layout))
        results[layout] = (out, *grads)
        with torch.no_grad():
            evaluated = sge_fast(leaves[0].detach(), gamma, beta, groups)
        assert relative_error(evaluated, out) <= 1e-6
        if layout == torch.channels_last:
            assert out.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)
            assert evaluated.is_contiguous(memory_format=layout)

            grad_channels_last = grad_out.contiguous(memory_format=layout)

            def step():
                leaf = leaves[0].detach().requires_grad_(True)
                sge_fast(leaf, leaves[1], leaves[2], groups).backward(grad_channels_last)
                with torch.no_grad():
                    sge_fast(leaf.detach(), gamma, beta, groups)

            assert _block_copies(step, x.numel()) == 0
    for label, nchw, channels_last in zip(("out", "dx", "dgamma", "dbeta"), *results.values()):
        assert relative_error(channels_last, nchw) <= 1e-5, label


@pytest.mark.parametrize("training", [True, False])
def test_fused_batchnorm_sge_takes_channels_last_in_the_cuda_formulation(monkeypatch, training):
    from sge_repro.models import sge_fast as fast_path
    from sge_repro.models.sge_fast import batchnorm_sge

    monkeypatch.setattr(fast_path, "ELEMENTWISE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(sge_cpu, "_library", None)
    monkeypatch.setattr(sge_cpu, "_failed", True)
    (reference, fast), generator = _bn_sge_pair(64, 8, 0.1, seed=14)
    z = (torch.randn(2, 64, 7, 10, generator=generator) * 2 + 0.3).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 64, 7, 10, generator=generator).contiguous(memory_format=torch.channels_last)
    results, saved = [], []
    for bn, sge in (reference, fast):
        bn.train(training)
        z_leaf = z.clone().requires_grad_(True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = batchnorm_sge(z_leaf, bn, sge) if sge.impl == "fast" else sge(bn(z_leaf))
        saved.append(sum(size >= z.numel() for size in sizes))
        grads = torch.autograd.grad(out, (z_leaf, bn.weight, bn.bias, sge.weight, sge.bias), grad_out)
        results.append((out, *grads, bn.running_mean.clone(), bn.running_var.clone()))
    assert saved[1] == 1  # the fused Function: only z
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    labels = ("out", "dz", "dbn_weight", "dbn_bias", "dgamma", "dbeta", "running_mean", "running_var")
    for label, expected, actual in zip(labels, *results):
        assert relative_error(actual, expected) <= 1e-5, label
