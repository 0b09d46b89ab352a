"""Training and COCO evaluation of detectors through detectron2's own engine.

`train_detector(cfg)` runs a DefaultTrainer subclass (hooks, periodic atomic checkpoints with
resume, TensorBoard / JSON events in OUTPUT_DIR) and `evaluate_detector(cfg, weights, dataset)`
runs COCOEvaluator on pycocotools (use_fast_impl=False: no compiled ops needed).

Distributed: start with torchrun (env:// rendezvous); this module initialises the process
group itself (NCCL on GPU, gloo on CPU), since detectron2 v0.6's `launch` requires CUDA.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from sge_repro.atomic import torch_save, write_text
from sge_repro.detection import backbone as _backbones  # noqa: F401  (registers the backbones)
from sge_repro.detection.compat import import_detectron2
from sge_repro.detection.convert import check_detector_weights
from sge_repro.detection.status_hook import status_hooks, with_status
from sge_repro.distributed import join_process_group
from sge_repro.errors import UserError
from sge_repro.models.checkpoints import load_checkpoint_file

import_detectron2()
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.data import build_detection_test_loader  # noqa: E402
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks  # noqa: E402
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, JSONWriter  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FINAL_WEIGHTS = "model_final.pth"
logger = logging.getLogger("sge_repro.detection")


# --------------------------------------------------------------------------- distributed
def init_distributed_from_env() -> int:
    """Join the torchrun process group if WORLD_SIZE > 1; returns the world size."""
    if dist.is_initialized():
        return comm.get_world_size()
    world_size = join_process_group(cuda=torch.cuda.is_available()).world_size
    if world_size <= 1:
        return comm.get_world_size()
    # detectron2's comm.get_local_rank() reads a per-machine group that only its `launch` makes
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    machine = dist.get_rank() // local_size
    for index in range(world_size // local_size):
        group = dist.new_group(list(range(index * local_size, (index + 1) * local_size)))
        if index == machine:
            comm._LOCAL_PROCESS_GROUP = group
    return world_size


# --------------------------------------------------------------------------- checkpoints
class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, but every file is written atomically (temp + rename), so a
    killed run never leaves a truncated checkpoint that `last_checkpoint` would point to."""

    def __init__(self, model, save_dir: str = "", metadata: dict | None = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.metadata = metadata or {}

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data["sge_repro"] = dict(self.metadata)
        basename = f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {os.path.join(self.save_dir, basename)}")
        torch_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str):
        # torch.load(weights_only=True) in every case (fvcore's default may change with torch)
        if filename.endswith(".pkl"):
            raise UserError(f"weights {filename}: pickled Detectron .pkl files are not loaded; convert with sge-repro convert")
        loaded = load_checkpoint_file(filename, what="weights")
        return loaded if "model" in loaded else {"model": loaded}


def _weights_metadata(cfg: CfgNode) -> dict:
    node = cfg.MODEL.SGE_BACKBONE
    return {
        "format": "sge-repro/detector/v1",
        "model": node.ARCH,
        "model_kwargs": {"width": int(node.WIDTH), "groups": int(node.GROUPS)},
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "input_format": cfg.INPUT.FORMAT,
    }


# --------------------------------------------------------------------------- training
class DetectorTrainer(DefaultTrainer):
    """DefaultTrainer with CPU DDP, atomic checkpoints and COCOEvaluator on pycocotools."""

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # CPU modules need device_ids=None (detectron2 would pass [local_rank])
        on_cuda = cfg.MODEL.DEVICE.startswith("cuda")
        model = create_ddp_model(
            model, broadcast_buffers=False, **({} if on_cuda else {"device_ids": None})
        )
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(
            model, cfg.OUTPUT_DIR, metadata=_weights_metadata(cfg), trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        built = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD <= 0:
            # evaluation is its own pipeline stage; no implicit eval at the end of training
            built = [hook for hook in built if not isinstance(hook, hooks.EvalHook)]
        return built

    def build_writers(self):
        """Console, metrics.json and TensorBoard events (TensorBoard skipped, with a warning, when
        the `tensorboard` package is absent)."""
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard events, metrics.json only")
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        return super().build_writers()

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=coco_tasks(cfg), output_dir=output_folder, use_fast_impl=False)


def coco_tasks(cfg: CfgNode) -> tuple[str, ...]:
    """Evaluated tasks from the config, not from the predictions: zero detections still yield
    a segm entry for a mask model."""
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def _setup_run(cfg: CfgNode, log_to_output_dir: bool = True) -> None:
    init_distributed_from_env()
    rank = comm.get_rank()
    if log_to_output_dir:
        Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    # Evaluation must not touch OUTPUT_DIR: it is train_det's DVC output, and a changed log.txt
    # there would make DVC retrain.
    output = cfg.OUTPUT_DIR if log_to_output_dir else None
    setup_logger(output=output, distributed_rank=rank, name="detectron2", abbrev_name="d2")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)


def _last_checkpoint(output_dir: str) -> str | None:
    marker = Path(output_dir) / "last_checkpoint"
    if marker.is_file():
        candidate = Path(output_dir) / marker.read_text().strip()
        if candidate.is_file():
            return str(candidate)
    return None


def train_detector(cfg: CfgNode, resume: bool = True, status=None) -> Path:
    """Train the detector of `cfg`; returns OUTPUT_DIR/model_final.pth.

    resume=True continues from OUTPUT_DIR/last_checkpoint when present (a finished run returns
    at once); otherwise starts from cfg.MODEL.WEIGHTS, whose backbone tensors must ALL be
    present (UserError otherwise). A NaN / infinite loss stops with a UserError naming the
    iteration and the last good checkpoint (left in place).
    """
    _setup_run(cfg)
    if comm.is_main_process():
        write_text(Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump())
    trainer = DetectorTrainer(cfg)
    trainer.register_hooks(status_hooks(status, cfg.SOLVER.IMS_PER_BATCH))  # progress file (stage_status)
    resuming = resume and trainer.checkpointer.has_checkpoint()
    if not resuming:
        if cfg.MODEL.WEIGHTS:
            check_detector_weights(
                trainer.checkpointer.model, cfg.MODEL.WEIGHTS,
                pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
            )
        else:
            logger.warning("MODEL.WEIGHTS is empty: the detector starts from a random initialisation")
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except FloatingPointError as error:
        last = _last_checkpoint(cfg.OUTPUT_DIR)
        kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written before it"
        raise UserError(
            f"detector training diverged: loss became NaN or infinite at iteration {trainer.iter} "
            f"(SOLVER.BASE_LR={cfg.SOLVER.BASE_LR}); {kept}. Lower SOLVER.BASE_LR or lengthen "
            f"SOLVER.WARMUP_ITERS ({str(error).splitlines()[0]})"
        ) from None
    comm.synchronize()
    final = Path(cfg.OUTPUT_DIR) / FINAL_WEIGHTS
    if comm.is_main_process() and not final.is_file():
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


def evaluate_detector(cfg: CfgNode, weights: str | os.PathLike, dataset: str,
                      output_dir: str | os.PathLike | None = None, status=None) -> dict | None:
    """COCO metrics of the detector `weights` on registered `dataset`.

    Returns (on the main process; None on the others):
      {"bbox": {"AP","AP50","AP75","APs","APm","APl"}, "segm": {...} (mask models only),
       "per_category": {task: {name: AP}}, "nan_metrics": {task: [names reported as 0.0]},
       "no_detections": bool, "num_detections": int, "num_images": int, "dataset", "weights"}
    APs are in percent. NaN (zero detections, or no objects of a size) is reported as 0.0 and
    flagged in nan_metrics.
    """
    _setup_run(cfg, log_to_output_dir=False)
    weights = Path(weights)
    model = DetectorTrainer.build_model(cfg)
    # evaluation needs the whole detector from the file, not only its backbone
    check_detector_weights(model, weights, require_all=True,
                           pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD)
    AtomicCheckpointer(model).load(str(weights))
    model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        evaluator = COCOEvaluator(dataset, tasks=coco_tasks(cfg), output_dir=str(folder), use_fast_impl=False)
        loader = build_detection_test_loader(cfg, dataset)
        raw = inference_on_dataset(model, loader, with_status(evaluator, status, len(loader)))
        if not comm.is_main_process():
            return None
        predictions = folder / "coco_instances_results.json"
        import json

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
        "num_images": len(loader.dataset),
        "dataset": dataset,
        "weights": str(weights),
    })
    return result
