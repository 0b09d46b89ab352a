"""GFLOPs against the paper's table, the `models --json` rows, latency measurement."""

import pytest
import torch

from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.complexity import count_gflops, measure_latency, model_table

# paper-results.md, ImageNet table (GFLOPs at 224x224, multiply-adds).
PAPER_GFLOPS = {
    "resnet50": 4.122, "se_resnet50": 4.130, "sk_resnet50": 4.185, "bam_resnet50": 4.205,
    "cbam_resnet50": 4.139, "sge_resnet50": 4.127, "resnet101": 7.849, "se_resnet101": 7.863,
    "sk_resnet101": 7.978, "bam_resnet101": 7.933, "cbam_resnet101": 7.879, "sge_resnet101": 7.858,
}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_gflops_within_one_percent_of_paper(name):
    gflops = count_gflops(create_model(name, seed=0), image_size=224)
    assert abs(gflops / PAPER_GFLOPS[name] - 1) <= 0.01


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_sge_ops_are_counted(impl):
    plain = count_gflops(create_model("resnet50", seed=0))
    sge = count_gflops(create_model("sge_resnet50", sge_impl=impl, seed=0))
    # The module costs a few elementwise passes over every block output (~5.5M elements at 224).
    assert 0.005 < sge - plain < 0.05


def test_model_table_rows():
    rows = model_table(["resnet18", "sge_resnet18"], image_size=64)
    assert [set(row) for row in rows] == [{"name", "params_m", "gflops"}] * 2
    assert rows[0]["name"] == "resnet18" and rows[0]["params_m"] == pytest.approx(11.690, abs=1e-3)
    assert rows[1]["params_m"] > rows[0]["params_m"]
    assert 0.1 < rows[0]["gflops"] < 0.2  # 1.82 GFLOPs at 224, scaled by (64/224)^2


def test_measure_latency_interleaved_median():
    torch.set_num_threads(1)
    rows = measure_latency(["resnet18"], batch=1, image_size=32, device="cpu", repeats=5, warmup=1)
    assert rows[0]["name"] == "resnet18" and rows[0]["repeats"] == 5
    assert 0 < rows[0]["min_ms"] <= rows[0]["median_ms"]
    with pytest.raises(UserError, match="repeats=3"):
        measure_latency(["resnet18"], repeats=3)
