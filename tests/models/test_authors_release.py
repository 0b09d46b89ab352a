"""The authors' release files of every model in the paper's table load with the authors' logits.

Their models are re-implemented independently in tests/authors_reference.py (from reading their
PytorchInsight code: names and forward); these tests build their key layout from it, save it as
their training script did, and check that `create_model(name, checkpoint=...)` computes what their
model computes.

Tolerance of the logit comparisons: where our ops in the authors' computation are theirs (plain,
SE, CBAM, BAM, SK) the logits come out bit for bit on one machine; SGE runs our fast module (a C
kernel summing in another order than their torch ops), so logits are compared norm-wise at 1e-5:
each SGE sum is over at most 3136 float32 terms (56 x 56), sqrt(3136) * 2**-24 ~ 3e-6 per block,
and the measured error on this machine is below 1e-6.
"""

import pytest
import torch

from authors_reference import AuthorsResNet, randomize, release_file
from float_compare import relative_error
from sge_repro.errors import UserError
from sge_repro.models import create_model, parse_model_name
from sge_repro.models.weight_files import AUTHORS_RENAMES, read_state_dict, to_authors_layout

PAPER_TABLE = [f"{prefix}resnet{depth}" for depth in (50, 101)
               for prefix in ("", "se_", "sk_", "bam_", "cbam_", "sge_")]
WIDTH = 32  # a quarter of the paper's channels: same layout, faster; SK's 32 groups still divide it
IMAGE = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # BAM's head needs 224


def _attention(name: str) -> str:
    return parse_model_name(name).attention


@pytest.mark.parametrize("name", PAPER_TABLE)
def test_our_keys_renamed_are_exactly_the_authors_layout(name):
    """At the paper's width (64): every tensor of ours has one tensor of theirs, same shape."""
    parsed = parse_model_name(name)
    theirs = AuthorsResNet(parsed.attention, parsed.depth).state_dict()
    ours = create_model(name).state_dict()
    renamed = to_authors_layout(ours, parsed.attention)
    assert len(renamed) == len(ours)  # one to one
    assert sorted(renamed) == sorted(theirs)
    assert [key for key in renamed if renamed[key].shape != theirs[key].shape] == []
    if parsed.attention in AUTHORS_RENAMES:  # the names really differ (the examples)
        assert set(renamed) != set(ours)


@pytest.mark.parametrize("name", [name for name in PAPER_TABLE if name.endswith("50")])
def test_release_file_gives_the_authors_logits(name, tmp_path):
    parsed = parse_model_name(name)
    theirs = randomize(AuthorsResNet(parsed.attention, 50, width=WIDTH), seed=1).eval()
    path = tmp_path / f"{name}.pth.tar"
    release_file(theirs, path)
    assert read_state_dict(path)[1] == "official"

    ours = create_model(name, width=WIDTH, checkpoint=path, seed=2).eval()  # torch.load(weights_only=True) inside
    with torch.no_grad():
        expected, actual = theirs(IMAGE), ours(IMAGE)
    assert expected.abs().max() > 1  # non-trivial logits
    if parsed.attention == "sge":
        assert relative_error(actual, expected) < 1e-5
    else:
        assert torch.equal(actual, expected)


def test_bam_release_needs_the_authors_computation(tmp_path):
    """Their BAM multiplies the two gates; ours (the BAM paper) adds them. The same weights in our
    computation give other logits: loading their file must switch the model, and does."""
    theirs = randomize(AuthorsResNet("bam", 50, width=WIDTH), seed=3).eval()
    path = tmp_path / "bam_resnet50.pth.tar"
    release_file(theirs, path)
    loaded = create_model("bam_resnet50", width=WIDTH, checkpoint=path).eval()
    assert loaded.authors_computation
    ours_computation = create_model("bam_resnet50", width=WIDTH).eval()
    ours_computation.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        expected = theirs(IMAGE)
        assert torch.equal(loaded(IMAGE), expected)
        assert relative_error(ours_computation(IMAGE), expected) > 1e-2


@pytest.mark.parametrize("name", ["cbam_resnet50", "bam_resnet50", "sk_resnet50"])
def test_round_trip_ours_to_theirs_to_ours(name, tmp_path):
    attention = _attention(name)
    ours = randomize(create_model(name, width=WIDTH, seed=4), seed=5).eval()
    ours.use_authors_computation()
    theirs = AuthorsResNet(attention, 50, width=WIDTH).eval()
    theirs.load_state_dict(to_authors_layout(ours.state_dict(), attention), strict=True)
    with torch.no_grad():
        assert torch.equal(theirs(IMAGE), ours(IMAGE))
    path = tmp_path / "release.pth.tar"
    release_file(theirs, path)
    back = create_model(name, width=WIDTH, checkpoint=path).eval()
    assert all(torch.equal(back.state_dict()[key], value) for key, value in ours.state_dict().items())


def test_our_own_models_keep_their_computation(tmp_path):
    """A file in our layout (our format or a plain state dict) does not switch the computation."""
    model = create_model("bam_resnet50", width=WIDTH, seed=6)
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    assert not create_model("bam_resnet50", width=WIDTH, checkpoint=path).authors_computation


def test_release_missing_a_tensor_names_it_in_the_authors_naming(tmp_path):
    theirs = AuthorsResNet("sk", 50, width=WIDTH)
    path = tmp_path / "sk_resnet50.pth.tar"
    release_file(theirs, path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["module.layer2.1.conv_fc1.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(UserError) as error:
        create_model("sk_resnet50", width=WIDTH, checkpoint=path)
    message = str(error.value)
    assert "\n" not in message
    assert "authors' sk key layout" in message
    assert "1 missing keys (first: layer2.1.conv_fc1.weight)" in message


def test_release_of_another_model_names_the_first_foreign_key(tmp_path):
    path = tmp_path / "cbam_resnet50.pth.tar"
    release_file(AuthorsResNet("cbam", 50, width=WIDTH), path)
    with pytest.raises(UserError, match=r"unexpected keys \(first: layer1\.0\.cbam\.ChannelGate\.mlp\.1\.weight"):
        create_model("se_resnet50", width=WIDTH, checkpoint=path)
    with pytest.raises(UserError, match=r"missing keys \(first: bam1\.channel_att\.gate_c\.gate_c_fc_0\.weight"):
        create_model("bam_resnet50", width=WIDTH, checkpoint=path)
