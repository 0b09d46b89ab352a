"""Training checkpoints: what last.pt / best.pt hold, the recipe a resume must match, resuming.

A training checkpoint is our classifier checkpoint (sge_repro.models.checkpoints: format, model,
model_kwargs, state_dict) plus the training state: epoch, optimizer, scheduler, rng, history,
best, seed, classes, dataset, the recipe and its fingerprint, and with amp='fp16' the GradScaler.
The recipe is the train_cls params plus what the run adds (model, model_kwargs, classes, seed,
world_size); its fingerprint leaves out what does not change the weights (workers, device).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sge_repro import atomic
from sge_repro.errors import UserError
from sge_repro.params import TrainClsParams

log = logging.getLogger(__name__)

NOT_IN_FINGERPRINT = ("workers", "device")  # train_cls params that leave the trained weights unchanged
# train_cls params added after runs existed, with the value those runs had: left out of the fingerprint
# when they hold it, so a run started before the key existed resumes. decoder "pil" is the input
# pipeline of those runs bit for bit; "torchvision" (the default now) resizes slightly differently.
FINGERPRINT_IF_NOT = {"decoder": "pil"}


def training_recipe(params: TrainClsParams, model_name: str, model_kwargs: dict, classes: list[str],
                    seed: int, world_size: int) -> dict:
    """Everything that determines the trained weights, as stored in the checkpoint."""
    return {**params.model_dump(mode="json"), "model": model_name, "model_kwargs": model_kwargs,
            "classes": classes, "seed": seed, "world_size": world_size}


def recipe_fingerprint(recipe: dict) -> str:
    kept = {key: value for key, value in recipe.items() if key not in NOT_IN_FINGERPRINT
            and not (key in FINGERPRINT_IF_NOT and value == FINGERPRINT_IF_NOT[key])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainingState:
    """What an epoch changes and a checkpoint restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "top1": -1.0, "top5": 0.0})


def resume(path: Path, state: TrainingState, recipe: dict) -> bool:
    """Load `path` (last.pt) into `state` when it was written with the same recipe.

    Returns False, leaving `state` as it was, when there is no checkpoint or its recipe differs
    (then training starts over, with a warning); raises UserError for a file this engine did
    not write.
    """
    from sge_repro.models.checkpoints import load_checkpoint_file

    if not path.is_file():
        return False
    saved = load_checkpoint_file(path)
    if not isinstance(saved, dict) or "recipe_fingerprint" not in saved or "optimizer" not in saved:
        raise UserError(f"checkpoint {path}: not a training checkpoint of this engine; "
                        "expected last.pt written by train_classifier (delete the run folder to start over)")
    if saved["recipe_fingerprint"] != recipe_fingerprint(recipe):
        log.warning("%s was trained with a different recipe; starting from scratch", path)
        return False
    state.model.load_state_dict(saved["state_dict"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler.is_enabled():
        if "grad_scaler" not in saved:
            raise UserError(f"checkpoint {path}: amp='fp16' run without grad_scaler state; "
                            "expected last.pt written by an fp16 run (delete the run folder to start over)")
        state.scaler.load_state_dict(saved["grad_scaler"])
    state.epoch, state.history, state.best = int(saved["epoch"]), list(saved["history"]), dict(saved["best"])
    return True


def save(state: TrainingState, recipe: dict, dataset_name: str, run_dir: Path, improved: bool) -> None:
    """Write run_dir/last.pt (and best.pt when val top-1 improved), atomically."""
    from sge_repro.models.checkpoints import make_classifier_checkpoint

    checkpoint = make_classifier_checkpoint(
        recipe["model"], {**recipe["model_kwargs"], "num_classes": len(recipe["classes"])}, state.model,
        epoch=state.epoch, optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
        rng={"torch": torch.get_rng_state()}, history=state.history, best=state.best, seed=recipe["seed"],
        classes=recipe["classes"], dataset=dataset_name, recipe=recipe,
        recipe_fingerprint=recipe_fingerprint(recipe),
        **({"grad_scaler": state.scaler.state_dict()} if state.scaler.is_enabled() else {}))
    if improved:
        atomic.torch_save(checkpoint, run_dir / "best.pt")
    atomic.torch_save(checkpoint, run_dir / "last.pt")
