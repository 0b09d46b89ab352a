"""Short CUDA check of the training engine's speed options: `python tools/gpu_check.py OUT_DIR`.

1. End-to-end: train_classifier on a generated 64 px set for each option set; prints val top-1 and
   the engine's images/s (which includes JPEG decoding and augmentation in the loader workers).
2. Step only: forward + backward + SGD step on a GPU-resident batch, the same autocast / layout /
   GradScaler code path, so the precision options are compared without the loader in the way.
Writes OUT_DIR/gpu_check.json with every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from sge_repro.classification.determinism import deterministic_mode
from sge_repro.classification.precision import autocast, grad_scaler, memory_format
from sge_repro.classification.train import train_classifier
from sge_repro.data.synthetic import generate_classification_set
from sge_repro.params import ModelParams, TrainClsParams

MODEL = ("sge_resnet18", ModelParams(width=32, groups=8))
OPTION_SETS = [
    {"amp": "fp32", "channels_last": False},
    {"amp": "bf16", "channels_last": False},
    {"amp": "bf16", "channels_last": True},
    {"amp": "fp16", "channels_last": True},
]


def step_throughput(amp: str, channels_last: bool, compile: bool, batch: int, image_size: int, steps: int) -> dict:
    from sge_repro.models import create_model

    device = torch.device("cuda")
    model = create_model(MODEL[0], num_classes=10, seed=0, **MODEL[1].model_kwargs()).to(
        device, memory_format=memory_format(channels_last))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = grad_scaler(amp, device)
    forward = torch.compile(model) if compile else model
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device=device, generator=generator).to(
        memory_format=memory_format(channels_last))
    targets = torch.randint(0, 10, (batch,), device=device, generator=generator)
    criterion = nn.CrossEntropyLoss()

    def step():
        with autocast(amp, device):
            loss = criterion(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    started = time.perf_counter()
    for _ in range(5):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"amp": amp, "channels_last": channels_last, "compile": compile, "batch": batch,
            "images_per_s": batch * steps / elapsed, "warmup_s": warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (step only)")
    args = parser.parse_args()
    out = args.out_dir
    data_root = out / "data"
    counts = generate_classification_set(data_root, num_classes=10, image_size=64, train_per_class=300,
                                         val_per_class=30, seed=0)
    print("data", counts, flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "data": counts,
              "model": [MODEL[0], MODEL[1].model_kwargs()], "end_to_end": [], "step_only": []}
    for options in OPTION_SETS:
        name = f"{options['amp']}{'_cl' if options['channels_last'] else ''}"
        started = time.perf_counter()
        params = TrainClsParams(epochs=args.epochs, batch_size=128, lr=0.1, weight_decay=1e-4, lr_schedule="cosine",
                                warmup_epochs=1, image_size=64, workers=args.workers, device="cuda",
                                min_crop_scale=0.35, no_weight_decay_on_bn_bias=True, **options)
        metrics = train_classifier(params, MODEL[1], MODEL[0], 0, data_root, out / name / "ckpt",
                                   out / name / "metrics.json", out / name / "history.tsv")
        row = {**options, "top1": metrics["top1"], "best_top1": metrics["best_top1"],
               "images_per_s": metrics["images_per_s"], "wall_s": time.perf_counter() - started}
        report["end_to_end"].append(row)
        print("end_to_end", json.dumps(row), flush=True)
    with deterministic_mode(torch.device("cuda")):  # the engine's cudnn settings
        for options in OPTION_SETS:
            row = step_throughput(**options, compile=False, batch=256, image_size=64, steps=50)
            report["step_only"].append(row)
            print("step_only", json.dumps(row), flush=True)
        if args.compile:
            row = step_throughput("bf16", True, compile=True, batch=256, image_size=64, steps=50)
            report["step_only"].append(row)
            print("step_only", json.dumps(row), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
