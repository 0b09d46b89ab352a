"""`sge-repro bench loader --json` and `bench sge --json`: the documented schemas, from the real CLI."""

import json
import subprocess

NUMBER = (int, float)


def run_json(sge_repro_bin, *args):
    result = subprocess.run([sge_repro_bin, "bench", *args, "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def assert_schema(value, schema, where="$"):
    """schema: a type (or tuple of types), a list [item schema], or a dict of key -> schema (exact keys)."""
    if isinstance(schema, dict):
        assert isinstance(value, dict) and set(value) == set(schema), f"{where}: keys {sorted(value)}"
        for key, item in schema.items():
            assert_schema(value[key], item, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, f"{where}: expected a non-empty list"
        for index, item in enumerate(value):
            assert_schema(item, schema[0], f"{where}[{index}]")
    else:
        assert isinstance(value, schema) and not isinstance(value, bool), f"{where}: {value!r}"


def test_bench_loader_json_schema(sge_repro_bin):
    result = run_json(sge_repro_bin, "loader", "--images", "3", "--image-size", "32", "--rounds", "2", "--batch", "2")
    pipeline = {"description": str, "images_per_core_s": NUMBER, "images_per_s": NUMBER,
                "cpu_ms_per_image": [NUMBER], "wall_ms_per_image": [NUMBER]}
    assert_schema(result, {
        "image_size": int, "images": int, "rounds": int, "batch": int, "threads": int,
        "source": {"width": int, "height": int, "quality": int, "mean_kb": NUMBER},
        "machine": {"cpu": str, "cores": int, "load_average_before": [NUMBER], "load_average_after": [NUMBER]},
        "pipelines": {"reference": pipeline, "ours_torchvision": pipeline, "ours_pil": pipeline},
        "speedup_per_core": NUMBER, "speedup_per_core_pil": NUMBER, "to_model_input_cpu_ms_per_image": NUMBER,
    })
    assert (result["image_size"], result["images"], result["rounds"], result["threads"]) == (32, 3, 2, 1)
    assert (result["source"]["width"], result["source"]["height"], result["source"]["quality"]) == (500, 375, 90)
    assert 20 < result["source"]["mean_kb"] < 200  # full-size JPEGs, not thumbnails
    for row in result["pipelines"].values():
        assert len(row["cpu_ms_per_image"]) == 2 and row["images_per_core_s"] > 0
    reference = result["pipelines"]["reference"]["images_per_core_s"]
    assert result["speedup_per_core"] == result["pipelines"]["ours_torchvision"]["images_per_core_s"] / reference


def test_bench_sge_json_schema(sge_repro_bin):
    result = run_json(sge_repro_bin, "sge", "--batch", "1", "--image-size", "64", "--threads", "1", "--repeats", "7")
    row = {key: NUMBER for key in ("forward_ms", "train_step_ms", "saved_activation_mb")}
    row |= {f"{what}_{suffix}": NUMBER for what in ("forward", "train_step", "memory")
            for suffix in ("ratio", "vs_torchvision")}
    row |= {"forward_vs_torchvision_paired": NUMBER, "train_step_vs_torchvision_paired": NUMBER}
    implementation = {key: NUMBER for key in ("forward_ms", "forward_backward_ms", "forward_gb_s",
                                              "forward_backward_gb_s")}
    assert_schema(result, {
        "device": str, "dtype": str, "batch": int, "image_size": int, "repeats": int, "threads": int,
        "models": {name: row for name in ("torchvision_resnet50", "resnet50", "sge_resnet50_reference",
                                          "sge_resnet50_fast")},
        "module": {"shape": [int], "groups": int, "dtype": str, "reference": implementation, "fast": implementation},
    })
    assert result["threads"] == 1 and result["models"]["torchvision_resnet50"]["forward_vs_torchvision"] == 1.0
