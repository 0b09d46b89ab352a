"""Model complexity: #params, GFLOPs (fvcore, multiply-adds) and measured forward latency.

fvcore counts convolutions and matmuls but skips elementwise ops by default; the attention
modules are made almost only of those, so handles below count them (one op per output element,
one per input element for reductions) - otherwise SGE would look free by construction.
Residual additions of the plain ResNet stay uncounted, as in the paper's counter.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from sge_repro.errors import UserError
from sge_repro.models.attention import SpatialGroupEnhance
from sge_repro.models.registry import create_model, list_models


def count_params_m(model: nn.Module) -> float:
    """Trainable + frozen parameters, in millions (buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters()) / 1e6


def _shape_numel(value) -> int:
    shape = value.type().sizes() if hasattr(value.type(), "sizes") else None
    return math.prod(int(size) for size in shape) if shape else 0


def _count_outputs(inputs, outputs) -> int:
    return _shape_numel(outputs[0])


def _count_first_input(inputs, outputs) -> int:
    return _shape_numel(inputs[0])


# Elementwise ops the attention modules use; counted per output element.
_ELEMENTWISE_OPS = (
    "aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::sigmoid", "aten::sigmoid_",
    "aten::softmax", "aten::_softmax", "aten::sub", "aten::rsub", "aten::addcmul",
)
# Reductions: one op per input element.
_REDUCTION_OPS = ("aten::mean", "aten::sum", "aten::amax", "aten::std", "aten::var", "aten::max")


def _flop_handles() -> dict[str, Any]:
    handles: dict[str, Any] = {op: _count_outputs for op in _ELEMENTWISE_OPS}
    handles.update({op: _count_first_input for op in _REDUCTION_OPS})
    return handles


def count_gflops(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> float:
    """Multiply-adds of one forward pass on a 1 x 3 x S x S input, in G (fvcore + handles above).

    Traced in eval mode with SGE switched to its reference implementation: the count belongs to
    the function, and the fast path's kernels are opaque to a trace."""
    was_training = model.training
    sge_modules = [(module, module.impl) for module in model.modules() if isinstance(module, SpatialGroupEnhance)]
    model.eval()
    try:
        for module, _ in sge_modules:
            module.impl = "reference"
        # fvcore's tracer emits deprecation / tracer warnings on current torch: not the user's concern.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis  # its import runs torch.jit.script (deprecated)

            example = torch.zeros(1, in_chans, image_size, image_size)
            analysis = FlopCountAnalysis(model, example)
            analysis.set_op_handle(**_flop_handles())
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        model.train(was_training)
        for module, impl in sge_modules:
            module.impl = impl
    return total / 1e9


def model_complexity(name: str, num_classes: int = 1000, image_size: int = 224, **model_kwargs: Any) -> dict:
    """{"name", "params_m", "gflops"} of one model as configured (width, groups, classes, resolution)."""
    model = create_model(name, num_classes=num_classes, seed=0, **model_kwargs)
    return {
        "name": name,
        "params_m": round(count_params_m(model), 3),
        "gflops": round(count_gflops(model, image_size=image_size), 3),
    }


def model_table(names: Iterable[str] | None = None, image_size: int = 224, num_classes: int = 1000) -> list[dict]:
    """[{"name", "params_m", "gflops"}] for `names` (all models by default), as `sge-repro models --json`."""
    chosen = list(names) if names is not None else list_models()
    return [model_complexity(name, num_classes=num_classes, image_size=image_size) for name in chosen]


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    names: Iterable[str],
    batch: int = 1,
    image_size: int = 224,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Forward (eval, no_grad) latency per model: runs interleaved across models (so drift in
    machine load hits all alike), median of `repeats` after `warmup` rounds.

    Returns [{"name", "device", "batch", "image_size", "median_ms", "min_ms", "repeats"}].
    """
    names = list(names)
    if repeats < 5:
        raise UserError(f"latency: repeats={repeats}, expected at least 5")
    if batch < 1 or image_size < 32:
        raise UserError(f"latency: batch={batch}, image_size={image_size}; expected batch >= 1 and image_size >= 32")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"latency: device {device!r} requested but CUDA is not available")

    models = {name: create_model(name, seed=seed).to(target).eval() for name in names}
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, image_size, image_size, generator=generator).to(target)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                synchronize(target)
                start = time.perf_counter()
                model(inputs)
                synchronize(target)
                if round_index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return [
        {"name": name, "device": str(target), "batch": batch, "image_size": image_size,
         "median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": repeats}
        for name, samples in times.items()
    ]
