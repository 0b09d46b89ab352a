import numpy as np
import pytest
import torch
from PIL import Image

from sge_repro.atomic import torch_save
from sge_repro.errors import UserError
from sge_repro.models import create_model
from sge_repro.models.sge import sge_reference_gate
from sge_repro.models.weight_files import make_classifier_checkpoint
from sge_repro.report.activations import capture_sge, sge_modules
from sge_repro.report.visualize import load_image, visualize_sge, visualize_sge_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_sge_model():
    torch.manual_seed(0)
    model = create_model("sge_resnet18", num_classes=5, groups=8, width=16)
    for module in sge_modules(model).values():  # away from the gamma=0 init, so the gate varies
        torch.nn.init.normal_(module.weight)
        torch.nn.init.normal_(module.bias)
    return model


@pytest.fixture
def image_file(tmp_path):
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    path = tmp_path / "val_0001.png"
    Image.fromarray(pixels).save(path)
    return path


def test_gate_times_input_is_what_the_sge_module_outputs(tiny_sge_model, image_file):
    torch.set_num_threads(1)
    image, _ = load_image(image_file, image_size=None)
    captured = capture_sge(tiny_sge_model, image, ["layer2.1", "layer4.0"])
    for maps in captured.values():
        channels, groups = maps["before"].shape[0], maps["gate"].shape[0]
        expanded = maps["gate"].repeat_interleave(channels // groups, dim=0)
        torch.testing.assert_close(maps["before"] * expanded, maps["after"], rtol=1e-4, atol=1e-5)
        assert float(maps["gate"].std()) > 0.01  # a real spatial gate, not a constant


def test_gate_at_initialisation_is_sigmoid_of_one():
    x = torch.randn(2, 16, 5, 5)
    gate = sge_reference_gate(x, torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1), groups=4)
    torch.testing.assert_close(gate, torch.full((2, 4, 5, 5), float(torch.sigmoid(torch.tensor(1.0)))))


def test_visualize_writes_one_png_per_stage_or_the_chosen_layer(tiny_sge_model, image_file, tmp_path):
    torch.set_num_threads(1)
    written = visualize_sge(tiny_sge_model, image_file, tmp_path / "out")
    assert [p.name for p in written] == [f"val_0001-layer{i}.1.png" for i in (1, 2, 3, 4)]
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in written)
    one = visualize_sge(tiny_sge_model, image_file, tmp_path / "one", layer="layer3.0", image_size=64)
    assert [p.name for p in one] == ["val_0001-layer3.0.png"]


def test_visualize_bad_inputs_are_user_errors(tiny_sge_model, image_file, tmp_path):
    with pytest.raises(UserError, match="'layer9.0' has no SGE module; expected one of layer1.0"):
        visualize_sge(tiny_sge_model, image_file, tmp_path, layer="layer9.0")
    with pytest.raises(UserError, match="no SGE modules"):
        visualize_sge(create_model("resnet18", num_classes=5, width=16), image_file, tmp_path)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        visualize_sge(tiny_sge_model, not_an_image, tmp_path)


def test_visualize_from_our_checkpoint(tiny_sge_model, image_file, tmp_path):
    torch.set_num_threads(1)
    kwargs = {"num_classes": 5, "groups": 8, "width": 16}
    checkpoint = torch_save(make_classifier_checkpoint("sge_resnet18", kwargs, tiny_sge_model), tmp_path / "best.pt")
    written = visualize_sge_checkpoint("sge_resnet18", checkpoint, image_file, tmp_path / "vis", layer="layer2.1")
    assert [p.name for p in written] == ["val_0001-layer2.1.png"]
