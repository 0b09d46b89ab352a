"""Where every artifact lives, relative to the project root (one place for all of them).

Stages communicate only through these files: `metrics/**.json` and `reports/` are the contract
between the pipeline stages and the report.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def user_cache_dir() -> Path:
    """sge-repro's cache outside any project (compiled kernels, verification of datasets read in
    place): $SGE_REPRO_CACHE, else $XDG_CACHE_HOME/sge-repro, else ~/.cache/sge-repro."""
    return Path(os.environ.get("SGE_REPRO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sge-repro"))


def run_id(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def superseded_run_dir(run_dir: Path, fingerprint: str) -> Path:
    """Where a run folder trained under other params goes (sge_repro.superseded): runs/<kind>/<run>
    -> runs/superseded/<kind>/<run>-<fingerprint>, with -2, -3, ... when that name is taken."""
    run_dir = Path(run_dir)
    base = run_dir.parent.parent / "superseded" / run_dir.parent.name / f"{run_dir.name}-{fingerprint}"
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


@dataclass(frozen=True)
class ProjectPaths:
    root: Path = Path(".")

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cls_data(self) -> Path:
        """The generated ImageFolder tree (source: synthetic): train/<class>/*.jpg, val/<class>/*.jpg."""
        return self.data / "cls"

    @property
    def det_data(self) -> Path:
        """The generated COCO-format set (source: synthetic): train/, val/, annotations/instances_{train,val}.json."""
        return self.data / "det"

    @property
    def manifests(self) -> Path:
        """The dataset manifests (DVC outs of the data stage; what the other stages depend on)."""
        return self.data / "manifests"

    def manifest(self, dataset: str) -> Path:
        """data/manifests/cls.json or det.json: files, sizes, labels, fingerprint of one dataset."""
        return self.manifests / f"{dataset}.json"

    @property
    def cls_manifest(self) -> Path:
        return self.manifest("cls")

    @property
    def det_manifest(self) -> Path:
        return self.manifest("det")

    def verify_cache(self, dataset: str, root: Path | None = None) -> Path:
        """Which files of a dataset were decoded at which (size, mtime_ns): not a DVC out. A dataset
        read in place outside the project (`root`: ImageNet, COCO) has it in the user cache, keyed
        by its root, so every copy of the project (DVC's queued experiments run in temporary
        copies) reuses one verification; a generated set inside the project keeps it in data/.cache."""
        local = self.data / ".cache" / f"verified-{dataset}.json"
        if root is None or Path(root).resolve().is_relative_to(self.root.resolve()):
            return local
        key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
        return user_cache_dir() / "verified" / f"{dataset}-{key}.json"

    def index_state(self, dataset: str) -> Path:
        """The listing the dataset's manifest was last built from (the data stage's no-op check)."""
        return self.data / ".cache" / f"indexed-{dataset}.json"

    # classification
    def cls_run_dir(self, model: str, seed: int) -> Path:
        """Checkpoints (last.pt, best.pt) of one training run."""
        return self.root / "runs" / "cls" / run_id(model, seed)

    def cls_checkpoint(self, model: str, seed: int, which: str = "best") -> Path:
        return self.cls_run_dir(model, seed) / f"{which}.pt"

    def cls_tensorboard(self, model: str, seed: int) -> Path:
        """TensorBoard events of one training run (inside its run folder: they travel with its checkpoints)."""
        return self.cls_run_dir(model, seed) / "tensorboard"

    def cls_train_metrics(self, model: str, seed: int) -> Path:
        return self.root / "metrics" / "train_cls" / f"{run_id(model, seed)}.json"

    def cls_history(self, model: str, seed: int) -> Path:
        """Per-epoch TSV for `dvc plots`."""
        return self.root / "plots" / "train_cls" / f"{run_id(model, seed)}.tsv"

    def cls_metrics(self, model: str, seed: int) -> Path:
        return self.root / "metrics" / "eval_cls" / f"{run_id(model, seed)}.json"

    def cls_predictions(self, model: str, seed: int) -> Path:
        """Per-val-image top-1 correctness (for the paired bootstrap in the report)."""
        return self.root / "runs" / "eval_cls" / f"{run_id(model, seed)}.json"

    # detection
    def det_weights(self, model: str, seed: int) -> Path:
        """A classification checkpoint converted to detectron2 weights."""
        return self.root / "runs" / "convert" / f"{run_id(model, seed)}.pth"

    def given_weights(self, model: str, source: str) -> Path:
        """The ImageNet weights of `model` given from outside, as the convert source says: torchvision's
        (fetched, checksum-verified) or a copy of convert.files' file."""
        return self.root / "runs" / "pretrained" / f"{model}-{source}.pth"

    def det_run_dir(self, detector: str, backbone: str, seed: int) -> Path:
        return self.root / "runs" / "det" / run_id(f"{detector}-{backbone}", seed)

    def det_metrics(self, detector: str, backbone: str, seed: int) -> Path:
        return self.root / "metrics" / "eval_det" / f"{run_id(f'{detector}-{backbone}', seed)}.json"

    @property
    def attention_maps(self) -> Path:
        """PNGs of SGE attention of the trained models (the `visualize` stage), shown in the report."""
        return self.root / "runs" / "visualize"

    # report
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def report_metrics(self) -> Path:
        """The report's headline numbers as DVC metrics (what `dvc exp show` compares across experiments)."""
        return self.root / "metrics" / "report.json"

    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"

    # launcher state (outside every DVC output; logs/ is git- and dvc-ignored)
    def launch_state_dir(self, name: str) -> Path:
        """Where the launcher of stage `name` keeps its own files (worker error files, job ids, logs)."""
        return self.root / "logs" / "launch" / name

    def ablation_started(self, experiment: str) -> Path:
        """Marks an ablation experiment begun and not finished: `dvc exp run --temp` keeps no checkpoint of it."""
        return self.root / "logs" / "ablation" / f"{experiment}.started"

    # views of a run (logs/ is ignored by git and DVC)
    @property
    def progress_dir(self) -> Path:
        """One status file per running or finished stage (sge_repro.stage_status), read by `sge-repro run`."""
        return self.root / "logs" / "progress"

    def stage_status(self, stage: str) -> Path:
        """The status file of DVC stage `stage` (e.g. train_cls@sge_resnet18-0)."""
        return self.progress_dir / f"{stage}.json"
