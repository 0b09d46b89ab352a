import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from sge_repro.atomic import torch_save
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.attention import SpatialGroupEnhance
from sge_repro.models.weight_files import make_classifier_checkpoint
from sge_repro.report import build_report, render_console
from sge_repro.report.activations import STATS_FILE, measure, sge_modules, summarize, write_stats
from sge_repro.report.collect import read_activation_stats
from sge_repro.report.files import render_html
from sge_repro.report.render import render_markdown
from sge_repro.report.visualize import visualize_trained_models


def _two_level_input(groups: int = 2, channels_per_group: int = 4, size: int = 6) -> torch.Tensor:
    """Every channel the same map: half the positions weak (0.05), half strong (1.0)."""
    pattern = torch.full((size, size), 0.05)
    pattern[:, size // 2:] = 1.0
    return pattern.expand(1, groups * channels_per_group, size, size).clone()


def test_a_large_gamma_widens_the_spread_and_gates_weak_positions_down():
    sge = SpatialGroupEnhance(8, groups=2, weight_init=20.0, bias_init=0.0)
    model = torch.nn.Sequential(torch.nn.Identity(), sge)
    stats = measure(model, [_two_level_input()], "1")
    assert stats["layer"] == "1" and stats["images"] == 1 and len(stats["groups"]) == 2
    for group in stats["groups"]:
        assert group["variance_after"] > group["variance_before"]
        assert group["weak_fraction"] == pytest.approx(0.5)
        assert group["weak_gate"] < 0.01 < 0.99 < group["strong_gate"]
    summary = summarize(stats["groups"])
    assert summary["groups_increased"] == 1.0 and summary["verdict"] == "held"
    assert summary["variance_ratio"] > 1.0


def test_a_negative_gamma_is_not_the_papers_behaviour():
    model = torch.nn.Sequential(torch.nn.Identity(), SpatialGroupEnhance(8, groups=2, weight_init=-20.0))
    assert summarize(measure(model, [_two_level_input()], "1")["groups"])["verdict"] == "not held"


def test_with_gamma_zero_the_gate_is_constant_and_the_ratio_is_sigmoid_beta_squared():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("sge_resnet18", num_classes=5, groups=8, width=16)
    beta = 0.7
    for module in sge_modules(model).values():
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.constant_(module.bias, beta)
    images = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    stats = measure(model, images, list(sge_modules(model))[-1])
    expected = float(torch.sigmoid(torch.tensor(beta))) ** 2
    for group in stats["groups"]:
        assert group["variance_after"] / group["variance_before"] == pytest.approx(expected, rel=1e-4)
        for gate in (group["weak_gate"], group["strong_gate"]):
            assert gate is None or gate == pytest.approx(math.sqrt(expected), rel=1e-5)
    assert summarize(stats["groups"])["variance_ratio"] == pytest.approx(expected, rel=1e-4)


def test_the_visualize_stage_writes_the_stats_and_the_report_shows_the_verdict(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    kwargs = {"num_classes": 2, "groups": 8, "width": 16}
    model = create_model("sge_resnet18", **kwargs)
    checkpoint = torch_save(make_classifier_checkpoint("sge_resnet18", kwargs, model), tmp_path / "best.pt")
    samples = []
    for index in range(3):
        path = tmp_path / f"val_{index}.png"
        Image.fromarray((np.random.default_rng(index).random((72, 72, 3)) * 255).astype(np.uint8)).save(path)
        samples.append((path, index % 2))
    out = tmp_path / "runs" / "visualize"
    written = visualize_trained_models(["resnet18", "sge_resnet18"], 0, lambda name, seed: checkpoint, samples, out,
                                       image_size=64)
    stats_path = out / "sge_resnet18-seed0" / STATS_FILE
    assert stats_path in written
    saved = json.loads(stats_path.read_text())
    assert saved["model"] == "sge_resnet18" and saved["seed"] == 0
    assert saved["layer"] == "layer4.1" and saved["images"] == 3 and len(saved["groups"]) == 8

    row = read_activation_stats(stats_path, tmp_path)
    assert row.verdict in ("held", "not held", "undetermined")
    assert row.group_variance_before == [g["variance_before"] for g in saved["groups"]]

    report = build_report(tmp_path, "embedded", bootstrap_samples=10)
    assert [r.model for r in report.summary.activations] == ["sge_resnet18"]
    assert report.summary.model_dump()["activations"][0]["verdict"] == row.verdict
    markdown, page = render_markdown(report), render_html(report)
    assert "## Activation analysis" in markdown and f"| {row.verdict} |" in markdown
    assert "<h2>Activation analysis</h2>" in page and "before vs after SGE" in page
    console = Console(width=80, record=True)
    render_console(report, console)
    assert "SGE activations sge_resnet18 seed 0: variance x" in console.export_text()


def test_a_report_without_sge_stats_has_no_activation_section(tmp_path):
    report = build_report(tmp_path, "embedded", bootstrap_samples=10)
    assert "activations" not in report.summary.model_dump()
    assert "Activation analysis" not in render_markdown(report)


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ('{"model": "m", "seed": 0, "layer": "l", "images": 1, "weak_threshold": 0.1, "groups": 3}', "key 'groups'"),
    ('{"model": "m", "seed": 0, "layer": "l", "images": 1, "weak_threshold": 0.1, '
     '"groups": [{"variance_before": "x", "variance_after": 1}]}', "key 'groups.0.variance_before'"),
    ('{"seed": 0, "layer": "l", "images": 1, "weak_threshold": 0.1, "groups": []}', "key 'groups'"),
])
def test_a_malformed_stats_file_is_a_one_line_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "runs" / "visualize" / "sge_resnet18-seed0" / STATS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(UserError) as caught:
        build_report(tmp_path, "embedded", bootstrap_samples=10)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"runs/visualize/sge_resnet18-seed0/{STATS_FILE}:")
    assert reason in message


def test_write_stats_is_read_back(tmp_path):
    stats = {"model": "sge_resnet50", "seed": 1, "layer": "layer4.2", "images": 2, "weak_threshold": 0.1,
             "groups": [{"variance_before": 1.0, "variance_after": 2.0, "weak_fraction": 0.25, "weak_gate": 0.2,
                         "strong_gate": 0.8}]}
    path = write_stats(stats, tmp_path)
    row = read_activation_stats(path, tmp_path)
    assert (row.variance_ratio, row.groups_increased, row.weak_gate, row.strong_gate, row.verdict) == (
        2.0, 1.0, 0.2, 0.8, "held")
