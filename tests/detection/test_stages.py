"""The train_<detector> / eval_<detector> stage adapters on the smoke profile's params, in a temp project."""

import json
import shutil

import pytest
import torch

from sge_repro.data.prepare import coco_source, write_manifests
from sge_repro.detection.checkpoint import evaluation_fingerprint
from sge_repro.detection.detectors import REFERENCE_TWO_STAGE_LR, detector_base_lr
from sge_repro.detection.engine import DetectorTrainer
from sge_repro.detection.setup import schedule_overrides
from sge_repro.errors import UserError
from sge_repro.models.attention import SpatialGroupEnhance
from sge_repro.stage_status import read_status
from sge_repro.stages.detection import detector_config, eval_det, train_det
from sge_repro.params_yaml import profile_params
from sge_repro.paths import ProjectPaths

from .conftest import GROUPS, WIDTH


def test_schedule_keeps_the_yaml_shape():
    paper = schedule_overrides("cascade_rcnn", "paper", 180000, 16, 0.02, 1000, 800, 1333, 5000, 4)
    assert paper["SOLVER.MAX_ITER"] == 150000 and paper["SOLVER.STEPS"] == (120000, 142500)  # 20e
    retina = schedule_overrides("retinanet", "embedded", 300, 8, 0.02, 50, 128, 128, 100, 0)
    assert retina["SOLVER.BASE_LR"] == 0.01 and retina["SOLVER.STEPS"] == (220, 280)
    tiny = schedule_overrides("faster_rcnn", "embedded", 6, 4, 0.005, 2, 64, 64, 3, 0)
    assert tiny["SOLVER.STEPS"] == (4,)  # 280/300 of 6 rounds to 6 = the end, so it is dropped
    assert tiny["SOLVER.BASE_LR"] == 0.005


def test_base_lr_is_the_two_stage_rate_scaled_by_the_yaml():
    assert REFERENCE_TWO_STAGE_LR == 0.02
    assert detector_base_lr(0.02, 0.02) == 0.02  # R-CNN YAMLs: base_lr as given
    assert detector_base_lr(0.005, 0.01) == 0.0025  # RetinaNet YAMLs: half


def _project(tmp_path, coco_set, detectron2_weights) -> ProjectPaths:
    paths = ProjectPaths(tmp_path)
    shutil.copytree(coco_set, paths.det_data)
    write_manifests([coco_source(paths, "synthetic", paths.det_data, "embedded")], paths)  # the data stage's index
    paths.det_weights("sge_resnet18", 0).parent.mkdir(parents=True)
    shutil.copy(detectron2_weights, paths.det_weights("sge_resnet18", 0))
    return paths


def _sge_impls(cfg) -> set:
    detector = DetectorTrainer.build_model(cfg)
    return {module.impl for module in detector.modules() if isinstance(module, SpatialGroupEnhance)}


def test_params_model_sge_impl_reaches_the_detector_backbone(coco_set, detectron2_weights, tmp_path):
    params = profile_params("smoke")
    paths = _project(tmp_path, coco_set, detectron2_weights)
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    assert cfg.MODEL.SGE_BACKBONE.SGE_IMPL == "fast" and _sge_impls(cfg) == {"fast"}
    params.model.sge_impl = "reference"
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    assert cfg.MODEL.SGE_BACKBONE.SGE_IMPL == "reference" and _sge_impls(cfg) == {"reference"}
    # width and groups come from the converted weights' header, not from the YAML
    assert (cfg.MODEL.SGE_BACKBONE.WIDTH, cfg.MODEL.SGE_BACKBONE.GROUPS) == (WIDTH, GROUPS)


def test_params_model_sge_variant_reaches_an_sge_detector_backbone_only(coco_set, detectron2_weights, tmp_path):
    """model.sge_weight_init / sge_bias_init reach an SGE backbone's config, modules and training
    fingerprint; at the paper's values neither fingerprint has the keys (runs of before resume, their
    evaluations are kept); a plain backbone ignores them; sge_normalize must be the weights'."""
    from sge_repro.detection.checkpoint import FINGERPRINT_IF_NOT, config_fingerprint
    from sge_repro.detection.config import build_detector_config
    from sge_repro.errors import UserError

    params = profile_params("smoke")
    paths = _project(tmp_path, coco_set, detectron2_weights)
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    weights = paths.det_weights("sge_resnet18", 0)
    for fingerprint in (config_fingerprint(cfg), evaluation_fingerprint(cfg, weights, uses_sge=True)):
        assert not set(FINGERPRINT_IF_NOT) & set(fingerprint)
    params.model.sge_weight_init, params.model.sge_bias_init = 0.5, -1.0
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    node = cfg.MODEL.SGE_BACKBONE
    assert (node.SGE_WEIGHT_INIT, node.SGE_BIAS_INIT, node.SGE_NORMALIZE) == (0.5, -1.0, True)
    modules = [m for m in DetectorTrainer.build_model(cfg).modules() if isinstance(m, SpatialGroupEnhance)]
    assert modules and all(torch.all(m.weight == 0.5) and torch.all(m.bias == -1.0) for m in modules)
    fingerprint = config_fingerprint(cfg)
    assert (fingerprint["MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT"], fingerprint["MODEL.SGE_BACKBONE.SGE_BIAS_INIT"]) == (0.5, -1.0)
    plain = build_detector_config("faster_rcnn", "resnet18", None, "sge_embedded_train", None, tmp_path / "plain",
                                  num_classes=2, seed=0, sge_variant=params.model.sge_variant())
    assert (plain.MODEL.SGE_BACKBONE.SGE_WEIGHT_INIT, plain.MODEL.SGE_BACKBONE.SGE_BIAS_INIT) == (0.0, 1.0)
    params.model.sge_normalize = False  # these weights are of the paper's normalised module
    with pytest.raises(UserError, match=r"converted from an SGE with sge_normalize=True, but model.sge_normalize is False"):
        detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")


def test_protocol_param_picks_the_protocols_yaml(coco_set, detectron2_weights, tmp_path):
    params = profile_params("smoke")
    paths = _project(tmp_path, coco_set, detectron2_weights)
    params.train_det.protocol = "controlled"
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    assert cfg.PROTOCOL == "controlled"
    params.train_det.protocol = "authors"  # (the params validator would want other sources; the config does not care)
    cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    assert cfg.PROTOCOL == "authors" and cfg.MODEL.SGE_BACKBONE.NORM == "FrozenStatsBN"
    # smoke sets warmup_iters: 2, which wins over the YAML's
    assert cfg.SOLVER.WARMUP_ITERS == 2


def test_stages_train_and_write_the_metrics_contract(coco_set, detectron2_weights, tmp_path):
    torch.set_num_threads(1)
    params = profile_params("smoke")
    paths = _project(tmp_path, coco_set, detectron2_weights)

    summary = train_det(params, paths, "faster_rcnn", "sge_resnet18", 0)
    assert summary["iterations"] == params.train_det.max_iter and summary["dataset"] == "embedded"
    run_dir = paths.det_run_dir("faster_rcnn", "sge_resnet18", 0)
    before = sorted(p.name for p in run_dir.iterdir())

    metrics = eval_det(params, paths, "faster_rcnn", "sge_resnet18", 0)
    on_disk = json.loads(paths.det_metrics("faster_rcnn", "sge_resnet18", 0).read_text())
    assert on_disk == metrics
    assert (on_disk["detector"], on_disk["backbone"], on_disk["seed"], on_disk["dataset"]) == (
        "faster_rcnn", "sge_resnet18", 0, "embedded")
    assert set(on_disk["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert isinstance(on_disk["flags"]["no_detections"], bool)
    # how it was trained, for the report's rows
    assert (on_disk["engine"], on_disk["protocol"], on_disk["backbone_weights"]) == ("detectron2", "detectron2", "trained")
    # evaluation leaves train_det's output folder untouched (it is a DVC output of that stage)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    # each stage's status file under its name in dvc.yaml: train_<detector>@<backbone>-<seed>
    for stage in ("train_faster_rcnn@sge_resnet18-0", "eval_faster_rcnn@sge_resnet18-0"):
        assert read_status(paths.stage_status(stage))["state"] == "done", stage
    assert not list(paths.progress_dir.glob("*_det@*"))


def test_a_backbone_the_detector_does_not_list_is_refused(coco_set, detectron2_weights, tmp_path):
    """A backbone of another detector (params.yaml detection.<detector>) is not run: one line, nothing written."""
    params = profile_params("smoke")
    params.detection.retinanet = ["resnet18"]
    paths = _project(tmp_path, coco_set, detectron2_weights)
    message = r"params.yaml: detection.retinanet: 'sge_resnet18' is not listed \(listed: resnet18\)"
    with pytest.raises(UserError, match=message):
        train_det(params, paths, "retinanet", "sge_resnet18", 0)
    with pytest.raises(UserError, match=message):
        eval_det(params, paths, "retinanet", "sge_resnet18", 0)
    assert not paths.det_run_dir("retinanet", "sge_resnet18", 0).exists()
    assert not paths.det_metrics("retinanet", "sge_resnet18", 0).exists()


def test_eval_det_keeps_its_metrics_when_weights_and_settings_are_the_same(coco_set, detectron2_weights, tmp_path):
    """DVC reruns every eval_det when a `model` key changes (a G sweep): an evaluation whose weights,
    config and data are the same is not run again and its file is left as it was; one whose SGE
    backbone is built otherwise is."""
    torch.set_num_threads(1)
    params = profile_params("smoke")
    paths = _project(tmp_path, coco_set, detectron2_weights)
    train_det(params, paths, "faster_rcnn", "sge_resnet18", 0)
    metrics_file = paths.det_metrics("faster_rcnn", "sge_resnet18", 0)
    first = eval_det(params, paths, "faster_rcnn", "sge_resnet18", 0)
    written = metrics_file.stat()

    assert eval_det(params, paths, "faster_rcnn", "sge_resnet18", 0) == first
    assert (metrics_file.stat().st_ino, metrics_file.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    params.model.sge_impl = "reference"  # an SGE backbone reads it: evaluated again
    again = eval_det(params, paths, "faster_rcnn", "sge_resnet18", 0)
    assert metrics_file.stat().st_ino != written.st_ino
    assert again["inputs"]["config"]["MODEL.SGE_BACKBONE.SGE_IMPL"] == "reference"
    assert json.loads(metrics_file.read_text()) == again

    # a plain backbone's evaluation leaves SGE's keys out; every other key counts
    cfg_fast, _, _ = detector_config(profile_params("smoke"), paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    cfg_ref, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
    weights = paths.det_run_dir("faster_rcnn", "sge_resnet18", 0) / "model_final.pth"
    assert evaluation_fingerprint(cfg_fast, weights, uses_sge=False) == evaluation_fingerprint(cfg_ref, weights, uses_sge=False)
    assert evaluation_fingerprint(cfg_fast, weights, uses_sge=True) != evaluation_fingerprint(cfg_ref, weights, uses_sge=True)
    cfg_ref.defrost()
    cfg_ref.INPUT.MIN_SIZE_TEST += 32  # a test-time setting (not in the training fingerprint) counts here
    assert evaluation_fingerprint(cfg_fast, weights, uses_sge=False) != evaluation_fingerprint(cfg_ref, weights, uses_sge=False)

    metrics_file.write_text("{ truncated")  # an unreadable earlier file: evaluated again, not trusted
    assert eval_det(params, paths, "faster_rcnn", "sge_resnet18", 0)["bbox"] == again["bbox"]


def test_cudnn_never_autotunes_and_deterministic_only_picks_kernels(coco_set, detectron2_weights, tmp_path):
    """COCO's images come in many sizes: cudnn.benchmark would tune every new shape. train_det's
    `deterministic` chooses deterministic kernels or not, and a run may resume across it."""
    from sge_repro.detection.checkpoint import config_fingerprint

    paths = _project(tmp_path, coco_set, detectron2_weights)
    fingerprints = []
    for deterministic in (True, False):
        params = profile_params("smoke")
        params.train_det.deterministic = deterministic
        cfg, _, _ = detector_config(params, paths, "faster_rcnn", "sge_resnet18", 0, "cpu")
        assert (cfg.CUDNN_BENCHMARK, cfg.DETERMINISTIC) == (False, deterministic)
        fingerprints.append(config_fingerprint(cfg))
    assert fingerprints[0] == fingerprints[1]
    paper = schedule_overrides("faster_rcnn", "paper", 180000, 16, 0.02, 1000, 800, 1333, 5000, 4, deterministic=False)
    assert paper["CUDNN_BENCHMARK"] is False and paper["DETERMINISTIC"] is False
