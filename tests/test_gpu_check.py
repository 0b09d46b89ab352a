"""tools/gpu_check.py, the GPU acceptance command, in its CPU dry run: every check runs end to end
at toy sizes and lands in the JSON and Markdown summaries (its plumbing, not a GPU's figures)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ["environment", "pytest_gpu", "sge_accuracy", "ddp", "training", "detection"]


def test_the_dry_run_runs_every_check_and_writes_both_summaries(tmp_path):
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["ok"] is True and list(report["checks"]) == CHECKS
    checks = report["checks"]
    assert all(check["ok"] for check in checks.values()), {name: c.get("error") for name, c in checks.items()}
    assert checks["pytest_gpu"]["selected"] > 0  # the marker still selects the GPU tests
    accuracy = checks["sge_accuracy"]["rows"]
    assert {(row["impl"], row["dtype"]) for row in accuracy} >= {(i, d) for i in ("fast", "reference")
                                                                  for d in ("float32", "bfloat16")}
    assert len({tuple(row["shape"][1:]) for row in accuracy}) == 4  # ResNet50's four SGE block shapes
    training = {(row["mode"], row["model"]) for row in checks["training"]["rows"]}
    assert ("bf16_channels_last", "sge_resnet50_fast") in training and ("fp32_benchmark", "torchvision_resnet50") in training
    assert set(checks["detection"]["backbones"]) == {"resnet50", "sge_resnet50"}
    assert checks["ddp"]["backend"] == "gloo" and checks["ddp"]["all_reduce_sum"] == [0.0, 1.0, 2.0]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check (cpu, dry run)") and all(f"**{name}**: ok" in markdown for name in CHECKS)


def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path):
    if torch.cuda.is_available():
        return  # there it runs the full check (the device tool's command)
    result = subprocess.run([sys.executable, "tools/gpu_check.py", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; use --dry-run to check the tool on a CPU"]
    assert not (tmp_path / "gpu_check.json").exists()
