"""Checkpoint formats: ours, torchvision state dicts, the authors' release files; strict loading."""

import pytest
import torch
import torchvision

from sge_repro.atomic import torch_save
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.weight_files import (
    CLASSIFIER_FORMAT, load_into, make_classifier_checkpoint, read_state_dict,
)

SMALL_INPUT = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _randomize_sge(model):
    # Non-trivial gamma/beta so a load that skipped them would change the logits.
    generator = torch.Generator().manual_seed(7)
    for name, parameter in model.named_parameters():
        if ".sge." in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_official_release_round_trip(tmp_path):
    source = create_model("sge_resnet50", seed=1)
    _randomize_sge(source)
    wrapped = torch.nn.DataParallel(source)  # the authors saved a DataParallel model
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "sge_resnet50.pth.tar"
    torch.save({"epoch": 100, "state_dict": wrapped.state_dict(), "acc": 77.584, "best_acc": 77.584,
                "optimizer": optimizer.state_dict()}, path)
    assert next(iter(torch.load(path, weights_only=True)["state_dict"])).startswith("module.")

    loaded = create_model("sge_resnet50", checkpoint=path, seed=2).eval()
    source.eval()
    with torch.no_grad():
        assert torch.equal(loaded(SMALL_INPUT), source(SMALL_INPUT))
    assert read_state_dict(path)[1] == "official"


def test_torchvision_state_dict_loads_into_resnet50(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50-tv.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model("resnet50", checkpoint=path, seed=4).eval()
    with torch.no_grad():
        assert torch.equal(ours(SMALL_INPUT), reference(SMALL_INPUT))
    assert read_state_dict(path)[1] == "torchvision"


def test_our_format_round_trip_with_training_state(tmp_path):
    model = create_model("sge_resnet18", num_classes=10, groups=8, width=16, seed=5)
    _randomize_sge(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = {"num_classes": 10, "groups": 8, "width": 16}
    checkpoint = make_classifier_checkpoint("sge_resnet18", kwargs, model, epoch=3, optimizer=optimizer.state_dict())
    assert checkpoint["format"] == CLASSIFIER_FORMAT and checkpoint["model_kwargs"] == kwargs
    path = torch_save(checkpoint, tmp_path / "best.pt")
    loaded = create_model("sge_resnet18", num_classes=10, groups=8, width=16, checkpoint=path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(SMALL_INPUT), model(SMALL_INPUT))
    assert read_state_dict(path)[1] == CLASSIFIER_FORMAT


def test_our_format_rejects_other_model_or_kwargs(tmp_path):
    model = create_model("sge_resnet18", num_classes=10, groups=8, width=16, seed=5)
    path = torch_save(make_classifier_checkpoint("sge_resnet18", {"num_classes": 10, "groups": 8, "width": 16}, model),
                      tmp_path / "best.pt")
    with pytest.raises(UserError, match="holds model 'sge_resnet18', expected 'resnet18'"):
        create_model("resnet18", num_classes=10, width=16, checkpoint=path)
    with pytest.raises(UserError, match="model_kwargs.groups=8, expected 4"):
        create_model("sge_resnet18", num_classes=10, groups=4, width=16, checkpoint=path)


def test_a_model_without_sge_loads_whatever_groups_it_was_saved_with(tmp_path):
    """model.groups is not read by a ResNet without SGE: its checkpoint (saved while G was 8)
    loads under any G; its width still has to match."""
    model = create_model("resnet18", num_classes=10, groups=8, width=16, seed=5)
    path = torch_save(make_classifier_checkpoint("resnet18", {"num_classes": 10, "groups": 8, "width": 16}, model),
                      tmp_path / "best.pt")
    loaded = create_model("resnet18", num_classes=10, groups=2, width=16, checkpoint=path)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    with pytest.raises(UserError, match="model_kwargs.width=16, expected 32"):
        create_model("resnet18", num_classes=10, groups=2, width=32, checkpoint=path)


def test_mismatch_lists_keys_and_format_and_loads_nothing(tmp_path):
    plain = create_model("resnet50", seed=6)
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    target = create_model("sge_resnet50", seed=7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_into(target, path)
    message = str(error.value)
    assert "torchvision" in message and "32 missing keys" in message and "layer1.0.sge.weight" in message
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # never partial


def test_unexpected_and_shape_mismatch_reported(tmp_path):
    source = create_model("sge_resnet50", num_classes=10, seed=8)
    path = tmp_path / "sge.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(UserError, match=r"32 unexpected keys \(first: layer1.0.sge.weight"):
        load_into(create_model("resnet50", num_classes=10), path)
    with pytest.raises(UserError, match=r"shape mismatches \(first: fc.weight \(10, 2048\) vs model \(1000, 2048\)"):
        load_into(create_model("sge_resnet50"), path)


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_state_dict(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt"):
        read_state_dict(garbage)
    odd = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, odd)
    with pytest.raises(UserError, match="unrecognised content"):
        read_state_dict(odd)


def test_an_sge_without_normalization_is_recorded_and_loads_only_as_such(tmp_path):
    """The header records sge_normalize only when off (a header without it is the paper's module,
    so every other header is as before); loading checks it both ways."""
    kwargs = {"num_classes": 10, "groups": 8, "width": 16}
    variant = create_model("sge_resnet18", seed=5, sge_normalize=False, sge_weight_init=0.1, **kwargs)
    header = make_classifier_checkpoint("sge_resnet18", kwargs, variant)["model_kwargs"]
    assert header == {**kwargs, "sge_normalize": False}
    variant_path = torch_save(make_classifier_checkpoint("sge_resnet18", kwargs, variant), tmp_path / "variant.pt")
    paper = create_model("sge_resnet18", seed=5, **kwargs)
    assert make_classifier_checkpoint("sge_resnet18", kwargs, paper)["model_kwargs"] == kwargs
    paper_path = torch_save(make_classifier_checkpoint("sge_resnet18", kwargs, paper), tmp_path / "paper.pt")

    loaded = create_model("sge_resnet18", checkpoint=variant_path, sge_normalize=False, **kwargs).eval()
    with torch.no_grad():
        assert torch.equal(loaded(SMALL_INPUT), variant.eval()(SMALL_INPUT))
    with pytest.raises(UserError, match="model_kwargs.sge_normalize=False, expected True"):
        create_model("sge_resnet18", checkpoint=variant_path, **kwargs)
    with pytest.raises(UserError, match="model_kwargs.sge_normalize=True, expected False"):
        create_model("sge_resnet18", checkpoint=paper_path, sge_normalize=False, **kwargs)
    # the initial values are not part of a trained model: any of them loads a file
    create_model("sge_resnet18", checkpoint=paper_path, sge_weight_init=0.3, **kwargs)
