"""Training checkpoints: what last.pt / best.pt hold, the recipe a resume must match, resuming.

A training checkpoint is our classifier checkpoint (sge_repro.models.weight_files) plus the
training state: epoch, optimizer, scheduler, rng, history, best, seed, classes, dataset, the
recipe and its fingerprint, and with amp='fp16' the GradScaler. The recipe is the train_cls
params plus model, model_kwargs, classes, seed and world_size; its fingerprint and the resume
check leave out what does not change what is trained: workers and device, `deterministic` (it
picks kernels: float rounding only), world_size (`batch_size` is the global batch, the same at
any process count) and model.sge_impl (the implementations are equal within float rounding: a run
trained with "fast" resumes with "triton"). A last.pt of another recipe is never resumed: it is a
superseded.RunOfOtherParams naming each differing key, and the run is moved aside.

Resuming with another process count continues the same training (an epoch's permutation depends
on (seed, epoch) only, global batch k is the same images at any world size, and last.pt is written
at epoch boundaries), except that without sync_bn BatchNorm takes its statistics over each rank's
share, so 8 -> 4 processes doubles that batch (a warning says so), and float sums over the ranks
are equal within float32 rounding (README, "What 'equal' means here"), not bit for bit.
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
from sge_repro.models.registry import SGE_VARIANT_DEFAULTS, kwargs_used_by, recorded_kwargs
from sge_repro.models.sge import SGE_IMPLS
from sge_repro.models.weight_files import load_checkpoint_file, make_classifier_checkpoint
from sge_repro.params_sections import TrainClsParams
from sge_repro.superseded import RunOfOtherParams

log = logging.getLogger(__name__)

# Recipe keys that are not the recipe: they leave what is trained unchanged (see above).
NOT_IN_FINGERPRINT = ("workers", "device", "deterministic", "world_size")
# train_cls params added after runs existed, with the value those runs had: left out of the fingerprint
# when they hold it, so a run started before the key existed resumes. decoder "pil" is the input
# pipeline of those runs bit for bit; "torchvision" (the default now) resizes slightly differently.
FINGERPRINT_IF_NOT = {"decoder": "pil"}
# model_kwargs that pick how, not what, the model computes (see above): recorded, never compared.
MODEL_KWARGS_NOT_IN_FINGERPRINT = ("sge_impl",)


def training_recipe(params: TrainClsParams, model_name: str, model_kwargs: dict, classes: list[str],
                    seed: int, world_size: int) -> dict:
    """Everything that determines the trained weights, as stored in the checkpoint. The SGE
    ablation knobs enter only for an SGE model away from the paper's values (registry.recorded_kwargs):
    the recipe and fingerprint of every other run are those it had before the knobs existed."""
    return {**params.model_dump(mode="json"), "model": model_name,
            "model_kwargs": recorded_kwargs(model_name, model_kwargs),
            "classes": classes, "seed": seed, "world_size": world_size}


# Values renamed in params.yaml, hashed under their old spelling so that checkpoints written before
# the rename keep their fingerprint (and resume): amp "off" is spelled fp32 in params.yaml now.
FINGERPRINT_SPELLING = {"amp": {"fp32": "off"}}


def recipe_fingerprint(recipe: dict) -> str:
    return _hash(_without_model_kwargs(recipe, MODEL_KWARGS_NOT_IN_FINGERPRINT))


def _hash(recipe: dict) -> str:
    kept = {key: FINGERPRINT_SPELLING.get(key, {}).get(value, value) if isinstance(value, str) else value
            for key, value in recipe.items() if key not in NOT_IN_FINGERPRINT
            and not (key in FINGERPRINT_IF_NOT and value == FINGERPRINT_IF_NOT[key])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _without_model_kwargs(recipe: dict, names: tuple[str, ...]) -> dict:
    kwargs = recipe.get("model_kwargs")
    if not isinstance(kwargs, dict) or not any(name in kwargs for name in names):
        return recipe
    return {**recipe, "model_kwargs": {key: value for key, value in kwargs.items() if key not in names}}


def _fingerprints_of_any_sge_impl(recipe: dict) -> set[str]:
    """The fingerprint, and the ones hashed while model.sge_impl was still part of it, for each
    implementation: a checkpoint that stored only its fingerprint resumes under any of them."""
    kwargs = recipe.get("model_kwargs")
    earlier = {_hash({**recipe, "model_kwargs": {**kwargs, "sge_impl": impl}}) for impl in SGE_IMPLS} \
        if isinstance(kwargs, dict) and "sge_impl" in kwargs else set()
    return {recipe_fingerprint(recipe)} | earlier


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


def recipe_differences(saved: dict, recipe: dict) -> list[str]:
    """'key old -> new' for each recipe key that differs, named as in params.yaml. Model knobs the
    model does not read (model.groups of a ResNet without SGE) are not compared: a G sweep does
    not retrain the plain baseline; nor is model.sge_impl (MODEL_KWARGS_NOT_IN_FINGERPRINT)."""
    def flat(values: dict) -> dict:
        out = {}
        for key, value in values.items():
            if key in NOT_IN_FINGERPRINT:
                continue
            if key == "model_kwargs" and isinstance(value, dict):
                # an SGE ablation knob a recipe does not record has the paper's value (training_recipe)
                used = kwargs_used_by(values["model"], {**SGE_VARIANT_DEFAULTS, **value}) \
                    if isinstance(values.get("model"), str) else value
                out.update({f"model.{name}": item for name, item in used.items()
                            if name not in MODEL_KWARGS_NOT_IN_FINGERPRINT})
            elif key in TrainClsParams.model_fields:
                out[f"train_cls.{key}"] = value
            else:
                out[key] = value
        return out

    old, new = flat(_current_spelling(saved)), flat(recipe)
    differences = []
    for key in [*old, *(k for k in new if k not in old)]:
        before, after = old.get(key, "(not set)"), new.get(key, "(not set)")
        if before != after:
            if key == "classes" and isinstance(before, list) and isinstance(after, list):
                before, after = f"{len(before)} classes", f"{len(after)} classes ({_changed_classes(before, after)})"
            differences.append(f"{key} {_short(before)} -> {_short(after)}")
    return differences


def _current_spelling(saved: dict) -> dict:
    """A saved recipe as the params spell it now: renamed values in their new spelling (amp 'off'
    -> 'fp32'), keys added since with the value older runs had (decoder 'pil')."""
    renamed = {key: {old: new for new, old in spellings.items()} for key, spellings in FINGERPRINT_SPELLING.items()}
    current = {key: renamed.get(key, {}).get(value, value) if isinstance(value, str) else value
               for key, value in saved.items()}
    return {**FINGERPRINT_IF_NOT, **current}


def _changed_classes(before: list, after: list) -> str:
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    parts = ([f"+{', '.join(added[:3])}" + (" ..." if len(added) > 3 else "")] if added else []) + \
            ([f"-{', '.join(removed[:3])}" + (" ..." if len(removed) > 3 else "")] if removed else [])
    return "; ".join(parts) or "reordered"


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_resumable(path: Path, recipe: dict) -> dict | None:
    """The training checkpoint at `path` (last.pt) if it can be resumed under `recipe`; None when
    there is none. UserError for a file this engine did not write; RunOfOtherParams for a checkpoint
    trained with another recipe (naming each differing key, old -> new)."""
    if not path.is_file():
        return None
    saved = load_checkpoint_file(path)
    if not isinstance(saved, dict) or "recipe_fingerprint" not in saved or "optimizer" not in saved:
        raise UserError(f"checkpoint {path}: not a training checkpoint of this engine; "
                        "expected last.pt written by train_classifier (delete the run folder to start over)")
    saved_recipe = saved.get("recipe")
    if isinstance(saved_recipe, dict):
        differences = recipe_differences(saved_recipe, recipe)
    else:  # written before recipes were stored: only the fingerprint can tell
        differences = [] if saved["recipe_fingerprint"] in _fingerprints_of_any_sge_impl(recipe) \
            else ["(recipe not stored)"]
    if differences:
        raise RunOfOtherParams(
            f"{path}: epoch {saved.get('epoch', '?')} checkpoint of another recipe: {'; '.join(differences)}. "
            f"To resume it, restore those values in params.yaml; to start over, move or delete {path.parent}",
            differences, str(saved["recipe_fingerprint"]))
    return saved


def repair_damaged(run_dir: Path, is_main: bool, barrier) -> None:
    """A checkpoint that does not load (a disk fault, a copy cut short) is not a finished run.

    Both files hold the whole training state of their epoch, and resuming is exact, so:
    - last.pt damaged or missing, best.pt loads: best.pt becomes last.pt and training resumes
      from its epoch (the epochs after it are computed again, to the same result);
    - best.pt damaged or missing while last.pt is the best epoch: best.pt is written from last.pt;
    - otherwise the best epoch's weights are lost: UserError saying how to train again.
    Every rank decides from the files (the same answer), rank 0 writes; a warning names the repair."""
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if not last.exists() and not best.exists():
        return
    last_state, last_problem = _load_or_problem(last)
    best_state, best_problem = _load_or_problem(best)
    if last_problem is None and (best_problem is None or int(last_state.get("best", {}).get("epoch", 0)) == 0):
        return  # (no epoch improved yet: no best.pt to expect)
    aside = f"move {run_dir} aside (e.g. into runs/superseded/) to train it again"
    if last_problem is not None and best_problem is not None:
        raise UserError(f"{run_dir}: neither checkpoint loads (last.pt: {last_problem}; best.pt: {best_problem}); {aside}")
    if last_problem is not None:
        source, target, why = best, last, (f"{last_problem}: resuming from best.pt (epoch {best_state.get('epoch')}); "
                                           "the epochs after it are trained again")
    elif int(last_state.get("epoch", -1)) == int(last_state.get("best", {}).get("epoch", -2)):
        source, target, why = last, best, f"{best_problem}: rewritten from last.pt (the same epoch)"
    else:
        raise UserError(f"{best}: {best_problem}; the best epoch's ({last_state['best']['epoch']}) weights are lost "
                        f"and last.pt is epoch {last_state.get('epoch')}: {aside}")
    barrier()
    if is_main:
        atomic.write_bytes(target, source.read_bytes())
        log.warning("%s: %s", target, why)
    barrier()


def _load_or_problem(path: Path) -> tuple[dict, None] | tuple[None, str]:
    """(the training checkpoint, None) or (None, why it is not one: missing / does not load)."""
    if not path.is_file():
        return None, "missing"
    try:
        saved = load_checkpoint_file(path)
    except UserError as error:
        return None, str(error).removeprefix(f"checkpoint {path}: ")
    if not isinstance(saved, dict) or "optimizer" not in saved or "epoch" not in saved:
        return None, "not a training checkpoint of this engine"
    return saved, None


def resume(path: Path, state: TrainingState, recipe: dict) -> bool:
    """Load `path` (last.pt) into `state`; False when there is none (a fresh run). Raises what
    check_resumable raises (a checkpoint of another recipe is never loaded)."""
    saved = check_resumable(path, recipe)
    if saved is None:
        return False
    saved_recipe = saved.get("recipe")
    saved_world = saved_recipe.get("world_size") if isinstance(saved_recipe, dict) else None
    if saved_world is not None and saved_world != recipe["world_size"] and not recipe.get("sync_bn"):
        log.warning("%s: trained on %s processes, resuming on %s without sync_bn: BatchNorm now normalises "
                    "over %s images per process instead of %s", path, saved_world, recipe["world_size"],
                    recipe["batch_size"] // recipe["world_size"], recipe["batch_size"] // saved_world)
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
