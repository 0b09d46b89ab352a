"""`sge-repro bench data --json` at a tiny scale: the documented schema, real DVC underneath."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow

SCHEMA = {
    "machine": dict, "scale": float, "files": dict, "build_s": float, "smoke_run_s": float,
    "first_index_s": float, "first_index_images_per_s": float, "status_s": list, "noop_run_s": list,
    "status_median_s": float, "noop_run_median_s": float, "rescan_s": list, "rescan_median_s": float,
    "manifest_bytes": dict, "verify": dict, "targets": dict,
}
VERIFY = {"images": int, "width": int, "height": int, "quality": int, "one_core_s": float,
          "one_core_images_per_s": float, "all_cores": int, "all_cores_s": float, "all_cores_images_per_s": float}


def test_bench_data_json_schema(sge_repro_bin, tmp_path):
    run = subprocess.run([sge_repro_bin, "bench", "data", "--work", str(tmp_path / "work"), "--scale", "0.001",
                          "--repeats", "1", "--verify-images", "80", "--json"],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert {key: type(result[key]) for key in SCHEMA} == SCHEMA and set(result) == set(SCHEMA)
    assert {key: type(result["verify"][key]) for key in VERIFY} == VERIFY
    # ImageNet's shape: every one of the 1000 class folders holds at least one train and one val file
    assert result["files"] == {"imagenet_train": 1281, "imagenet_val": 1000, "coco_train": 118, "coco_val": 5}
    assert set(result["machine"]) == {"cpu", "cores", "load_before", "load_after"}
    assert len(result["status_s"]) == len(result["noop_run_s"]) == len(result["rescan_s"]) == 1
    assert result["manifest_bytes"]["cls"] > 2281 * 10   # one entry per indexed file
    assert result["verify"]["one_core_images_per_s"] > 0 and result["targets"] == {"status_s": 10.0, "noop_run_s": 10.0}


def test_bench_data_refuses_a_used_folder(sge_repro_bin, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    run = subprocess.run([sge_repro_bin, "bench", "data", "--work", str(tmp_path / "used"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "not empty; expected a new folder" in run.stderr
