"""The training recipe a resume must match, and what resume accepts."""

import pytest
import torch

from sge_repro.atomic import torch_save
from sge_repro.classification.checkpoint import TrainingState, recipe_fingerprint, resume, training_recipe
from sge_repro.classification.schedule import lr_scheduler
from sge_repro.errors import UserError
from sge_repro.params import TrainClsParams


def fingerprint(params=None, model="resnet18", model_kwargs=None, classes=("a", "b"), seed=0, world_size=1) -> str:
    params = TrainClsParams() if params is None else params
    kwargs = {"width": 8} if model_kwargs is None else model_kwargs
    return recipe_fingerprint(training_recipe(params, model, kwargs, list(classes), seed, world_size))


def test_everything_that_changes_the_weights_changes_the_fingerprint():
    prints = {fingerprint()}
    changes = [{"amp": "bf16"}, {"amp": "fp16"}, {"channels_last": True}, {"compile": True}, {"sync_bn": True},
               {"epochs": 3}, {"lr": 0.1}, {"min_crop_scale": 0.5}, {"grad_clip_norm": 1.0},
               {"milestones": [5]}, {"no_weight_decay_on_bn_bias": True}]
    for change in changes:
        prints.add(fingerprint(TrainClsParams(**change)))
    for run_field in ({"model": "sge_resnet18"}, {"model_kwargs": {"width": 16}}, {"classes": ("a", "c")},
                      {"seed": 1}, {"world_size": 2}):
        prints.add(fingerprint(**run_field))
    assert len(prints) == 1 + len(changes) + 5


def test_workers_and_device_do_not_change_the_fingerprint():
    # Results do not depend on the loader workers (test_train.py); a run may resume elsewhere.
    assert fingerprint(TrainClsParams(workers=4, device="cuda")) == fingerprint()


def test_resume_rejects_a_file_this_engine_did_not_write(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, lr_scheduler(optimizer, 1, TrainClsParams()),
                          torch.amp.GradScaler("cpu", enabled=False))
    recipe = training_recipe(TrainClsParams(), "resnet18", {}, ["a", "b"], 0, 1)
    assert resume(tmp_path / "last.pt", state, recipe) is False  # nothing to resume
    torch_save({"state_dict": model.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"last.pt: not a training checkpoint of this engine"):
        resume(tmp_path / "last.pt", state, recipe)
