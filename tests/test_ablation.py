"""The ablation set and the verdicts on the authors' conclusions (the DVC side: tests/integration/test_ablation.py)."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from sge_repro import ablation
from sge_repro.errors import UserError
from sge_repro.params import PROFILES_DIR, validate_params
from sge_repro.params_yaml import dump_params, profile_params, set_values

REPO = Path(__file__).resolve().parents[1]


def params(name: str = "embedded", **model):
    base = profile_params(name, REPO / PROFILES_DIR)
    return base.model_copy(update={"model": base.model.model_copy(update=model)}) if model else base


def test_the_sweep_goes_up_to_what_every_sge_block_s_channels_allow():
    embedded = ablation.plan(params())  # sge_resnet18 at width 32: channels 32, 64, 128, 256
    assert embedded.sweep == [1, 2, 4, 8, 16, 32] and embedded.model == "sge_resnet18"
    paper = ablation.plan(params("paper"))  # sge_resnet50 at width 64: 256 ... 2048 (bottleneck x4)
    assert paper.sweep == [1, 2, 4, 8, 16, 32, 64, 128, 256] and paper.default_groups == 64
    names = [v.name for v in paper.variants]
    assert names == ["resnet50-plain", *[f"sge_resnet50-g{g}" for g in paper.sweep],
                     "sge_resnet50-g64-gamma1", "sge_resnet50-g64-nonorm"]
    assert ablation.plan(params(width=24)).sweep == [1, 2, 4, 8]  # 24 = 8 x 3


def test_params_yaml_s_g_is_always_in_the_sweep_and_every_knob_is_spelt_out():
    plan = ablation.plan(params(groups=8), groups=[2, 32])
    assert plan.sweep == [2, 8, 32]
    gamma1 = plan.variant(8, 1.0)
    assert gamma1.settings() == ["models=[sge_resnet18]", "detection.faster_rcnn=[sge_resnet18]", "detection.mask_rcnn=[]",
                                 "detection.cascade_rcnn=[]", "detection.retinanet=[]", "convert.trained=[sge_resnet18]",
                                 "convert.files={}", "convert.torchvision=[]", "convert.torchvision_weights={}",
                                 "model.groups=8", "model.sge_weight_init=1.0", "model.sge_bias_init=1.0",
                                 "model.sge_normalize=true"]
    assert plan.variant(8, normalize=False).settings()[-1] == "model.sge_normalize=false"
    assert plan.variants[0].settings() == ["models=[resnet18]", "detection.faster_rcnn=[resnet18]",
                                           "detection.mask_rcnn=[]", "detection.cascade_rcnn=[]",
                                           "detection.retinanet=[]", "convert.trained=[resnet18]", "convert.files={}",
                                           "convert.torchvision=[]", "convert.torchvision_weights={}"]


@pytest.mark.parametrize("profile", ["embedded", "rehearsal"])
def test_each_experiment_s_settings_give_valid_params_with_its_one_model_as_the_one_backbone(profile):
    """The workspace's detection and convert lists name other backbones (rehearsal: four detectors,
    five backbones): the -S values replace every one of them, or the experiment's params.yaml is invalid."""
    workspace = yaml.safe_load(dump_params(params(profile)))
    for variant in ablation.plan(params(profile)).variants:
        ran = validate_params(set_values(workspace, variant.settings()), variant.name)
        assert ran.models == [variant.model] and ran.pairs() == [("faster_rcnn", variant.model)]
        assert ran.convert_source(variant.model) == "trained" and ran.detection_backbones == [variant.model]


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": [3]}, r"--groups 3: expected a G that divides every SGE block's channels of sge_resnet18 at width 32 "
                      r"\(32, 64, 128, 256\)"),
    ({"model": "resnet18"}, r"--model resnet18: expected an SGE model"),
    ({"model": "sge_resnet7"}, r"unknown name 'sge_resnet7'"),
])
def test_a_bad_sweep_is_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        ablation.plan(params(), **kwargs)


def test_no_sge_model_or_released_checkpoints_are_named():
    with pytest.raises(UserError, match=r"params.yaml: models: no SGE model to ablate"):
        ablation.plan(params().model_copy(update={"models": ["resnet18"]}))
    with pytest.raises(UserError, match=r"params.yaml: released: the ablations train their classifiers"):
        ablation.plan(params("released"))


def rows_with(plan, accuracy: dict[str, float], images: int = 2000) -> dict[str, ablation.Row]:
    """Rows whose models get a given share of `images` right, nested (a better model is right on
    every image a worse one is right on), so that any difference of 1 point or more is significant."""
    rows = {}
    for variant in plan.variants:
        share = accuracy.get(variant.name)
        row = ablation.Row(variant)
        if share is not None:
            correct = (np.arange(images) < round(share * images)).astype(np.float64)
            row.correct, row.top1 = [correct], 100.0 * correct.mean()
        rows[variant.name] = row
    return rows


@pytest.mark.parametrize("accuracy, expected", [
    ({1: 0.60, 2: 0.70, 4: 0.65}, ablation.HELD),
    ({1: 0.70, 2: 0.60, 4: 0.65}, ablation.NOT_HELD),
    ({1: 0.60, 2: 0.70, 4: 0.70}, ablation.NOT_SIGNIFICANT),  # the best and an end tie
    ({1: 0.60, 2: 0.70}, ablation.UNDETERMINED),  # G = 4 not run (yet)
])
def test_a_middle_g_is_best_only_when_it_beats_both_ends(accuracy, expected):
    plan = ablation.plan(params("smoke"), groups=[1, 2])  # smoke: G = 4, so the sweep is 1, 2, 4
    rows = rows_with(plan, {plan.variant(g).name: share for g, share in accuracy.items()})
    claim = ablation._middle_g_claim(plan, rows, params("smoke"))
    assert claim["verdict"] == expected, claim


def test_two_g_are_not_a_sweep():
    plan = ablation.plan(params("smoke"), groups=[4])
    claim = ablation._middle_g_claim(plan, rows_with(plan, {plan.variant(4).name: 0.5}), params("smoke"))
    assert claim["verdict"] == ablation.UNDETERMINED and "three or more" in claim["comparison"]


@pytest.mark.parametrize("gamma1, nonorm, verdicts", [
    (0.60, 0.60, (ablation.HELD, ablation.HELD)),
    (0.80, 0.80, (ablation.NOT_HELD, ablation.NOT_HELD)),
    (0.70, 0.70, (ablation.NOT_SIGNIFICANT, ablation.NOT_SIGNIFICANT)),
])
def test_the_table_marks_gamma_and_normalisation_and_the_gain_over_plain(gamma1, nonorm, verdicts):
    smoke = params("smoke")
    plan = ablation.plan(smoke, groups=[1, 2])
    accuracy = {"resnet18-plain": 0.65, plan.variant(1).name: 0.6, plan.variant(2).name: 0.7,
                plan.variant(4).name: 0.7, plan.variant(4, 1.0).name: gamma1, plan.variant(4, normalize=False).name: nonorm}
    rows = rows_with(plan, accuracy)
    result = ablation.summarise(plan, rows, smoke)
    claims = {claim["claim"]: claim["verdict"] for claim in result["claims"]}
    assert (claims["gamma initialised to 0 beats 1"], claims["the normalisation is needed"]) == verdicts
    by_name = {row["experiment"]: row for row in result["rows"]}
    assert by_name["resnet18-plain"]["gain"] is None
    for name, share in accuracy.items():
        assert by_name[name]["top1"] == pytest.approx(100 * share)
        if name != "resnet18-plain":
            assert by_name[name]["gain"]["gain"] == pytest.approx(100 * (share - 0.65))
        low, high = by_name[name]["top1_ci"]
        assert low < 100 * share < high


def test_the_report_files_hold_the_table(tmp_path):
    smoke = params("smoke")
    plan = ablation.plan(smoke, groups=[1, 2])
    result = ablation.summarise(plan, rows_with(plan, {plan.variant(4).name: 0.5}), smoke)
    json_path, md_path = ablation.write(result, tmp_path)
    text = md_path.read_text()
    assert "| sge_resnet18-g4 | G = 4 | 50.00 | [" in text and "| resnet18-plain | plain | - | - | - | - |" in text
    assert "| the normalisation is needed | G = 4: with minus without | - | - | undetermined |" in text
    assert json_path.name == "ablation.json" and not list(tmp_path.glob("reports/.*"))
