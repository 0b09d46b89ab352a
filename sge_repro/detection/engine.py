"""Training and COCO evaluation of detectors through detectron2's own engine.

Distributed: each of N env:// worker processes calls the same function; it joins the group (NCCL
on GPU, gloo on CPU) and makes detectron2's per-machine group itself, since v0.6's `launch`
requires CUDA. SOLVER.IMS_PER_BATCH is the global batch (each rank loads its share); only rank 0
writes files. Evaluation runs COCOEvaluator on pycocotools (use_fast_impl=False: no compiled ops).
Images are not decoded to check them: the data stage verified each one once (sge_repro.data.verify).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from sge_repro.atomic import write_text
from sge_repro.detection import backbone as _backbones  # noqa: F401  (registers the backbones)
from sge_repro.detection.checkpoint import (
    FINAL_WEIGHTS, AtomicCheckpointer, CheckpointHook, checkpoint_loads, config_fingerprint, last_checkpoint,
    read_resume_state, set_model_attributes, set_rng_state,
)
from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.convert import check_detector_weights
from sge_repro.detection.event_writers import EventsWriter, MetricsWriter
from sge_repro.detection.mmdetection import build_optimizer  # also registers the authors' Cascade heads
from sge_repro.detection.loader import NamedImageErrors, build_train_loader, training_records
from sge_repro.detection.writes import append_log_to, disk_errors, raise_disk_error
from sge_repro.detection.status_hook import status_hooks, with_status
from sge_repro.distributed import join_process_group
from sge_repro.errors import UserError
from sge_repro.superseded import supersede_changed_run

import_detectron2()
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.engine import AMPTrainer, SimpleTrainer, TrainerBase, hooks  # noqa: E402
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from fvcore.nn.precise_bn import get_bn_modules  # noqa: E402  (fvcore.nn scripts with torch.jit: after the shims)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
logger = logging.getLogger("sge_repro.detection")


# --------------------------------------------------------------------------- distributed
def init_distributed_from_env(cuda: bool | None = None) -> int:
    """Join the env:// process group if WORLD_SIZE > 1 and make detectron2's per-machine group
    (what its `launch` would make); returns the world size."""
    if dist.is_initialized():
        return comm.get_world_size()
    world_size = join_process_group(cuda=torch.cuda.is_available() if cuda is None else cuda).world_size
    if world_size <= 1:
        return comm.get_world_size()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if world_size % local_size:
        raise UserError(f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_size}")
    machine = dist.get_rank() // local_size
    for index in range(world_size // local_size):  # every rank creates every group, in order
        group = dist.new_group(list(range(index * local_size, (index + 1) * local_size)))
        if index == machine:
            # detectron2 0.6 has no public way to set it: only its `launch` does, and that needs CUDA
            comm._LOCAL_PROCESS_GROUP = group
    return world_size


def _on_cuda(cfg: CfgNode) -> bool:
    return cfg.MODEL.DEVICE.startswith("cuda")


# --------------------------------------------------------------------------- checkpoints
def _weights_metadata(cfg: CfgNode) -> dict:
    node = cfg.MODEL.SGE_BACKBONE
    return {
        "format": "sge-repro/detector/v1",
        "model": node.ARCH,
        # sge_normalize only when off, as the classifier's header records it
        "model_kwargs": {"width": int(node.WIDTH), "groups": int(node.GROUPS),
                         **({"sge_normalize": False} if node.SGE_NORMALIZE is False else {})},
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "input_format": cfg.INPUT.FORMAT,
    }


def _build_model(cfg: CfgNode) -> torch.nn.Module:
    """detectron2's model, logged in one line (detectron2's DefaultTrainer would print the whole module tree)."""
    model = build_model(cfg)
    count = sum(parameter.numel() for parameter in model.parameters())
    logger.info("model: %s with backbone %s, %.2fM parameters", cfg.MODEL.META_ARCHITECTURE,
                cfg.MODEL.SGE_BACKBONE.ARCH, count / 1e6)
    return model


# --------------------------------------------------------------------------- training


class DetectorTrainer(TrainerBase):
    """detectron2's training loop (TrainerBase + SimpleTrainer / AMPTrainer, as its
    tools/plain_train_net.py builds on where DefaultTrainer's assumptions do not hold) with CPU
    DDP, the resumable data stream, and atomic checkpoints carrying the config fingerprint and RNG
    states (CheckpointHook) on every rank. Evaluation is the eval_det stage, not a training hook."""

    def __init__(self, cfg: CfgNode, records: list[dict] | None = None, start_iter: int = 0,
                 keep_checkpoints: int = 2, fingerprint: dict | None = None):
        super().__init__()
        if cfg.TEST.EVAL_PERIOD > 0:
            raise UserError(f"TEST.EVAL_PERIOD={cfg.TEST.EVAL_PERIOD}: expected 0 (detectors are evaluated by the "
                            "eval_det stage, not during training)")
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        records = training_records(cfg) if records is None else records
        data_loader = build_train_loader(cfg, records, start_iter)
        # CPU modules need device_ids=None (detectron2 would pass [local_rank])
        model = create_ddp_model(
            model, broadcast_buffers=False, **({} if _on_cuda(cfg) else {"device_ids": None})
        )
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self.loop = trainer_class(model, data_loader, optimizer)
        self.model, self.optimizer = model, optimizer  # what detectron2's hooks read from a trainer
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        metadata = {**_weights_metadata(cfg), "world_size": comm.get_world_size(),
                    **({"fingerprint": fingerprint} if fingerprint is not None else {})}
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, metadata=metadata, trainer=weakref.proxy(self))
        self.keep_checkpoints = keep_checkpoints
        self.start_iter = start_iter
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks(records))

    build_optimizer = staticmethod(build_optimizer)  # adds the authors' full-model gradient clipping
    build_model = staticmethod(_build_model)
    build_lr_scheduler = staticmethod(build_lr_scheduler)

    def run_step(self):
        self.loop.iter = self.iter
        self.loop.run_step()

    def train(self):
        super().train(self.start_iter, self.max_iter)

    def state_dict(self) -> dict:
        # the iteration and the hooks' states (the LR scheduler), and the loop's: the optimizer's
        # momentum and AMP's grad scaler
        return {**super().state_dict(), "_trainer": self.loop.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.loop.load_state_dict(state["_trainer"])

    def build_hooks(self, records: list[dict]):
        """Timing and the LR schedule; PreciseBN when the config enables it (before the checkpoint,
        which saves its statistics); checkpoints on every rank (the RNG states are gathered from
        all); the writers last, on the main process."""
        cfg = self.cfg
        built = [hooks.IterationTimer(), hooks.LRScheduler()]
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            quiet = cfg.clone()
            quiet.defrost()
            quiet.DATALOADER.NUM_WORKERS = 0  # as detectron2: no loader workers for the statistics
            built.append(hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, build_train_loader(quiet, records, 0),
                                         cfg.TEST.PRECISE_BN.NUM_ITER))
        built.append(CheckpointHook(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, self.keep_checkpoints,
                                    cuda=_on_cuda(cfg)))
        if comm.is_main_process():
            built.append(hooks.PeriodicWriter(self.build_writers(), period=20))
        return built

    def build_writers(self):
        """Console, metrics.json and TensorBoard events (TensorBoard skipped, with a warning, when
        the `tensorboard` package is absent)."""
        writers = [CommonMetricPrinter(self.max_iter), MetricsWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard events, metrics.json only")
            return writers
        return writers + [EventsWriter(self.cfg.OUTPUT_DIR)]

    def resume_from(self, path: Path, iteration: int) -> None:
        """Load model, optimizer, scheduler, iteration and this rank's RNG states and model
        attributes (RetinaNet's loss normalizer) from `path`."""
        extra = self.checkpointer.load(str(path))
        assert self.iter == iteration and self.start_iter == iteration + 1, (self.iter, iteration, self.start_iter)
        states, attributes = extra.get("rng"), extra.get("model_attributes")
        if isinstance(attributes, list) and attributes:
            # another number of processes: every rank continues from rank 0's average
            rank = comm.get_rank() if len(attributes) == comm.get_world_size() else 0
            set_model_attributes(self.checkpointer.model, attributes[rank])
        if isinstance(states, list) and len(states) == comm.get_world_size():
            set_rng_state(states[comm.get_rank()])
        else:
            logger.warning("%s holds the RNG states of %s processes, this run has %d: the random streams of "
                           "the model (proposal sampling) continue from new seeds", path,
                           len(states) if isinstance(states, list) else "no", comm.get_world_size())


def coco_tasks(cfg: CfgNode) -> tuple[str, ...]:
    """Evaluated tasks from the config, not from the predictions: zero detections still yield
    a segm entry for a mask model."""
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """Drops detectron2's 'Exception during training:' traceback for a UserError (one line, by the CLI)."""
    return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def _setup_logging(output_dir: str | None) -> None:
    """detectron2's console log (rank 0) and OUTPUT_DIR/log.txt (rank 0 only: no log.txt.rankN),
    appended in whole records."""
    rank = comm.get_rank()
    output = output_dir if rank == 0 else None
    d2_logger = setup_logger(output=output, distributed_rank=rank, name="detectron2", abbrev_name="d2")
    if output is not None:
        append_log_to(d2_logger, os.path.join(output, "log.txt"))
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    if _not_a_user_error not in train_loop.filters:
        train_loop.addFilter(_not_a_user_error)


def _apply_determinism(cfg: CfgNode) -> None:
    """Deterministic cudnn kernels per DETERMINISTIC (train_det.deterministic), autotuning per
    CUDNN_BENCHMARK (off: see setup.schedule_overrides). No effect on CPU."""
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    torch.backends.cudnn.deterministic = bool(cfg.DETERMINISTIC) and not cfg.CUDNN_BENCHMARK


def _check_seed(cfg: CfgNode) -> None:
    if cfg.SEED < 0:
        raise UserError(f"SEED={cfg.SEED}: expected a seed >= 0 (detectron2 reads a negative seed as 'random')")


def train_detector(cfg: CfgNode, resume: bool = True, keep_checkpoints: int = 2, status=None) -> Path:
    """Train the detector of `cfg`; returns OUTPUT_DIR/model_final.pth. Call it in every process
    of a distributed run.

    resume=True continues from OUTPUT_DIR/last_checkpoint when present (a finished run returns
    at once), exactly where an uninterrupted run would be (model, optimizer, scheduler,
    iteration, data stream and RNG states); a run written under another config is moved aside
    (sge_repro.superseded: one warning line naming the differing keys) and training starts over.
    Otherwise starts from cfg.MODEL.WEIGHTS, whose backbone tensors must ALL be present
    (UserError otherwise). Keeps the newest `keep_checkpoints` periodic checkpoints. An image
    that fails to decode when its batch is loaded is a UserError naming it, the checkpoints
    written so far kept. A NaN / infinite loss stops with a UserError naming the iteration and
    the last good checkpoint.
    """
    _check_seed(cfg)
    if keep_checkpoints < 1:
        raise UserError(f"keep_checkpoints={keep_checkpoints}: expected at least 1")
    init_distributed_from_env(cuda=_on_cuda(cfg))
    rank = comm.get_rank()
    _apply_determinism(cfg)
    records = training_records(cfg)
    fingerprint = config_fingerprint(cfg, num_images=len(records))
    if resume:  # a run of another config is moved aside, not resumed (sge_repro.superseded)
        supersede_changed_run(lambda: read_resume_state(cfg.OUTPUT_DIR, fingerprint, warn=False), cfg.OUTPUT_DIR,
                              rank == 0, comm.synchronize)
    resume_state = read_resume_state(cfg.OUTPUT_DIR, fingerprint) if resume else None
    final = Path(cfg.OUTPUT_DIR) / FINAL_WEIGHTS
    final_loads = final.is_file() and (resume_state is not None and resume_state[0] == final or checkpoint_loads(final))
    if resume_state and resume_state[1] >= cfg.SOLVER.MAX_ITER - 1 and final_loads:
        return final  # finished under this config: nothing to do, nothing rewritten
    # ---- nothing was written before this line
    if final.is_file() and not final_loads and rank == 0:
        # a model_final that does not load is not a finished run: written again by the resumed run
        logger.warning("%s does not load: removed; the run resumes and writes it again", final)
        final.unlink()
    if rank == 0:
        with disk_errors(Path(cfg.OUTPUT_DIR) / "log.txt"):
            Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
            _setup_logging(cfg.OUTPUT_DIR)
        with disk_errors(Path(cfg.OUTPUT_DIR) / "config.yaml"):
            write_text(Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump())
    else:
        _setup_logging(None)
    seed_all_rng(cfg.SEED + rank)
    start_iter = resume_state[1] + 1 if resume_state else 0
    trainer = DetectorTrainer(cfg, records, start_iter, keep_checkpoints, fingerprint)
    trainer.register_hooks(status_hooks(status, cfg.SOLVER.IMS_PER_BATCH))  # progress file (stage_status)
    if resume_state:
        trainer.resume_from(resume_state[0], resume_state[1])
    elif cfg.MODEL.WEIGHTS:
        check_detector_weights(trainer.checkpointer.model, cfg.MODEL.WEIGHTS,
                               pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD)
        trainer.checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
    else:
        logger.warning("MODEL.WEIGHTS is empty: the detector starts from a random initialisation")
    try:
        try:
            trainer.train()
        except (OSError, RuntimeError) as error:  # a write not named by its writer (fsync, a library's file)
            raise_disk_error(cfg.OUTPUT_DIR, error)
            raise
    except FloatingPointError as error:
        last = last_checkpoint(cfg.OUTPUT_DIR)
        kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written before it"
        raise UserError(
            f"detector training diverged: loss became NaN or infinite at iteration {trainer.iter} "
            f"(SOLVER.BASE_LR={cfg.SOLVER.BASE_LR}); {kept}. Lower SOLVER.BASE_LR or lengthen "
            f"SOLVER.WARMUP_ITERS ({str(error).splitlines()[0]})"
        ) from None
    comm.synchronize()
    if rank == 0 and not final.is_file():
        raise RuntimeError(f"training ended without writing {final}")
    return final


# --------------------------------------------------------------------------- evaluation
def _clean_metrics(raw: dict) -> tuple[dict, list[str]]:
    """The six COCO metrics as floats in percent; NaN -> 0.0, listed in the second value."""
    cleaned, nan_metrics = {}, []
    for name in COCO_METRICS:
        value = float(raw.get(name, float("nan")))
        if math.isnan(value):
            nan_metrics.append(name)
            value = 0.0
        cleaned[name] = round(value, 4)
    return cleaned, nan_metrics


class _SubsetCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator over the images that were evaluated (all of them unless some were left out
    as corrupt: then AP is over the rest, not counting the skipped images' objects as missed)."""

    def __init__(self, *args, image_ids: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._image_ids = image_ids

    def evaluate(self, img_ids=None):
        return super().evaluate(self._image_ids if img_ids is None else img_ids)


def evaluate_detector(cfg: CfgNode, weights: str | os.PathLike, dataset: str,
                      output_dir: str | os.PathLike | None = None, status=None) -> dict | None:
    """COCO metrics of the detector `weights` on registered `dataset`.

    Returns (on the main process; None on the others):
      {"bbox": {"AP","AP50","AP75","APs","APm","APl"}, "segm": {...} (mask models only),
       "per_category": {task: {name: AP}}, "nan_metrics": {task: [names reported as 0.0]},
       "no_detections": bool, "num_detections": int, "num_images": int, "skipped_images": [files],
       "dataset", "weights"}
    APs are in percent. NaN (zero detections, or no objects of a size) is reported as 0.0 and
    flagged in nan_metrics. The images the registration left out (found corrupt by the data stage,
    data.skip_corrupt) are listed in skipped_images and AP is over the rest: their objects do
    not count as missed. An image that fails to decode when loaded is a UserError naming it.
    """
    init_distributed_from_env(cuda=_on_cuda(cfg))
    kept = DatasetCatalog.get(dataset)
    metadata = MetadataCatalog.get(dataset)
    # the excluded files of this split (the exclusion lists every split's; each has its own folder)
    skipped = sorted(name for name in metadata.get("excluded", ())
                     if Path(name).is_relative_to(metadata.get("image_root", "/nowhere")))
    weights = Path(weights)
    model = _build_model(cfg)
    # evaluation needs the whole detector from the file, not only its backbone
    check_detector_weights(model, weights, require_all=True,
                           pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD)
    # console log only after the checks (an error is one line); never in OUTPUT_DIR, train_det's
    # DVC output, where a changed log.txt would make DVC retrain
    _setup_logging(None)
    AtomicCheckpointer(model).load(str(weights))
    model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        evaluator = _SubsetCOCOEvaluator(
            dataset, tasks=coco_tasks(cfg), output_dir=str(folder), use_fast_impl=False,
            image_ids=[record["image_id"] for record in kept] if skipped else None)
        loader = build_detection_test_loader(dataset=kept, mapper=NamedImageErrors(DatasetMapper(cfg, False)),
                                             num_workers=cfg.DATALOADER.NUM_WORKERS)
        raw = inference_on_dataset(model, loader, with_status(evaluator, status, len(loader)))
        if not comm.is_main_process():
            return None
        predictions = folder / "coco_instances_results.json"
        num_detections = len(json.loads(predictions.read_text())) if predictions.is_file() else 0
    result: dict = {"per_category": {}, "nan_metrics": {}}
    for task in ("bbox", "segm"):
        if task not in raw:
            continue
        result[task], result["nan_metrics"][task] = _clean_metrics(raw[task])
        result["per_category"][task] = {
            key[3:]: (0.0 if math.isnan(value) else round(float(value), 4))
            for key, value in raw[task].items() if key.startswith("AP-")
        }
    if "bbox" not in result:
        raise UserError(f"evaluation of {weights} on {dataset}: COCOEvaluator returned no bbox results")
    result.update({
        "no_detections": num_detections == 0,
        "num_detections": num_detections,
        "num_images": len(kept),
        "skipped_images": skipped,
        "dataset": dataset,
        "weights": str(weights),
    })
    return result
