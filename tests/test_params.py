"""params.yaml schema: defaults, profiles, and one-line errors that name the key."""

from pathlib import Path

import pytest
import yaml

from sge_repro.errors import UserError
from sge_repro.params import PROFILES_DIR, Params, validate_params
from sge_repro.params_yaml import available_profiles, dump_params, load_params, profile_params, set_values

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_the_embedded_profile():
    committed = load_params(REPO / "params.yaml")
    assert committed == profile_params("embedded", REPO / PROFILES_DIR)
    assert (REPO / "params.yaml").read_text() == dump_params(committed)


def test_every_profile_validates_and_round_trips():
    names = available_profiles(REPO / PROFILES_DIR)
    assert {"embedded", "smoke"} <= set(names)
    for name in names:
        params = profile_params(name, REPO / PROFILES_DIR)
        assert params.profile == name
        assert validate_params(yaml.safe_load(dump_params(params))) == params


def test_smoke_overlay_changes_only_what_it_names():
    smoke = profile_params("smoke", REPO / PROFILES_DIR)
    default = Params()
    assert smoke.train_cls.epochs == 2 and default.train_cls.epochs != 2
    assert smoke.train_cls.momentum == default.train_cls.momentum


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p["train_cls"].update(epoch=3), "unknown key 'train_cls.epoch'"),
        (lambda p: p["train_cls"].update(epochs="ten"), "train_cls.epochs"),
        (lambda p: p.update(models=["resnet18", "sge_resnet19"]), "unknown model 'sge_resnet19'"),
        (lambda p: p["detection"].update(yolo=["resnet18"]), "unknown key 'detection.yolo' (allowed here: "
                                                             "faster_rcnn, mask_rcnn, cascade_rcnn, retinanet)"),
        (lambda p: p["detection"].update(faster_rcnn=["resnet19"]), "detection.faster_rcnn: unknown model 'resnet19'"),
        (lambda p: p["detection"].update(faster_rcnn=["resnet50"]),
         "detection: backbone 'resnet50' has no weights: list it in convert.trained"),
        (lambda p: (p["detection"].update(faster_rcnn=["resnet50"]), p["convert"]["trained"].append("resnet50")),
         "convert.trained: 'resnet50' is not among models"),
        (lambda p: p["data"]["classification"].update(source="cifar"), "data.classification.source"),
        (lambda p: p.update(seeds=[0, 0]), "seeds: duplicate"),
        (lambda p: p["detection"].update(faster_rcnn=[], retinanet=[]),
         "detection: no detector has a backbone; expected a backbone in at least one of faster_rcnn, mask_rcnn"),
        (lambda p: p["detection"].update(retinanet=["resnet18", "resnet18"]), "detection.retinanet: duplicate entries"),
        (lambda p: p["detection"].update(faster_rcnn=["resnet18"], retinanet=["resnet18"]),
         "convert.trained: 'sge_resnet18' is not a backbone of any detector in detection (backbones: resnet18)"),
        (lambda p: p["convert"].update(files={"resnet18": "r18.pth"}),
         "convert.trained: 'resnet18' is also in convert.files; expected one source"),
        (lambda p: p["convert"].update(trained=["sge_resnet18"], torchvision=["resnet18"]),
         "convert.torchvision: 'resnet18': torchvision's ImageNet weights exist for resnet50, resnet101 only"),
        (lambda p: p["convert"].update(torchvision_weights={"resnet50": {"url": "https://x/r50.pth", "sha256": "0" * 8}}),
         "convert.torchvision_weights: 'resnet50' is not in convert.torchvision"),
        (lambda p: p["train_cls"].update(epochs=0), "train_cls.epochs: input should be greater than or equal to 1"),
        (lambda p: p["train_cls"].update(lr_schedule="linear"), "train_cls.lr_schedule"),
        (lambda p: p["train_cls"].update(milestones=[30, 0]), "train_cls.milestones.1"),
        (lambda p: p["train_cls"].update(amp="fp8"), "train_cls.amp: input should be 'fp32', 'bf16' or 'fp16'"),
        (lambda p: p["eval_cls"].update(amp="fp8"), "eval_cls.amp"),
        (lambda p: p["train_cls"].update(amp="off"), "train_cls.amp: got 'off': 'off' is now called fp32"),
        (lambda p: p["eval_cls"].update(amp=False), "eval_cls.amp: got false (an unquoted off, as YAML reads it): "
                                                     "'off' is now called fp32"),
        (lambda p: p["train_cls"].update(epochs=6, warmup_epochs=7),
         "train_cls: warmup_epochs=7: expected 0 <= warmup_epochs <= epochs (6)"),
        (lambda p: p["data"]["classification"].update(image_size=8),
         "data.classification.image_size: expected at least 16 pixels per side, got 8"),
        (lambda p: p["data"]["detection"].update(image_size=[640, 31]),
         "data.detection.image_size: expected at least 32 pixels per side, got [640, 31]"),
        (lambda p: p["data"]["classification"].update(image_size=[500, 375, 3]),
         "data.classification.image_size: expected a size in pixels or [width, height], got [500, 375, 3]"),
        (lambda p: p["data"]["detection"].update(image_size=True),
         "data.detection.image_size: expected a size in pixels"),
    ],
)
def test_bad_params_name_the_key(mutate, expected):
    raw = Params().model_dump(mode="json")
    mutate(raw)
    with pytest.raises(UserError) as info:
        validate_params(raw, "params.yaml")
    message = str(info.value)
    assert expected in message
    assert message.startswith("params.yaml: ")
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_ones():
    raw = Params().model_dump(mode="json")
    raw["report"]["tolerence"] = 0.5
    with pytest.raises(UserError, match=r"allowed here: tolerance, bootstrap_samples, seed"):
        validate_params(raw)


def test_unknown_profile_lists_available(tmp_path):
    with pytest.raises(UserError, match=r"unknown profile 'huge'.*available: .*embedded"):
        profile_params("huge", REPO / PROFILES_DIR)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seeds: [0\nmodels: x\n")
    with pytest.raises(UserError, match=r"params.yaml: line \d+ not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda p: p.update(seeds=[0, -1]), "seeds.1: input should be greater than or equal to 0, got -1"),
        (lambda p: p["data"].update(seed=-3), "data.seed: input should be greater than or equal to 0"),
        (lambda p: p["report"].update(seed=-1), "report.seed: input should be greater than or equal to 0"),
        (lambda p: p["train_cls"].update(epochs=True), "train_cls.epochs: input should be a valid integer, got True"),
        (lambda p: p.update(seeds=[False]), "seeds.0: input should be a valid integer, got False"),
        (lambda p: p["train_cls"].update(epochs="3"), "train_cls.epochs: input should be a valid integer, got '3'"),
        (lambda p: p["train_cls"].update(epochs=3.0), "train_cls.epochs: input should be a valid integer, got 3.0"),
        (lambda p: p["train_cls"].update(lr=True), "train_cls.lr: input should be a valid number, got True"),
        (lambda p: p["train_cls"].update(lr="0.1"), "train_cls.lr: input should be a valid number, got '0.1'"),
        (lambda p: p["train_cls"].update(compile=1), "train_cls.compile: input should be a valid boolean, got 1"),
        (lambda p: p["train_cls"].update(compile="yes"), "train_cls.compile: input should be a valid boolean"),
        (lambda p: p["train_cls"].update(device=0), "train_cls.device: input should be a valid string, got 0"),
        (lambda p: p.update(models=["resnet18", 18]), "models.1: input should be a valid string, got 18"),
        (lambda p: p["data"]["classification"].update(max_val_images=0),
         "data.classification.max_val_images: input should be greater than or equal to 1, got 0"),
        (lambda p: p["data"]["classification"].update(max_train_images=-2),
         "data.classification.max_train_images: input should be greater than or equal to 1, got -2"),
        (lambda p: p["data"]["classification"].update(max_val_images="100"),
         "data.classification.max_val_images: input should be a valid integer, got '100'"),
        (lambda p: p["data"]["classification"].update(max_train_images=True),
         "data.classification.max_train_images: input should be a valid integer, got True"),
        (lambda p: p["model"].update(sge_normalize="no"), "model.sge_normalize: input should be a valid boolean"),
        (lambda p: p["model"].update(sge_normalize=0), "model.sge_normalize: input should be a valid boolean, got 0"),
        (lambda p: p["model"].update(sge_weight_init="0.5"),
         "model.sge_weight_init: input should be a valid number, got '0.5'"),
        (lambda p: p["model"].update(sge_bias_init=True), "model.sge_bias_init: input should be a valid number, got True"),
        (lambda p: p["model"].update(sge_bias_init=float("inf")), "model.sge_bias_init: input should be a finite number"),
    ],
)
def test_types_are_strict_and_seeds_non_negative(mutate, expected):
    raw = Params().model_dump(mode="json")
    mutate(raw)
    with pytest.raises(UserError) as info:
        validate_params(raw, "params.yaml")
    assert str(info.value).startswith(f"params.yaml: {expected}")
    assert "\n" not in str(info.value)


def test_an_int_where_a_float_is_expected_stays_accepted():
    raw = Params().model_dump(mode="json")
    raw["train_cls"]["lr"] = 1
    raw["report"]["tolerance"] = 0
    params = validate_params(raw)
    assert params.train_cls.lr == 1.0 and isinstance(params.train_cls.lr, float)
    assert params.report.tolerance == 0.0


def test_the_sge_ablation_defaults_are_the_papers_module():
    from sge_repro.models.registry import SGE_VARIANT_DEFAULTS

    assert Params().model.sge_variant() == SGE_VARIANT_DEFAULTS == {
        "sge_weight_init": 0.0, "sge_bias_init": 1.0, "sge_normalize": True}
    raw = Params().model_dump(mode="json")
    raw["model"].update(sge_weight_init=1, sge_bias_init=-2, sge_normalize=False)  # ints read as floats
    assert validate_params(raw).model.sge_variant() == {"sge_weight_init": 1.0, "sge_bias_init": -2.0,
                                                        "sge_normalize": False}


def test_params_yaml_must_be_complete(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(UserError, match=r"params.yaml: empty; expected every section"):
        load_params(path)
    full = yaml.safe_load(dump_params(Params()))
    del full["detection"], full["report"]
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(UserError, match=r"params.yaml: missing key\(s\) detection, report \("):
        load_params(path)
    # a list dvc.yaml loops over must be in the file too: the schema's default would not reach DVC
    full = yaml.safe_load(dump_params(Params()))
    del full["detection"]["mask_rcnn"], full["convert"]["torchvision"]
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(UserError, match=r"params.yaml: missing key\(s\) detection.mask_rcnn, convert.torchvision \("):
        load_params(path)


def _with_protocol(protocol: str, backbones: tuple[str, str] = ("resnet18", "sge_resnet18"), **convert) -> dict:
    raw = Params().model_dump(mode="json")
    raw["models"] = raw["detection"]["faster_rcnn"] = raw["convert"]["trained"] = list(backbones)
    raw["detection"]["retinanet"] = []
    raw["train_det"]["protocol"] = protocol
    raw["convert"].update(convert)
    return raw


def test_protocol_is_named_and_defaults_to_detectron2():
    assert Params().train_det.protocol == "detectron2"
    with pytest.raises(UserError, match=r"^params.yaml: train_det.protocol: input should be 'detectron2', 'authors' or 'controlled'"):
        validate_params(_with_protocol("mmdetection"))
    # the paper profile trains its own backbones with one recipe and leaves the warmup to the YAML
    paper = profile_params("paper", REPO / PROFILES_DIR)
    assert paper.train_det.protocol == "controlled" and paper.train_det.warmup_iters is None


def test_authors_protocol_needs_torchvision_plain_and_file_attention_backbones():
    paper_backbones = ("resnet50", "sge_resnet50")  # torchvision has ImageNet weights for these
    with pytest.raises(UserError) as error:
        validate_params(_with_protocol("authors", paper_backbones))
    message = str(error.value)
    assert "\n" not in message
    assert message == ("params.yaml: train_det.protocol authors starts plain backbones from torchvision's weights, "
                       "attention backbones from the authors' checkpoint file: convert source of 'resnet50' is "
                       "'trained', expected 'torchvision' (list it in convert.torchvision)")
    with pytest.raises(UserError, match="convert source of 'sge_resnet50' is 'trained', expected 'file' "
                                        r"\(list it in convert.files\)"):
        validate_params(_with_protocol("authors", paper_backbones, trained=["sge_resnet50"], torchvision=["resnet50"]))
    params = validate_params(_with_protocol(
        "authors", paper_backbones, trained=[], torchvision=["resnet50"], files={"sge_resnet50": "sge.pth.tar"}))
    assert params.convert_source("resnet50") == "torchvision" and params.convert_source("sge_resnet50") == "file"


def test_controlled_protocol_needs_both_backbones_trained():
    assert validate_params(_with_protocol("controlled")).convert_source("sge_resnet18") == "trained"
    with pytest.raises(UserError, match=r"controlled starts both backbones from our own training runs: convert "
                                        r"source of 'resnet50' is 'torchvision', expected 'trained'"):
        validate_params(_with_protocol("controlled", ("resnet50", "sge_resnet50"), trained=["sge_resnet50"],
                                       torchvision=["resnet50"]))
    # detectron2 takes any source
    assert validate_params(_with_protocol("detectron2", ("resnet50", "sge_resnet50"), trained=["sge_resnet50"],
                                          torchvision=["resnet50"])).convert_source("resnet50") == "torchvision"


def test_set_values_reads_dvc_style_assignments_as_params_yaml_does():
    raw = yaml.safe_load(dump_params(Params()))
    changed = set_values(raw, ["model.groups=2", "seeds=[0, 1]", "train_cls.amp=fp32", "train_cls.lr=1e-05",
                               "detection.faster_rcnn=[sge_resnet18]", "detection.retinanet=[]",
                               "convert.trained=[sge_resnet18]", "models=[sge_resnet18]"])
    params = validate_params(changed)
    assert params.model.groups == 2 and params.seeds == [0, 1] and params.train_cls.lr == 1e-05
    assert params.pairs() == [("faster_rcnn", "sge_resnet18")] and params.detectors == ["faster_rcnn"]
    assert raw["model"]["groups"] == Params().model.groups   # the input is left as it was


@pytest.mark.parametrize("assignment, message", [
    ("model.groups", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("model..groups=3", "expected KEY=VALUE"),
    ("seeds=[0, 1", "the value is not valid YAML"),
    ("model.groups.x=1", "model.groups is a value, not a section"),
])
def test_set_values_names_a_malformed_assignment(assignment, message):
    with pytest.raises(UserError, match=message):
        set_values(yaml.safe_load(dump_params(Params())), [assignment])


def test_each_detector_lists_its_backbones_and_an_empty_list_runs_none():
    raw = Params().model_dump(mode="json")
    crossed = validate_params(raw)
    assert crossed.pairs() == [("faster_rcnn", "resnet18"), ("faster_rcnn", "sge_resnet18"),
                               ("retinanet", "resnet18"), ("retinanet", "sge_resnet18")]
    raw["detection"].update(faster_rcnn=["resnet18"], retinanet=["sge_resnet18"])
    raw["seeds"] = [0, 1]
    paired = validate_params(raw)
    assert paired.pairs() == [("faster_rcnn", "resnet18"), ("retinanet", "sge_resnet18")]
    assert paired.detectors == ["faster_rcnn", "retinanet"]
    assert paired.detection_backbones == ["resnet18", "sge_resnet18"]
    paired.require_pair("faster_rcnn", "resnet18")
    with pytest.raises(UserError, match=r"^params.yaml: detection.retinanet: 'resnet18' is not listed "
                                        r"\(listed: sge_resnet18\)$"):
        paired.require_pair("retinanet", "resnet18")
    with pytest.raises(UserError, match=r"detection.mask_rcnn: 'resnet18' is not listed \(listed: none\)"):
        paired.require_pair("mask_rcnn", "resnet18")
    with pytest.raises(UserError, match=r"detection: unknown detector 'yolo' \(allowed: faster_rcnn, mask_rcnn, "):
        paired.require_pair("yolo", "resnet18")
    # what params.yaml holds is what the user wrote: nothing in it is derived from the rest
    assert yaml.safe_load(dump_params(paired)) == paired.model_dump(mode="json")


# The keys a CPU and a minute budget force on the paper profile; everything else stays the paper's.
REHEARSAL_KEYS = {
    "data.classification.source", "data.classification.source_path", "data.classification.image_size",
    "data.classification.train_per_class", "data.classification.val_per_class",
    "data.classification.max_train_images", "data.classification.max_val_images",
    "data.detection.source", "data.detection.source_path", "data.detection.image_size",
    "data.detection.num_train", "data.detection.num_val",
    "train_cls.epochs", "train_cls.milestones", "train_cls.batch_size", "train_cls.device",
    "eval_cls.device", "train_det.max_iter", "train_det.ims_per_batch", "train_det.device", "eval_det.device",
    "detection.faster_rcnn", "detection.mask_rcnn", "detection.cascade_rcnn", "detection.retinanet",
    "launch.nproc_per_node",
}


def leaves(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# The same for the released profile, plus the detection protocol this rehearsal covers.
REHEARSAL_RELEASED_KEYS = {
    "data.classification.source", "data.classification.source_path", "data.classification.image_size",
    "data.classification.train_per_class", "data.classification.val_per_class",
    "data.classification.max_val_images",
    "data.detection.source", "data.detection.source_path", "data.detection.image_size",
    "data.detection.num_train", "data.detection.num_val",
    "eval_cls.device", "train_det.protocol", "train_det.max_iter", "train_det.ims_per_batch", "train_det.device",
    "eval_det.device",
}


@pytest.mark.parametrize("name, base, allowed", [("rehearsal", "paper", REHEARSAL_KEYS),
                                                 ("rehearsal_released", "released", REHEARSAL_RELEASED_KEYS)])
def test_a_rehearsal_is_its_profile_with_only_what_a_cpu_forces(name, base, allowed):
    from sge_repro.params_yaml import read_yaml

    overlay = read_yaml(REPO / PROFILES_DIR / f"{name}.yaml")
    assert overlay.pop("extends") == base
    assert set(leaves(overlay)) == allowed
    original = leaves(profile_params(base, REPO / PROFILES_DIR).model_dump(mode="json"))
    rehearsal = leaves(profile_params(name, REPO / PROFILES_DIR).model_dump(mode="json"))
    assert set(rehearsal) - allowed == set(original) - allowed
    assert {key for key in original if key not in allowed and rehearsal[key] != original[key]} == {"profile"}


def test_the_rehearsal_runs_every_detector_and_backbone_of_the_paper_on_two_processes():
    params = profile_params("rehearsal", REPO / PROFILES_DIR)
    assert {detector for detector, _ in params.pairs()} == set(params.detectors) == {
        "faster_rcnn", "mask_rcnn", "cascade_rcnn", "retinanet"}
    assert {backbone for _, backbone in params.pairs()} == set(params.detection_backbones) == set(params.models)
    assert params.train_cls.batch_size > 1 and params.train_det.ims_per_batch >= params.launch.nproc_per_node == 2


def test_a_profile_extends_another_and_a_cycle_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("train_cls: {epochs: 3, lr: 0.2}\nseeds: [0, 1]\n")
    (tmp_path / "child.yaml").write_text("extends: base\ntrain_cls: {epochs: 5}\n")
    child = profile_params("child", tmp_path)
    assert (child.profile, child.train_cls.epochs, child.train_cls.lr, child.seeds) == ("child", 5, 0.2, [0, 1])
    (tmp_path / "base.yaml").write_text("extends: child\n")
    with pytest.raises(UserError, match=r"base.yaml: extends: expected the name of another profile that does not "
                                        r"extend this one, got 'child'"):
        profile_params("child", tmp_path)
    (tmp_path / "base.yaml").write_text("extends: nowhere\n")
    with pytest.raises(UserError, match="unknown profile 'nowhere'"):
        profile_params("child", tmp_path)
