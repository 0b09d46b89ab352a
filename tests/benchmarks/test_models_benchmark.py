"""benchmark_sge: structure of its result and the memory claim of the fused BN+SGE path."""

import pytest
import torch

from sge_repro.errors import UserError
from benchmarks.models import benchmark_sge


def test_benchmark_sge_small_run():
    torch.set_num_threads(1)
    result = benchmark_sge(batch=1, image_size=64, repeats=7, warmup=0, module_shape=(1, 128, 6, 6), module_groups=8)
    models = result["models"]
    assert set(models) == {"torchvision_resnet50", "resnet50", "sge_resnet50_reference", "sge_resnet50_fast"}
    assert models["resnet50"]["forward_ratio"] == 1.0 and models["torchvision_resnet50"]["forward_vs_torchvision"] == 1.0
    # Our plain ResNet50 keeps exactly torchvision's activations for backward.
    assert models["resnet50"]["memory_vs_torchvision"] == 1.0
    assert all(row["forward_ms"] > 0 and row["train_step_ms"] > 0 for row in models.values())
    # The fused BN+SGE path keeps no block-sized tensor: activation memory within 1% of ResNet50,
    # while the reference module adds one tensor per block.
    assert models["sge_resnet50_fast"]["memory_ratio"] < 1.01
    assert models["sge_resnet50_reference"]["memory_ratio"] > 1.1  # 1.38 at batch 16, 224
    assert result["module"]["fast"]["forward_gb_s"] > 0


def test_benchmark_sge_rejects_bad_arguments():
    with pytest.raises(UserError, match="repeats=5"):
        benchmark_sge(repeats=5)
    with pytest.raises(UserError, match="dtype='int8'"):
        benchmark_sge(dtype="int8")
