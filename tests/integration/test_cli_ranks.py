"""Under torchrun (RANK set) only rank 0 prints tables and progress; errors come from every rank."""

import os
import subprocess


def run_as_rank(bin_path: str, rank: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": rank}
    return subprocess.run([bin_path, *args], capture_output=True, text=True, timeout=120, env=env)


def test_only_rank_zero_prints_results(sge_repro_bin):
    assert "resnet18" in run_as_rank(sge_repro_bin, "0", "models", "resnet18").stdout
    secondary = run_as_rank(sge_repro_bin, "1", "models", "resnet18")
    assert secondary.returncode == 0 and secondary.stdout == ""


def test_errors_are_printed_by_every_rank(sge_repro_bin):
    result = run_as_rank(sge_repro_bin, "1", "models", "resnet_nosuch")
    assert result.returncode == 2 and "unknown name 'resnet_nosuch'" in result.stderr
