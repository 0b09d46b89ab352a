"""`sge-repro bench sge|train|loader`: overhead and throughput measurements (the developer tools in
the top-level `benchmarks` package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sge_repro.cli.ui import console

app = typer.Typer(help="Benchmarks: SGE overhead, training throughput, loader images per core, dataset scale.", no_args_is_help=True)


@app.command("sge")
def bench_sge(
    batch: int = typer.Option(16, help="Batch size."),
    image_size: int = typer.Option(224, help="Input resolution."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 / float16 (autocast)."),
    repeats: int = typer.Option(7, min=7, help="Interleaved repeats after warm-up (median reported)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """torchvision's ResNet50 and ours vs SGE-ResNet50 (reference, fast and, on CUDA, Triton module): eval
    forward and a training step, with ratios to torchvision's ResNet50 ("x tv") and to our plain one."""
    import torch

    from benchmarks.models import benchmark_sge

    if threads:
        torch.set_num_threads(threads)
    with console.status("benchmarking (interleaved runs)"):
        result = benchmark_sge(batch=batch, image_size=image_size, device=device, dtype=dtype, repeats=repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"SGE overhead: batch {batch}, {image_size}px, {device}, {dtype}, "
                        f"{result['threads']} threads, median of {repeats}")
    for column in ("model", "forward ms", "x tv", "x plain", "train step ms", "x tv", "x plain", "saved act. MB",
                   "x tv"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, row in result["models"].items():
        table.add_row(label, f"{row['forward_ms']:.1f}", f"{row['forward_vs_torchvision']:.3f}",
                      f"{row['forward_ratio']:.3f}", f"{row['train_step_ms']:.1f}",
                      f"{row['train_step_vs_torchvision']:.3f}", f"{row['train_step_ratio']:.3f}",
                      f"{row['saved_activation_mb']:.0f}", f"{row['memory_vs_torchvision']:.3f}")
    console.print(table)
    module = result["module"]
    shape = "x".join(str(n) for n in module["shape"])
    for impl in ("reference", "fast", "triton"):
        if impl not in module:  # triton: only where CUDA is
            continue
        item = module[impl]
        console.print(f"module alone ({impl}) on {shape}, G={module['groups']}: forward {item['forward_ms']:.2f} ms "
                      f"({item['forward_gb_s']:.1f} GB/s), forward+backward {item['forward_backward_ms']:.2f} ms "
                      f"({item['forward_backward_gb_s']:.1f} GB/s)")


@app.command("train")
def bench_train(
    model: List[str] = typer.Option(..., "--model", help="One model, or --model A --model B side by side."),
    batch: int = typer.Option(32, help="Batch size."),
    image_size: int = typer.Option(224, help="Input resolution."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    repeats: int = typer.Option(5, min=3, help="Interleaved repeats (median)."),
    width: Optional[int] = typer.Option(None, help="Base width (default: the paper's, 64)."),
    groups: Optional[int] = typer.Option(None, help="SGE groups (default: the paper's, 64)."),
) -> None:
    """Training images/s (forward + backward + SGD step) of one model or several side by side."""
    from benchmarks.models import benchmark_training

    # unset options keep the model defaults (sge_repro.models DEFAULT_WIDTH / DEFAULT_GROUPS)
    architecture = {key: value for key, value in (("width", width), ("groups", groups)) if value is not None}
    with console.status("benchmarking training steps (interleaved)"):
        rows = benchmark_training(model, batch=batch, image_size=image_size, device=device,
                                  repeats=repeats, **architecture)
    table = Table(title=f"training throughput: batch {batch}, {image_size}px, {device}")
    table.add_column("model")
    table.add_column("images/s", justify="right")
    table.add_column("x first", justify="right")
    for row in rows:
        table.add_row(row["name"], f"{row['images_per_s']:.1f}", f"{row['ratio']:.3f}")
    console.print(table)


@app.command("loader")
def bench_loader(
    images: int = typer.Option(256, min=1, help="Generated JPEGs (500x375, quality 90) to load each round."),
    image_size: int = typer.Option(224, min=16, help="Training crop size."),
    rounds: int = typer.Option(5, min=1, help="Interleaved rounds (median reported)."),
    batch: int = typer.Option(32, min=1, help="Collated batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema: benchmarks/loader.py)."),
) -> None:
    """Training-pipeline images per core-second: our loader (decoder torchvision / pil, uint8) vs
    torchvision's reference recipe (PIL, RandomResizedCrop, flip, ToTensor, Normalize), one thread."""
    from benchmarks.loader import benchmark_loader

    with console.status(f"writing {images} JPEGs and loading them (interleaved rounds)"):
        result = benchmark_loader(images=images, image_size=image_size, rounds=rounds, batch=batch)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    source = result["source"]
    table = Table(title=f"loader, one core: {images} JPEGs {source['width']}x{source['height']} "
                        f"(q{source['quality']}, {source['mean_kb']:.0f} KB) -> {image_size}, median of {rounds}")
    for column in ("pipeline", "images / core-s", "x reference", "images / s (wall)"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    reference = result["pipelines"]["reference"]["images_per_core_s"]
    for name, row in result["pipelines"].items():
        table.add_row(name, f"{row['images_per_core_s']:.0f}", f"{row['images_per_core_s'] / reference:.2f}",
                      f"{row['images_per_s']:.0f}")
    console.print(table)
    machine = result["machine"]
    console.print(f"normalisation on a CPU device: {result['to_model_input_cpu_ms_per_image']:.3f} ms/image; "
                  f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_before'][0]:.1f} "
                  f"-> {machine['load_average_after'][0]:.1f}")


@app.command("data")
def bench_data(
    work: Path = typer.Option(..., help="A new folder (same disk: hard links) for the trees and a project copy."),
    scale: float = typer.Option(1.0, help="Fraction of ImageNet's 1.33M and COCO's 123k files (1.0: full size)."),
    repeats: int = typer.Option(3, min=1, help="Rounds of status / no-op run / rescan (median reported)."),
    verify_images: int = typer.Option(300, min=1, help="Full-size JPEGs (500x375, q90) for the decode speed."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema: benchmarks/data.py)."),
) -> None:
    """`sge-repro status` and a no-op `run all` on ImageNet- and COCO-shaped trees, the data stage's
    rescan, and verification images/s per core (benchmarks/data.py)."""
    from benchmarks.data import TARGET_S, benchmark_data

    result = benchmark_data(work, scale=scale, repeats=repeats, verify_images=verify_images,
                            log=(lambda message: None) if as_json else (lambda message: console.print(message)))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    files = result["files"]
    table = Table(title=f"datasets at scale {scale}: {sum(files.values()):,} files "
                        f"({result['machine']['cores']} cores, load {result['machine']['load_before']:.1f})")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("note")
    table.add_row("sge-repro status", f"{result['status_median_s']:.1f}", f"target <= {TARGET_S:.0f} s, median")
    table.add_row("no-op sge-repro run all", f"{result['noop_run_median_s']:.1f}", f"target <= {TARGET_S:.0f} s, median")
    table.add_row("data stage rescan (in process)", f"{result['rescan_median_s']:.1f}", "median")
    table.add_row("first indexing", f"{result['first_index_s']:.1f}",
                  f"{result['first_index_images_per_s']:.0f} tiny files/s (hard links)")
    verify = result["verify"]
    table.add_row("verify full-size JPEGs, 1 core", f"{verify['one_core_s']:.1f}",
                  f"{verify['one_core_images_per_s']:.0f} images/s per core")
    table.add_row(f"verify full-size JPEGs, {verify['all_cores']} cores", f"{verify['all_cores_s']:.1f}",
                  f"{verify['all_cores_images_per_s']:.0f} images/s")
    console.print(table)
