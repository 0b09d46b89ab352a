"""Detector checkpoints: atomic files, the run's config fingerprint, RNG states, pruning, resume.

A training checkpoint (`model_0000099.pth`, `model_final.pth`, and `last_checkpoint` naming the
newest) holds detectron2's model / optimizer / scheduler / iteration, plus under "sge_repro":

- "fingerprint": what determines the trained weights (`config_fingerprint`); a resume under a
  config that differs in any of these keys is refused (UserError naming old -> new), so a run
  folder never holds a mix of two configs and an edited config never "resumes" 0 iterations.
- "rng": every rank's python / numpy / torch (/ CUDA) RNG state at the checkpoint, so a resumed
  run continues the random streams exactly (with the same number of processes).
- "world_size", and the weights header of `_weights_metadata` (backbone, pixel statistics).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sge_repro.atomic import write_bytes, write_text
from sge_repro.data.download import file_digest
from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.writes import disk_errors
from sge_repro.errors import UserError, preview
from sge_repro.models.weight_files import load_checkpoint_file
from sge_repro.superseded import RunOfOtherParams

import_detectron2()
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

FINAL_WEIGHTS = "model_final.pth"
LAST_CHECKPOINT = "last_checkpoint"
PERIODIC = re.compile(r"model_(\d{7})\.pth")
logger = logging.getLogger("sge_repro.detection")

# Config keys that leave the trained weights unchanged (or change them only by float rounding),
# so a resume may differ in them: where files go, which device and SGE implementation computes
# (equal within float tolerance), loader workers (each image's augmentation depends only on the
# seed and its stream position, sge_repro.detection.loader), how often checkpoints are written
# (a resume is exact), cudnn autotuning and kernel choice, and test-time settings. MODEL.WEIGHTS enters as the
# sha256 of the file instead of its path, each training set as the sha256 of its annotation file.
NOT_IN_FINGERPRINT = (
    "OUTPUT_DIR", "MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.SGE_BACKBONE.SGE_IMPL", "DATALOADER.NUM_WORKERS",
    "DATASETS.TEST", "SOLVER.CHECKPOINT_PERIOD", "CUDNN_BENCHMARK", "DETERMINISTIC", "VIS_PERIOD",
)
TEST_KEYS_IN_FINGERPRINT = ("TEST.EVAL_PERIOD", "TEST.PRECISE_BN.")  # PreciseBN changes the weights
# Keys added after runs existed, with the value those runs had (the paper's SGE, and what a backbone
# without SGE keeps): left out of both fingerprints at that value, so those runs still resume and
# their evaluations are kept.
FINGERPRINT_IF_NOT = {"MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT": 0.0, "MODEL.SGE_BACKBONE.SGE_BIAS_INIT": 1.0,
                      "MODEL.SGE_BACKBONE.SGE_NORMALIZE": True}


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"A.B.C": value}, tuples as lists (as they load back from a checkpoint)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: _plain(node)}
    flat: dict[str, Any] = {}
    for key in sorted(node):
        flat.update(_flatten(node[key], f"{prefix}{key}."))
    return flat


def _at_former_value(key: str, value: Any) -> bool:
    return key in FINGERPRINT_IF_NOT and value == FINGERPRINT_IF_NOT[key]


def _in_fingerprint(key: str, value: Any) -> bool:
    if key in NOT_IN_FINGERPRINT or key.rsplit(".", 1)[-1].endswith("_TEST") or _at_former_value(key, value):
        return False
    if key.startswith("TEST."):
        return key.startswith(TEST_KEYS_IN_FINGERPRINT)
    return True


def config_fingerprint(cfg: CfgNode, num_images: int | None = None) -> dict[str, Any]:
    """Every config key that determines the trained weights -> its value (dotted keys), plus the
    content of the initial weights and of each training set's annotation file, and the number of
    training images used (fewer when corrupt ones are skipped)."""
    fingerprint = {key: value for key, value in _flatten(cfg).items() if _in_fingerprint(key, value)}
    if num_images is not None:
        fingerprint["training images used"] = int(num_images)
    fingerprint["MODEL.WEIGHTS (sha256)"] = file_digest(Path(cfg.MODEL.WEIGHTS), "sha256") if cfg.MODEL.WEIGHTS else ""
    for name in cfg.DATASETS.TRAIN:
        json_file = MetadataCatalog.get(name).get("json_file")
        fingerprint[f"DATASETS.TRAIN {name} (sha256)"] = file_digest(Path(json_file), "sha256") if json_file else ""
    return fingerprint


# Config keys an evaluation's numbers do not depend on; the weights enter as their sha256.
NOT_IN_EVALUATION = ("OUTPUT_DIR", "MODEL.WEIGHTS", "DATALOADER.NUM_WORKERS")


def evaluation_fingerprint(cfg: CfgNode, weights: str | os.PathLike, uses_sge: bool) -> dict[str, Any]:
    """Every config key of an evaluation (test-time settings included) -> its value, plus the sha256
    of the detector's weights and of the val annotation file. Without SGE in the backbone, its
    SGE-only keys are left out: a G sweep does not change a plain detector's evaluation."""
    unused = NOT_IN_EVALUATION + (() if uses_sge else ("MODEL.SGE_BACKBONE.GROUPS", "MODEL.SGE_BACKBONE.SGE_IMPL",
                                                      *FINGERPRINT_IF_NOT))
    fingerprint = {key: value for key, value in _flatten(cfg).items()
                   if key not in unused and not _at_former_value(key, value)}
    fingerprint["weights (sha256)"] = file_digest(Path(weights), "sha256")
    for name in cfg.DATASETS.TEST:
        json_file = MetadataCatalog.get(name).get("json_file")
        fingerprint[f"DATASETS.TEST {name} (sha256)"] = file_digest(Path(json_file), "sha256") if json_file else ""
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'KEY: old -> new' for every key whose value differs (a missing key shows as <absent>)."""
    absent = "<absent>"
    return [f"{key}: {saved.get(key, absent)!r} -> {current.get(key, absent)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key, absent) != current.get(key, absent)]


# --------------------------------------------------------------------------- RNG states
def rng_state(cuda: bool) -> dict[str, Any]:
    """This process's python / numpy / torch (/ CUDA) RNG states as plain lists and tensors
    (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- files
class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, but every file is written atomically (temp + rename), so a
    killed run never leaves a truncated checkpoint that `last_checkpoint` would point to; loads
    go through the one safe torch.load (weights_only=True)."""

    def __init__(self, model, save_dir: str = "", metadata: dict | None = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.metadata = metadata or {}

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if "iteration" in kwargs and isinstance(data.get("trainer"), dict):
            data["trainer"]["iteration"] = kwargs["iteration"]  # the state's iteration, whatever the loop counter
        data.update(kwargs)
        data["sge_repro"] = {**self.metadata, **data.get("sge_repro", {})}
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        # serialised in memory, then written by Python: a full disk is a plain ENOSPC and the
        # temp file is closed and removed at once (torch's C++ writer keeps its file open while
        # its exception is alive, so the space would stay taken)
        buffer = io.BytesIO()
        torch.save(data, buffer)
        with disk_errors(path):
            write_bytes(path, buffer.getbuffer())
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        with disk_errors(path):
            write_text(path, last_filename_basename)

    def _log_incompatible_keys(self, incompatible) -> None:
        """One line instead of fvcore's list: starting from converted backbone weights, the
        FPN and heads are new by design (sge_repro.detection.convert checked the backbone)."""
        missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
        if missing or unexpected:
            self.logger.info(f"{len(missing)} tensors initialised fresh (not in the file: "
                             f"{preview(sorted({key.split('.')[0] for key in missing}))}), "
                             f"{len(unexpected)} tensors of the file unused")
        for key, shape_file, shape_model in incompatible.incorrect_shapes:
            self.logger.warning(f"{key}: shape {tuple(shape_file)} in the file, {tuple(shape_model)} in the model: not loaded")

    def _load_file(self, filename: str):
        # torch.load(weights_only=True) in every case (fvcore's default may change with torch)
        if filename.endswith(".pkl"):
            raise UserError(f"weights {filename}: pickled Detectron .pkl files are not loaded; convert with sge-repro convert")
        loaded = load_checkpoint_file(filename, what="weights")
        return loaded if "model" in loaded else {"model": loaded}


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `last_checkpoint` names, None when there is no marker; UserError when the
    marker names a file that is not there (it is only ever written after its checkpoint)."""
    marker = Path(output_dir) / LAST_CHECKPOINT
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    candidate = Path(output_dir) / name
    if not name or "/" in name or not candidate.is_file():
        raise UserError(f"{marker}: names {name!r}, which is not a checkpoint in {output_dir}; "
                        f"delete {output_dir} to train from scratch")
    return candidate


def read_resume_state(output_dir: str | os.PathLike, fingerprint: dict[str, Any],
                      warn: bool = True) -> tuple[Path, int, dict] | None:
    """(checkpoint, its iteration, its sge_repro metadata) to resume from, None for a fresh run.

    The checkpoint `last_checkpoint` names; when it does not load (a disk fault, a copy cut short)
    the newest other checkpoint of the run that does (a warning names both, when `warn`): resuming
    is exact, so the iterations after it are computed again to the same result.
    Before anything is written: RunOfOtherParams (sge_repro.superseded) when the checkpoint was
    trained under another config (naming each differing key, old -> new), UserError when a version
    that stored no fingerprint wrote it, or when no checkpoint of the run loads.
    """
    path = last_checkpoint(output_dir)
    if path is None:
        return None
    try:
        saved = load_checkpoint_file(path, what="checkpoint")
    except UserError as damaged:
        path, saved = _newest_loadable(Path(output_dir), exclude=path, damaged=damaged)
        if warn:
            logger.warning("%s; resuming from %s (iteration %s) instead", damaged, path.name, saved.get("iteration"))
    metadata = saved.get("sge_repro") if isinstance(saved, dict) else None
    way_out = f"delete {output_dir} to train from scratch with the current config"
    if not isinstance(metadata, dict) or "fingerprint" not in metadata or "iteration" not in saved:
        raise UserError(f"{path}: a detector checkpoint without a config fingerprint (written by an older "
                        f"sge-repro or another tool), so resuming could mix two configs; {way_out}")
    differences = fingerprint_differences(metadata["fingerprint"], fingerprint)
    if differences:
        old_id = hashlib.sha256(json.dumps(metadata["fingerprint"], sort_keys=True, default=str).encode()).hexdigest()
        raise RunOfOtherParams(f"{path}: trained with another config ({preview(differences, 4)}); resuming would "
                               f"mix the two: {way_out}, or restore the old values", differences, old_id[:16])
    return path, int(saved["iteration"]), metadata


def _newest_loadable(output_dir: Path, exclude: Path, damaged: UserError) -> tuple[Path, dict]:
    """The run's checkpoint of the highest iteration that loads, other than `exclude`; `damaged`
    (with the way out) when none does."""
    candidates = [entry for entry in output_dir.iterdir()
                  if entry != exclude and (entry.name == FINAL_WEIGHTS or PERIODIC.fullmatch(entry.name))]
    loaded = []
    for entry in candidates:
        try:
            saved = load_checkpoint_file(entry, what="checkpoint")
        except UserError:
            continue
        if isinstance(saved, dict) and "iteration" in saved:
            loaded.append((int(saved["iteration"]), entry.name == FINAL_WEIGHTS, entry, saved))
    if not loaded:
        raise UserError(f"{damaged}; no other checkpoint of {output_dir} loads: delete {output_dir} to train "
                        "from scratch") from None
    _, _, path, saved = max(loaded, key=lambda item: item[:2])
    return path, saved


def checkpoint_loads(path: Path) -> bool:
    try:
        load_checkpoint_file(path, what="checkpoint")
    except UserError:
        return False
    return True


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete periodic checkpoints beyond the newest `keep`; never model_final or the file
    `last_checkpoint` names. Returns the deleted files."""
    output_dir = Path(output_dir)
    marker = output_dir / LAST_CHECKPOINT
    protected = marker.read_text().strip() if marker.is_file() else None
    periodic = sorted((int(match.group(1)), entry) for entry in output_dir.iterdir()
                      if (match := PERIODIC.fullmatch(entry.name)))
    deleted = []
    for _, entry in periodic[:-keep] if keep > 0 else periodic:
        if entry.name != protected:
            entry.unlink(missing_ok=True)
            deleted.append(entry)
    return deleted


# Python attributes a detector updates every iteration outside its state_dict: the dense
# detectors' (RetinaNet, FCOS) moving average of the number of foreground anchors, which divides
# their loss. Without it a resumed run restarts the average from its initial value.
MODEL_ATTRIBUTES = ("loss_normalizer",)


def model_attributes(model: torch.nn.Module) -> dict[str, float]:
    """MODEL_ATTRIBUTES that `model` (or the module inside its DDP wrapper) has now."""
    module = getattr(model, "module", model)
    return {name: float(value) for name in MODEL_ATTRIBUTES
            if isinstance(value := getattr(module, name, None), (int, float))}


def set_model_attributes(model: torch.nn.Module, values: dict[str, float]) -> None:
    module = getattr(model, "module", model)
    for name in MODEL_ATTRIBUTES:
        if name in values:
            setattr(module, name, float(values[name]))


class CheckpointHook(HookBase):
    """Replaces detectron2's PeriodicCheckpointer; runs on every rank.

    Every `period` iterations and at the last one, gathers every rank's RNG states and model
    attributes (MODEL_ATTRIBUTES) and rank 0 writes model_<iter>.pth (and model_final.pth at the
    end) with them, then deletes periodic
    checkpoints beyond the newest `keep`. A run resumed from a checkpoint of the last iteration
    (killed after it, before model_final was in place) writes model_final from that state.
    """

    def __init__(self, checkpointer: AtomicCheckpointer, period: int, keep: int, cuda: bool):
        self.checkpointer = checkpointer
        self.period = int(period)
        self.keep = int(keep)
        self.cuda = cuda

    def _save(self, names: list[str], iteration: int) -> None:
        states = comm.all_gather(rng_state(self.cuda))  # every rank takes part
        attributes = comm.all_gather(model_attributes(self.checkpointer.model))
        if not comm.is_main_process():
            return
        for name in names:
            self.checkpointer.save(name, iteration=iteration, rng=states, model_attributes=attributes)
        prune_checkpoints(self.checkpointer.save_dir, self.keep)

    def after_step(self) -> None:
        iteration = self.trainer.iter
        names = []
        if (iteration + 1) % self.period == 0:
            names.append(f"model_{iteration:07d}")
        if iteration >= self.trainer.max_iter - 1:
            names.append("model_final")
        if names:
            self._save(names, iteration)

    def after_train(self) -> None:
        if self.trainer.start_iter < self.trainer.max_iter:
            return  # iterations ran: the last one wrote model_final (or an error stopped the run)
        final = Path(self.checkpointer.save_dir) / FINAL_WEIGHTS
        missing = comm.all_gather(not final.is_file())[0]  # rank 0 decides, all ranks gather
        if missing:
            logger.info("resumed at the last iteration without %s: writing it from that state", final.name)
            self._save(["model_final"], self.trainer.max_iter - 1)
