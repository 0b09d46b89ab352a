"""How much SGE costs: ResNet50 (torchvision's and ours) vs SGE-ResNet50 (reference and fast
module), side by side. torchvision's ResNet50 is what a user compares with; our plain ResNet50
runs the same aten ops (tests/models/test_resnet.py), so the two differ only by noise.

All variants run interleaved in the same rounds (machine-load drift hits them alike), in an order
rotated every round (a model run right after another's training step finds the allocator in
another state); each figure is the median over `repeats` rounds after warm-up. Memory of a training step is measured as the
bytes autograd saves for backward (distinct storages), the part of peak memory the module changes.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models import DEFAULT_GROUPS, DEFAULT_WIDTH, sge_triton
from sge_repro.models.complexity import synchronize
from sge_repro.models.registry import create_model
from sge_repro.models.sge import sge_reference
from sge_repro.models.sge_fast import sge_fast

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = (("torchvision_resnet50", "torchvision:resnet50", "fast"), ("resnet50", "resnet50", "fast"),
            ("sge_resnet50_reference", "sge_resnet50", "reference"), ("sge_resnet50_fast", "sge_resnet50", "fast"))
# Where the Triton kernels run (CUDA), they are measured too.
TRITON_VARIANT = ("sge_resnet50_triton", "sge_resnet50", "triton")


def _variants(device: torch.device) -> tuple:
    return VARIANTS + ((TRITON_VARIANT,) if sge_triton.applies(torch.empty(1, 1, 1, 1, device=device)) else ())


def _build(name: str, impl: str, seed: int) -> nn.Module:
    """Ours by registry name, or "torchvision:NAME" from torchvision.models (seeded init)."""
    if name.startswith("torchvision:"):
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return getattr(torchvision.models, name.split(":", 1)[1])(weights=None)
    return create_model(name, sge_impl=impl, seed=seed)


def _timed(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one training forward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        if not isinstance(tensor, nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _autocast(inputs.device, autocast_dtype):
        model(inputs).float().logsumexp(dim=1).mean()
    return sum(storages.values())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def benchmark_sge(
    batch: int = 16,
    image_size: int = 224,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 7,
    warmup: int = 2,
    seed: int = 0,
    module_shape: tuple[int, int, int, int] = (16, 1024, 14, 14),
    module_groups: int = DEFAULT_GROUPS,
) -> dict:
    """Forward (eval, no_grad) and training-step times of torchvision's ResNet50, ours, and SGE-ResNet50
    with the reference and the fast module; their ratios to our plain model (`*_ratio`) and to
    torchvision's (`*_vs_torchvision`; `*_vs_torchvision_paired`: the median of the per-round ratios),
    saved-activation memory, and the module alone with GB/s.

    dtype: "float32" or (autocast) "bfloat16" / "float16". Returns a JSON-ready dict.
    """
    if repeats < 7:
        raise UserError(f"bench sge: repeats={repeats}, expected at least 7")
    if dtype not in _DTYPES:
        raise UserError(f"bench sge: dtype={dtype!r}, expected one of {', '.join(_DTYPES)}")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bench sge: device {device!r} requested but CUDA is not available")
    autocast_dtype = None if dtype == "float32" else _DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(target)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(target)

    variants = _variants(target)
    models, optimizers = {}, {}
    for label, name, impl in variants:
        models[label] = _build(name, impl, seed).to(target)
        optimizers[label] = torch.optim.SGD(models[label].parameters(), lr=1e-3, momentum=0.9)

    def forward(label: str) -> None:
        model = models[label].eval()
        with torch.no_grad(), _autocast(target, autocast_dtype):
            model(images)

    def train_step(label: str) -> None:
        model, optimizer = models[label].train(), optimizers[label]
        optimizer.zero_grad(set_to_none=True)
        with _autocast(target, autocast_dtype):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()

    samples: dict[str, dict[str, list[float]]] = {label: {"forward_ms": [], "train_step_ms": []} for label, _, _ in variants}
    for round_index in range(warmup + repeats):
        shift = round_index % len(variants)  # rotate who goes first: no model always follows the same one
        for label, _, _ in variants[shift:] + variants[:shift]:
            forward_ms = _timed(lambda: forward(label), target)
            train_ms = _timed(lambda: train_step(label), target)
            if round_index >= warmup:
                samples[label]["forward_ms"].append(forward_ms)
                samples[label]["train_step_ms"].append(train_ms)

    memory = {label: saved_activation_bytes(models[label].train(), images, autocast_dtype) for label, _, _ in variants}
    results = {}
    for label, _, _ in variants:
        forward_ms = statistics.median(samples[label]["forward_ms"])
        train_ms = statistics.median(samples[label]["train_step_ms"])
        results[label] = {"forward_ms": forward_ms, "train_step_ms": train_ms,
                          "saved_activation_mb": memory[label] / 2**20}
    for suffix, baseline in (("ratio", results["resnet50"]), ("vs_torchvision", results["torchvision_resnet50"])):
        for label in results:
            row = results[label]
            row[f"forward_{suffix}"] = row["forward_ms"] / baseline["forward_ms"]
            row[f"train_step_{suffix}"] = row["train_step_ms"] / baseline["train_step_ms"]
            row[f"memory_{suffix}"] = row["saved_activation_mb"] / baseline["saved_activation_mb"]
    # On a loaded machine the ratio of medians drifts with the load; the median of each round's own
    # ratio (both measured seconds apart) is steadier.
    baseline_samples = samples["torchvision_resnet50"]
    for label in results:
        for what in ("forward", "train_step"):
            rounds = zip(samples[label][f"{what}_ms"], baseline_samples[f"{what}_ms"])
            results[label][f"{what}_vs_torchvision_paired"] = statistics.median(mine / theirs for mine, theirs in rounds)

    return {
        "device": str(target), "dtype": dtype, "batch": batch, "image_size": image_size, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "models": results,
        "module": benchmark_sge_module(module_shape, module_groups, target, _DTYPES[dtype], repeats, warmup, seed),
    }


def benchmark_sge_module(
    shape: tuple[int, int, int, int], groups: int, device: torch.device, dtype: torch.dtype,
    repeats: int = 7, warmup: int = 2, seed: int = 0,
) -> dict:
    """The module alone on one block output: forward and forward+backward per implementation, with
    the achieved bandwidth counted against the minimum traffic (forward: read x, write y;
    forward+backward: additionally read x and dy, write dx)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    grad_out = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    weight = torch.randn(1, groups, 1, 1, generator=generator).to(device)
    bias = torch.randn(1, groups, 1, 1, generator=generator).to(device)
    x_train = x.clone().requires_grad_(True)
    weight_train, bias_train = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    functions = {"reference": sge_reference, "fast": sge_fast}
    if sge_triton.applies(x):
        functions["triton"] = sge_triton.sge

    def forward(function) -> None:
        with torch.no_grad():
            function(x, weight, bias, groups)

    def forward_backward(function) -> None:
        out = function(x_train, weight_train, bias_train, groups)
        torch.autograd.grad(out, (x_train, weight_train, bias_train), grad_out)

    samples = {name: {"forward_ms": [], "forward_backward_ms": []} for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            forward_ms = _timed(lambda: forward(function), device)
            train_ms = _timed(lambda: forward_backward(function), device)
            if round_index >= warmup:
                samples[name]["forward_ms"].append(forward_ms)
                samples[name]["forward_backward_ms"].append(train_ms)
    tensor_bytes = x.numel() * x.element_size()
    result: dict = {"shape": list(shape), "groups": groups, "dtype": str(dtype).replace("torch.", "")}
    for name in functions:
        forward_ms = statistics.median(samples[name]["forward_ms"])
        train_ms = statistics.median(samples[name]["forward_backward_ms"])
        result[name] = {
            "forward_ms": forward_ms, "forward_backward_ms": train_ms,
            "forward_gb_s": 2 * tensor_bytes / forward_ms / 1e6,
            "forward_backward_gb_s": 5 * tensor_bytes / train_ms / 1e6,
        }
    return result


def benchmark_training(
    names: list[str], batch: int = 32, image_size: int = 224, device: str = "cpu", repeats: int = 5,
    warmup: int = 1, width: int = DEFAULT_WIDTH, groups: int = DEFAULT_GROUPS, num_classes: int = 1000, seed: int = 0,
) -> list[dict]:
    """Training images/s (forward + backward + SGD step) of each model, interleaved rounds, median;
    `ratio` is each model's throughput over the first one's."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bench train: device {device!r} requested but CUDA is not available")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(target)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(target)
    models = {name: create_model(name, num_classes=num_classes, groups=groups, width=width, seed=seed).to(target).train()
              for name in names}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[name](images), labels).backward()
        optimizers[name].step()

    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in names:
            elapsed = _timed(lambda: step(name), target)
            if round_index >= warmup:
                samples[name].append(elapsed)
    rows = [{"name": name, "step_ms": statistics.median(samples[name]),
             "images_per_s": batch / statistics.median(samples[name]) * 1e3} for name in names]
    for row in rows:
        row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows
