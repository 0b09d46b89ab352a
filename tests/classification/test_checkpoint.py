"""The training recipe a resume must match, and what resume accepts."""

import json

import pytest
import torch

from sge_repro.atomic import torch_save
from sge_repro.classification.checkpoint import TrainingState, recipe_fingerprint, resume, training_recipe
from sge_repro.classification.schedule import lr_scheduler
from sge_repro.errors import UserError
from sge_repro.params_sections import TrainClsParams


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
                      {"seed": 1}):
        prints.add(fingerprint(**run_field))
    assert len(prints) == 1 + len(changes) + 4


def test_workers_device_and_world_size_do_not_change_the_fingerprint():
    # Results do not depend on the loader workers (test_train.py); a run may resume elsewhere; the
    # batch is global, so another process count trains the same recipe (test_resume_world_size.py).
    assert fingerprint(TrainClsParams(workers=4, device="cuda")) == fingerprint()
    assert fingerprint(world_size=8) == fingerprint()


def new_state() -> TrainingState:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingState(model, optimizer, lr_scheduler(optimizer, 1, TrainClsParams()),
                         torch.amp.GradScaler("cpu", enabled=False))


def write_training_checkpoint(path, recipe: dict, epoch: int = 3) -> bytes:
    state = new_state()
    torch_save({"state_dict": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(), "epoch": epoch, "history": [], "best": {},
                "recipe": recipe, "recipe_fingerprint": recipe_fingerprint(recipe)}, path)
    return path.read_bytes()


def test_a_checkpoint_of_another_recipe_is_refused_naming_each_key(tmp_path):
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    saved = training_recipe(TrainClsParams(lr=0.1, epochs=100), "resnet18", {"width": 64, "groups": 64},
                            ["a", "b"], 0, 8)
    before = write_training_checkpoint(last, saved)
    changed = training_recipe(TrainClsParams(lr=0.05, epochs=100, workers=3), "resnet18",
                              {"width": 32, "groups": 64}, ["a", "b", "c"], 0, 4)
    with pytest.raises(UserError) as caught:
        resume(last, new_state(), changed)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{last}: epoch 3 checkpoint of another recipe: train_cls.lr 0.1 -> 0.05; model.width 64 -> 32; "
        "classes 2 classes -> 3 classes (+c). To resume it, restore those values in params.yaml; "
        f"to start over, move or delete {last.parent}")
    assert last.read_bytes() == before  # nothing thrown away


def test_sge_knobs_are_compared_only_for_a_model_with_sge(tmp_path):
    """A G sweep (model.groups, model.sge_impl) does not retrain the plain baseline: those knobs
    are not read by a ResNet without SGE; an SGE model's run is of another recipe."""
    for model in ("resnet18", "se_resnet18"):
        path = tmp_path / model / "last.pt"
        path.parent.mkdir()
        write_training_checkpoint(path, training_recipe(TrainClsParams(), model, {"width": 8, "groups": 64,
                                                                                  "sge_impl": "fast"}, ["a"], 0, 1))
        state = new_state()
        other = training_recipe(TrainClsParams(), model, {"width": 8, "groups": 8, "sge_impl": "reference"}, ["a"], 0, 1)
        assert resume(path, state, other) is True and state.epoch == 3
    path = tmp_path / "sge" / "last.pt"
    path.parent.mkdir()
    write_training_checkpoint(path, training_recipe(TrainClsParams(), "sge_resnet18", {"width": 8, "groups": 64},
                                                    ["a"], 0, 1))
    with pytest.raises(UserError, match=r"checkpoint of another recipe: model\.groups 64 -> 8\. "):
        resume(path, new_state(), training_recipe(TrainClsParams(), "sge_resnet18", {"width": 8, "groups": 8},
                                                  ["a"], 0, 1))


def test_the_same_recipe_on_another_process_count_resumes(tmp_path):
    recipe = training_recipe(TrainClsParams(batch_size=64), "resnet18", {"width": 8}, ["a", "b"], 0, 8)
    write_training_checkpoint(tmp_path / "last.pt", recipe, epoch=5)
    state = new_state()
    fewer = training_recipe(TrainClsParams(batch_size=64, workers=2, deterministic=False), "resnet18",
                            {"width": 8}, ["a", "b"], 0, 4)
    assert resume(tmp_path / "last.pt", state, fewer) is True and state.epoch == 5


def test_resume_rejects_a_file_this_engine_did_not_write(tmp_path):
    state = new_state()
    model = state.model
    recipe = training_recipe(TrainClsParams(), "resnet18", {}, ["a", "b"], 0, 1)
    assert resume(tmp_path / "last.pt", state, recipe) is False  # nothing to resume
    torch_save({"state_dict": model.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"last.pt: not a training checkpoint of this engine"):
        resume(tmp_path / "last.pt", state, recipe)


def test_a_checkpoint_from_before_the_amp_rename_and_the_decoder_key_resumes(tmp_path):
    # written when amp 'off' was fp32's name and before train_cls.decoder existed (their input
    # pipeline was the PIL one): the same recipe as fp32 + pil today, another one with torchvision
    current = training_recipe(TrainClsParams(amp="fp32", decoder="pil"), "resnet18", {"width": 8}, ["a", "b"], 0, 1)
    old = {key: value for key, value in current.items() if key != "decoder"} | {"amp": "off"}
    write_training_checkpoint(tmp_path / "last.pt", old, epoch=2)
    state = new_state()
    assert resume(tmp_path / "last.pt", state, current) and state.epoch == 2
    with pytest.raises(UserError, match=r"epoch 2 checkpoint of another recipe: train_cls.decoder pil -> torchvision\."):
        resume(tmp_path / "last.pt", new_state(), {**current, "decoder": "torchvision"})


def test_sge_impl_is_recorded_but_not_compared(tmp_path):
    """The SGE implementations compute one function (tests/models/test_sge*.py): like `device`, a
    run trained with one resumes with another; a change of the recipe itself is still refused."""
    from sge_repro.superseded import RunOfOtherParams

    def recipe(sge_impl, weight_decay=1e-4):
        return training_recipe(TrainClsParams(weight_decay=weight_decay), "sge_resnet18",
                               {"width": 8, "groups": 4, "sge_impl": sge_impl}, ["a", "b"], 0, 1)

    assert recipe_fingerprint(recipe("fast")) == recipe_fingerprint(recipe("reference")) \
        == recipe_fingerprint(recipe("triton"))
    write_training_checkpoint(tmp_path / "last.pt", recipe("fast"), epoch=4)
    for impl in ("reference", "triton"):
        state = new_state()
        assert resume(tmp_path / "last.pt", state, recipe(impl)) is True and state.epoch == 4
    with pytest.raises(RunOfOtherParams, match=r"another recipe: train_cls\.weight_decay 0\.0001 -> 0\.001\. "):
        resume(tmp_path / "last.pt", new_state(), recipe("reference", weight_decay=1e-3))


def test_a_fingerprint_only_checkpoint_hashed_with_sge_impl_resumes_under_any_impl(tmp_path):
    """Checkpoints that stored no recipe hashed model.sge_impl with the rest (the formula of then)."""
    import hashlib
    import json

    from sge_repro.classification.checkpoint import NOT_IN_FINGERPRINT
    from sge_repro.superseded import RunOfOtherParams

    recipe = training_recipe(TrainClsParams(), "sge_resnet18", {"width": 8, "groups": 4, "sge_impl": "fast"},
                             ["a", "b"], 0, 1)
    then = {key: value for key, value in {**recipe, "amp": "off"}.items() if key not in NOT_IN_FINGERPRINT}
    state = new_state()
    torch_save({"state_dict": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(), "epoch": 2, "history": [], "best": {},
                "recipe_fingerprint": hashlib.sha256(json.dumps(then, sort_keys=True).encode()).hexdigest()[:16]},
               tmp_path / "last.pt")
    for impl in ("fast", "reference"):
        other = {**recipe, "model_kwargs": {**recipe["model_kwargs"], "sge_impl": impl}}
        assert resume(tmp_path / "last.pt", new_state(), other) is True
    with pytest.raises(RunOfOtherParams, match=r"\(recipe not stored\)"):
        resume(tmp_path / "last.pt", new_state(), {**recipe, "lr": 0.5})


SGE_VARIANTS = [{"sge_weight_init": 0.5}, {"sge_bias_init": 0.0}, {"sge_normalize": False}]


def test_the_sge_ablation_knobs_at_the_papers_values_keep_every_fingerprint():
    """params.yaml's model section hands these knobs to every run: at the paper's values a recipe
    and its fingerprint are those written before the knobs existed (hashes computed with the
    code of then)."""
    from sge_repro.params_sections import ModelParams

    kwargs = ModelParams(width=8, groups=4).model_kwargs()
    assert {"sge_weight_init", "sge_bias_init", "sge_normalize"} <= set(kwargs)
    before = {"resnet18": "9f9e027529079355", "sge_resnet18": "73e4c9930f651d51", "se_resnet18": "2d1953d98a0c1f92"}
    for model, expected in before.items():
        recipe = training_recipe(TrainClsParams(), model, kwargs, ["a", "b"], 0, 1)
        assert recipe["model_kwargs"] == {"width": 8, "groups": 4, "sge_impl": "fast"}
        assert fingerprint(model=model, model_kwargs=kwargs) == fingerprint(
            model=model, model_kwargs={"width": 8, "groups": 4, "sge_impl": "fast"}) == expected


@pytest.mark.parametrize("change", SGE_VARIANTS)
def test_an_sge_ablation_knob_is_another_recipe_of_an_sge_model_only(change, tmp_path):
    base = {"width": 8, "groups": 4, "sge_impl": "fast"}
    for model in ("resnet18", "se_resnet18"):
        assert fingerprint(model=model, model_kwargs={**base, **change}) == fingerprint(model=model, model_kwargs=base)
        path = tmp_path / model / "last.pt"
        path.parent.mkdir()
        write_training_checkpoint(path, training_recipe(TrainClsParams(), model, base, ["a"], 0, 1))
        state = new_state()
        assert resume(path, state, training_recipe(TrainClsParams(), model, {**base, **change}, ["a"], 0, 1))
    assert fingerprint(model="sge_resnet18", model_kwargs={**base, **change}) != \
        fingerprint(model="sge_resnet18", model_kwargs=base)
    (key, value), = change.items()
    paper = {"sge_weight_init": 0.0, "sge_bias_init": 1.0, "sge_normalize": True}[key]
    path = tmp_path / "sge" / "last.pt"
    path.parent.mkdir()
    write_training_checkpoint(path, training_recipe(TrainClsParams(), "sge_resnet18", base, ["a"], 0, 1))
    old, new = json.dumps(paper), json.dumps(value)  # named as params.yaml spells them
    with pytest.raises(UserError, match=rf"checkpoint of another recipe: model\.{key} {old} -> {new}\. "):
        resume(path, new_state(), training_recipe(TrainClsParams(), "sge_resnet18", {**base, **change}, ["a"], 0, 1))
