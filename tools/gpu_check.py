"""The GPU acceptance check: `python tools/gpu_check.py OUT_DIR` on one CUDA GPU (<= 8 min), or
`python tools/gpu_check.py --dry-run OUT_DIR` on a CPU, which runs every check at toy sizes to
prove the tool's own plumbing (CI does; its numbers say nothing about a GPU).

Checks, each recorded with ok / its figures / the error that stopped it:
  environment  GPU architecture and driver against this torch build (sge_repro.cuda_support),
               torch.compile of a small function on the device (the compiler tool chain works)
  pytest_gpu   `pytest -m gpu` with SGE_REPRO_STRICT_COMPILE=1: a torch.compile failure fails the
               test instead of falling back to eager (dry run: the tests the marker selects)
  sge_accuracy each SGE implementation at ResNet50's four block shapes, fp32 and bf16, forward and
               backward, against the reference formula in float64
  ddp          one NCCL rank (dry run: gloo): DDP over a SyncBatchNorm SGE model, the project's
               collectives (sync_batchnorm.all_reduce_sum, a buffer broadcast)
  training     SGE-ResNet50 vs torchvision's ResNet50 training step at 224, batch 64: fp32 with
               cudnn.benchmark and bf16 + channels_last, per SGE implementation; ms and
               max_memory_allocated
  detection    Faster R-CNN R50-FPN, plain and SGE, at 800x1333, 2 images, 20 iterations: s/iter, the
               ratio, and how many graphs torch.compile built (a recompile per feature-map size shows here)
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESNET50_BLOCKS = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # SGE's (channels, size) per stage at 224
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}  # max |error| / max |reference|, against float64
FULL = {"batch": 64, "image": 224, "steps": 10, "sge_batch": 8, "det_size": (800, 1333), "det_iters": 20}
DRY = {"batch": 2, "image": 64, "steps": 2, "sge_batch": 1, "det_size": (128, 160), "det_iters": 2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_environment(device: torch.device, sizes: dict) -> dict:
    from sge_repro.cuda_support import cuda_problem, probe

    found = probe()
    problem = cuda_problem(**found)
    compiled = torch.compile(lambda x: torch.sigmoid(x) * x + 1)
    value = compiled(torch.ones(8, device=device))
    _sync(device)
    result = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "arch_list": found["arch_list"],
              "capability": found["capability"], "driver_cuda": found["driver_cuda"],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "compile": float(value[0]) == float(torch.sigmoid(torch.tensor(1.0)) + 1)}
    return {"ok": problem is None and result["compile"], "problem": problem, **result}


def check_pytest_gpu(device: torch.device, sizes: dict) -> dict:
    env = {**os.environ, "SGE_REPRO_STRICT_COMPILE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    if device.type != "cuda":
        command.append("--collect-only")  # no GPU: which tests the marker selects
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else result.stderr.strip()[-300:]
    selected = sum(1 for line in lines if "::" in line)
    ok = result.returncode == 0 and (device.type == "cuda" or selected > 0)
    return {"ok": ok, "summary": summary, "command": " ".join(command[2:]),
            **({"selected": selected} if device.type != "cuda" else {})}


def check_sge_accuracy(device: torch.device, sizes: dict) -> dict:
    from sge_repro.models import sge_triton
    from sge_repro.models.sge import sge_reference
    from sge_repro.models.sge_fast import sge_fast

    functions = {"reference": sge_reference, "fast": sge_fast}
    groups = 64
    generator = torch.Generator().manual_seed(0)
    rows, ok = [], True
    for channels, size in RESNET50_BLOCKS:
        x64 = torch.randn(sizes["sge_batch"], channels, size, size, generator=generator, dtype=torch.float64)
        weight64 = torch.randn(1, groups, 1, 1, generator=generator, dtype=torch.float64)
        bias64 = torch.randn(1, groups, 1, 1, generator=generator, dtype=torch.float64)
        grad64 = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
        inputs = [t.clone().requires_grad_(True) for t in (x64, weight64, bias64)]
        expected = sge_reference(*inputs, groups)
        expected_grads = torch.autograd.grad(expected, inputs, grad64)
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            x = x64.to(device=device, dtype=dtype)
            if sge_triton.applies(x):
                functions["triton"] = sge_triton.sge
            for name, function in functions.items():
                tensors = [x.clone().requires_grad_(True), weight64.to(device, torch.float32).requires_grad_(True),
                           bias64.to(device, torch.float32).requires_grad_(True)]
                out = function(*tensors, groups)
                grads = torch.autograd.grad(out, tensors, grad64.to(device=device, dtype=dtype))
                errors = [_relative_error(got, want) for got, want in zip((out, *grads), (expected, *expected_grads))]
                row = {"shape": list(x.shape), "dtype": dtype_name, "impl": name, "forward": errors[0],
                       "grad_x": errors[1], "grad_weight": errors[2], "grad_bias": errors[3]}
                row["ok"] = max(errors) <= TOLERANCE[dtype_name]
                ok &= row["ok"]
                rows.append(row)
    return {"ok": ok, "tolerance": TOLERANCE, "rows": rows}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    return float((got - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1e-12))


def check_ddp(device: torch.device, sizes: dict) -> dict:
    from sge_repro.classification.sync_batchnorm import all_reduce_sum, convert_sync_batchnorm
    from sge_repro.launch.local import free_port
    from sge_repro.models import create_model

    port = free_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        model = convert_sync_batchnorm(create_model("sge_resnet18", num_classes=10, width=16, groups=4, seed=0),
                                       device).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                                  gradient_as_bucket_view=True)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(4, 3, 64, 64, device=device)
        loss = nn.functional.cross_entropy(ddp(images), torch.arange(4, device=device) % 10)
        loss.backward()
        optimizer.step()
        summed = all_reduce_sum(torch.arange(3.0, device=device))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        _sync(device)
        loss = loss.detach()
        ok = bool(torch.isfinite(loss)) and summed.tolist() == [0.0, 1.0, 2.0]
        return {"ok": ok, "backend": backend, "loss": loss.item(), "all_reduce_sum": summed.tolist(),
                "sync_bn": type(next(m for m in model.modules() if "BatchNorm" in type(m).__name__)).__name__}
    finally:
        dist.destroy_process_group()


def check_training(device: torch.device, sizes: dict) -> dict:
    from sge_repro.models import create_model, sge_triton

    batch, image = sizes["batch"], sizes["image"]
    impls = ["fast", "reference"] + (["triton"] if sge_triton.applies(torch.empty(1, 1, 1, 1, device=device)) else [])
    variants = [("torchvision_resnet50", None)] + [(f"sge_resnet50_{impl}", impl) for impl in impls]
    modes = [("fp32_benchmark", None, False), ("bf16_channels_last", torch.bfloat16, True)]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    rows = []
    for mode, dtype, channels_last in modes:
        torch.backends.cudnn.benchmark = mode == "fp32_benchmark"
        for name, impl in variants:
            torch.manual_seed(0)
            model = torchvision.models.resnet50() if impl is None else create_model("sge_resnet50", sge_impl=impl, seed=0)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(device, memory_format=layout).train()
            inputs = images.to(memory_format=layout)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for step in range(sizes["steps"] + 2):  # two warm-up steps (autotuning, compilation)
                _sync(device)
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = nn.functional.cross_entropy(model(inputs).float(), labels)
                loss.backward()
                optimizer.step()
                _sync(device)
                if step >= 2:
                    times.append((time.perf_counter() - started) * 1e3)
            rows.append({"mode": mode, "model": name, "step_ms": sorted(times)[len(times) // 2],
                         "max_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                         "loss_finite": bool(torch.isfinite(loss))})
            del model, optimizer
    torch.backends.cudnn.benchmark = False
    for row in rows:
        baseline = next(r for r in rows if r["mode"] == row["mode"] and r["model"] == "torchvision_resnet50")
        row["vs_torchvision"] = row["step_ms"] / baseline["step_ms"]
    return {"ok": all(row["loss_finite"] for row in rows), "batch": batch, "image": image, "rows": rows}


def check_detection(device: torch.device, sizes: dict) -> dict:
    from sge_repro.detection.config import build_detector_config
    from sge_repro.detection.engine import DetectorTrainer  # imports detectron2 as patched here (compat)

    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage
    import torch._dynamo.utils as dynamo_utils  # no public counter of compiled graphs exists

    height, width = sizes["det_size"]
    generator = torch.Generator().manual_seed(0)

    def image(index: int) -> dict:
        # both orientations, as COCO's aspect grouping gives: the feature maps change size between batches
        size = (height, width) if index % 2 == 0 else (width, height)
        instances = Instances(size)
        instances.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, size[1] / 2, size[0] / 2]]))
        instances.gt_classes = torch.tensor([index % 80])
        return {"image": (torch.rand(3, *size, generator=generator) * 255).to(torch.uint8), "instances": instances,
                "height": size[0], "width": size[1]}

    rows = {}
    for backbone in ("resnet50", "sge_resnet50"):
        overrides = {"INPUT.MIN_SIZE_TRAIN": (height,), "INPUT.MAX_SIZE_TRAIN": width}
        cfg = build_detector_config("faster_rcnn", backbone, None, "gpu_check_train", None, "/nonexistent", 80, 0,
                                    overrides=overrides, config_set="paper", device=str(device))
        model = DetectorTrainer.build_model(cfg).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
        times = []
        with EventStorage(0):  # the detectors log their losses there
            for iteration in range(sizes["det_iters"]):
                batch = [image(iteration), image(iteration)]
                _sync(device)
                started = time.perf_counter()
                total = sum(model(batch).values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                _sync(device)
                times.append(time.perf_counter() - started)
        measured = times[2:] or times
        rows[backbone] = {"s_per_iter": sorted(measured)[len(measured) // 2], "loss_finite": bool(torch.isfinite(total)),
                          "compiled_graphs": dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before}
        del model, optimizer
    return {"ok": all(row["loss_finite"] for row in rows.values()), "size": [height, width],
            "iterations": sizes["det_iters"], "images_per_iter": 2, "backbones": rows,
            "sge_vs_plain": rows["sge_resnet50"]["s_per_iter"] / rows["resnet50"]["s_per_iter"]}


CHECKS = {"environment": check_environment, "pytest_gpu": check_pytest_gpu, "sge_accuracy": check_sge_accuracy,
          "ddp": check_ddp, "training": check_training, "detection": check_detection}


def run_checks(device: torch.device, sizes: dict, only: list[str] | None = None) -> dict:
    results = {}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            results[name] = check(device, sizes)
        except Exception as error:  # noqa: BLE001 - a failed check is recorded; the others still run
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=-6)}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']} s)", flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}, {'dry run' if report['dry_run'] else 'full'})", ""]
    for name, result in report["checks"].items():
        lines.append(f"- **{name}**: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)"
                     + (f" - {result['error']}" if "error" in result else "")
                     + (f" - {result['problem']}" if result.get("problem") else "")
                     + (f" - {result['summary']}" if "summary" in result else ""))
    training = report["checks"].get("training", {})
    if training.get("rows"):
        lines += ["", f"Training step, batch {training['batch']} at {training['image']} px:", "",
                  "| mode | model | ms/step | vs torchvision | max memory MB |", "|---|---|--:|--:|--:|"]
        for row in training["rows"]:
            memory = "-" if row["max_memory_mb"] is None else f"{row['max_memory_mb']:.0f}"
            lines.append(f"| {row['mode']} | {row['model']} | {row['step_ms']:.1f} | {row['vs_torchvision']:.3f} | {memory} |")
    detection = report["checks"].get("detection", {})
    if "backbones" in detection:
        lines += ["", f"Faster R-CNN R50-FPN at {detection['size'][0]}x{detection['size'][1]}, 2 images per iteration: "
                      f"SGE / plain = {detection['sge_vs_plain']:.3f}", ""]
        lines += [f"- {name}: {row['s_per_iter']:.3f} s/iter, {row['compiled_graphs']} graph(s) compiled"
                  for name, row in detection["backbones"].items()]
    accuracy = report["checks"].get("sge_accuracy", {})
    if accuracy.get("rows"):
        worst = {}
        for row in accuracy["rows"]:
            key = (row["impl"], row["dtype"])
            worst[key] = max(worst.get(key, 0.0), row["forward"], row["grad_x"], row["grad_weight"], row["grad_bias"])
        lines += ["", "SGE against float64 (largest relative error over shapes, forward and grads):", ""]
        lines += [f"- {impl} {dtype}: {error:.2e}" for (impl, dtype), error in sorted(worst.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the tool, not a GPU")
    parser.add_argument("--only", action="append", choices=list(CHECKS), help="run only these checks (repeatable)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the tool on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    report = {"device": "cpu" if args.dry_run else torch.cuda.get_device_name(0), "dry_run": args.dry_run,
              "checks": run_checks(device, DRY if args.dry_run else FULL, args.only)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(result["ok"] for result in report["checks"].values())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: {'all checks passed' if report['ok'] else 'FAILED'} in {report['seconds']} s; "
          f"{args.out_dir / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
