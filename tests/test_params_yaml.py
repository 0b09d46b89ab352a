"""params.yaml as DVC writes it: `dvc exp run -S key=value` rewrites the file with ruamel.yaml
(YAML 1.2), which drops quotes YAML 1.1 would need. No value may change meaning on the way."""

import io
import typing

import pytest
from pydantic import BaseModel
from ruamel.yaml import YAML

from sge_repro.errors import UserError
from sge_repro.params import Params, validate_params
from sge_repro.params_yaml import available_profiles, profile_params, read_yaml


def dvc_dump(data: dict) -> str:
    """What DVC's writer (dvc.utils.serialize._yaml: ruamel round-trip, block style) makes of it."""
    writer = YAML()
    writer.default_flow_style = False
    stream = io.StringIO()
    writer.dump(data, stream)
    return stream.getvalue()


def reread(tmp_path, params: Params) -> Params:
    path = tmp_path / "params.yaml"
    path.write_text(dvc_dump(params.model_dump(mode="json")))
    return validate_params(read_yaml(path), str(path))


def literal_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, tuple]]:
    """(dotted key, allowed values) of every Literal-typed param, in every section."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += literal_fields(annotation, f"{prefix}{name}.")
            continue
        for candidate in (annotation, *typing.get_args(annotation)):
            if typing.get_origin(candidate) is typing.Literal:
                found.append((prefix + name, typing.get_args(candidate)))
    return found


@pytest.mark.parametrize("profile", available_profiles())
def test_every_profile_survives_dvcs_writer(tmp_path, profile):
    params = profile_params(profile)
    assert reread(tmp_path, params) == params


def with_choice(key: str, choice: str) -> dict:
    """Default params with `key` set to `choice`, plus what the choice needs to be valid (the
    authors' protocol takes resnet50 from torchvision and sge_resnet50 from a file)."""
    data = Params().model_dump(mode="json")
    if key == "train_det.protocol" and choice == "authors":
        data["detection"].update(faster_rcnn=["resnet50", "sge_resnet50"], retinanet=[])
        data["convert"].update(trained=[], torchvision=["resnet50"], files={"sge_resnet50": "weights/sge_resnet50.pth"})
    target = data
    for part in key.split(".")[:-1]:
        target = target[part]
    target[key.split(".")[-1]] = choice
    return data


def test_every_choice_of_every_literal_param_survives_dvcs_writer(tmp_path):
    fields = literal_fields(Params)
    assert ("train_cls.amp", ("fp32", "bf16", "fp16")) in fields and len(fields) >= 7
    base = Params().model_dump(mode="json")
    for key, choices in fields:
        for choice in choices:
            params = validate_params(with_choice(key, choice))
            assert reread(tmp_path, params) == params, (key, choice)
    assert base == Params().model_dump(mode="json")


def test_floats_dvc_writes_in_exponent_form_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    data = Params().model_dump(mode="json")
    data["train_cls"].update(weight_decay=1e-05, lr=1e-3)
    path.write_text(dvc_dump(data))
    assert "weight_decay: 1e-05" in path.read_text()  # the form YAML 1.1 reads as a string
    params = validate_params(read_yaml(path))
    assert (params.train_cls.weight_decay, params.train_cls.lr) == (1e-05, 1e-3)


@pytest.mark.parametrize("written", ["amp: off", "amp: 'off'", "amp: false"])
def test_the_old_amp_value_names_the_new_one(tmp_path, written):
    path = tmp_path / "params.yaml"
    text = dvc_dump(Params().model_dump(mode="json")).replace("amp: fp32", written, 1)
    path.write_text(text)
    with pytest.raises(UserError, match=r"train_cls\.amp: got .*'off' is now called fp32.*expected fp32, bf16 or fp16"):
        validate_params(read_yaml(path), str(path))


def test_checkpoints_written_with_amp_off_keep_their_fingerprint():
    """A run trained before the rename resumes: fp32 hashes as 'off' did (the pre-rename formula)."""
    import hashlib
    import json

    from sge_repro.classification.checkpoint import NOT_IN_FINGERPRINT, recipe_fingerprint, training_recipe
    from sge_repro.params_sections import TrainClsParams

    recipe = training_recipe(TrainClsParams(), "sge_resnet18", {"width": 8, "groups": 4}, ["a", "b"], 0, 1)
    assert recipe["amp"] == "fp32"
    before_rename = {key: value for key, value in {**recipe, "amp": "off"}.items() if key not in NOT_IN_FINGERPRINT}
    assert recipe_fingerprint(recipe) == hashlib.sha256(
        json.dumps(before_rename, sort_keys=True).encode()).hexdigest()[:16]
    assert recipe_fingerprint({**recipe, "amp": "bf16"}) != recipe_fingerprint(recipe)
