"""Checkpoint files: our classifier format, torchvision state dicts, the authors' release files.

Our format ("sge-repro/classifier/v1"), a dict saved with torch.save:

    {"format": "sge-repro/classifier/v1",
     "model": "sge_resnet50",                                  # a create_model name
     "model_kwargs": {"num_classes": 1000, "groups": 64, "width": 64},  # + "sge_normalize": false
                                                               # for an SGE without normalisation
     "state_dict": {...},                                      # plain names, no `module.`
     ...optional training state added by the engine: "epoch", "optimizer", "scheduler", ...}

Also read: "torchvision" (a flat state dict), "state_dict (module. prefix)" (one saved from a
DataParallel / DDP model) and "official", the authors' release files (`sge_resnet50.pth.tar`:
{"epoch", "state_dict", "acc", "best_acc", "optimizer"}, `module.`-prefixed). The authors' CBAM,
BAM and SK* models (PytorchInsight) name some tensors differently (AUTHORS_RENAMES): a file in
their layout is renamed on load and switches the model to their computation
(`ResNet.use_authors_computation`), so it gives the logits of their model.

Every file is read with torch.load(weights_only=True); loading is strict (no partial loads).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sge_repro.errors import UserError, preview
from sge_repro.models.resnet import DEFAULT_WIDTH
from sge_repro.models.attention import SpatialGroupEnhance
from sge_repro.models.sge import DEFAULT_GROUPS, DEFAULT_NORMALIZE

CLASSIFIER_FORMAT = "sge-repro/classifier/v1"
FORMAT_TORCHVISION = "torchvision"
FORMAT_OFFICIAL = "official"
FORMAT_PREFIXED = "state_dict (module. prefix)"
RESERVED_KEYS = ("format", "model", "model_kwargs", "state_dict")
# Optional key of our format: True when the weights came from the authors' release of a model whose
# computation differs from ours (e.g. BAM), so that loading the file switches the model to theirs.
AUTHORS_COMPUTATION_KEY = "authors_computation"
_FIRST = 5  # how many keys an error message lists


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def make_classifier_checkpoint(model_name: str, model_kwargs: dict[str, Any], model: nn.Module, **extra: Any) -> dict:
    """Our checkpoint dict for `model` (wrappers removed); `extra` carries training state."""
    clashing = sorted(set(extra) & set(RESERVED_KEYS))
    if clashing:
        raise ValueError(f"make_classifier_checkpoint: extra keys {clashing} are reserved")
    kwargs = {"num_classes": int(model_kwargs.get("num_classes", 1000)),
              "groups": int(model_kwargs.get("groups", DEFAULT_GROUPS)),
              "width": int(model_kwargs.get("width", DEFAULT_WIDTH))}
    if any(isinstance(module, SpatialGroupEnhance) and not module.normalize for module in unwrap_model(model).modules()):
        kwargs["sge_normalize"] = False  # recorded only then: a header without it is the paper's module
    state_dict = {key: value.detach().cpu() for key, value in unwrap_model(model).state_dict().items()}
    return {"format": CLASSIFIER_FORMAT, "model": model_name, "model_kwargs": kwargs, "state_dict": state_dict, **extra}


# The first bytes torch.save writes in its legacy (non-zip) format: the pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_REFUSED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)")


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) with one-line errors for missing / corrupt / unsafe files.

    The one safe load of a torch file in sge-repro (`what` names it in messages: "checkpoint",
    "weights"). Torch's own message for a file it cannot read advises re-running with
    weights_only=False, which is wrong for a corrupt file and unsafe for a hostile one: never shown.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    with open(path, "rb") as file:
        head = file.read(len(_LEGACY_TORCH_MAGIC))
    if not zipfile.is_zipfile(path) and head != _LEGACY_TORCH_MAGIC:
        raise UserError(f"{what} {path}: not a valid checkpoint (neither a torch zip archive nor a legacy "
                        f"torch file{'; it is empty' if not head else ''})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        holds = f"it would import {refused.group(1)}" if refused else "it holds objects other than tensors and plain containers"
        raise UserError(f"{what} {path}: refused, not a checkpoint of weights ({holds}; loaded with weights_only=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as error:
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{what} {path}: not a valid checkpoint, corrupt or truncated ({first})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
    )


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def interpret_checkpoint(obj: Any, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(state_dict without wrapper prefixes, detected format, our header or None)."""
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != CLASSIFIER_FORMAT:
            raise UserError(f"checkpoint {path}: format {obj['format']!r} is not supported, expected {CLASSIFIER_FORMAT!r}")
        missing = [key for key in RESERVED_KEYS if key not in obj]
        if missing or not _is_state_dict(obj["state_dict"]):
            raise UserError(f"checkpoint {path}: {CLASSIFIER_FORMAT} file lacks {missing or ['a tensor state_dict']}")
        header = {"model": obj["model"], "model_kwargs": dict(obj["model_kwargs"]),
                  "authors_computation": obj.get(AUTHORS_COMPUTATION_KEY) is True}
        return _strip_prefix(obj["state_dict"]), CLASSIFIER_FORMAT, header
    if isinstance(obj, dict) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        return _strip_prefix(obj["state_dict"]), FORMAT_OFFICIAL, None
    if _is_state_dict(obj):
        if all(key.startswith("module.") for key in obj):
            return _strip_prefix(obj), FORMAT_PREFIXED, None
        return dict(obj), FORMAT_TORCHVISION, None
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:_FIRST]}" if isinstance(obj, dict) else ""
    raise UserError(
        f"checkpoint {path}: unrecognised content ({kind}{keys}); expected our {CLASSIFIER_FORMAT} dict, "
        "a state dict, or a dict with 'state_dict' (official release)"
    )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict with plain torchvision-style names, detected format) of a checkpoint file."""
    state_dict, detected, _ = interpret_checkpoint(load_checkpoint_file(path), path)
    return state_dict, detected


def read_classifier_header(path: str | os.PathLike) -> dict | None:
    """{"model", "model_kwargs"} of one of our checkpoints; None for foreign formats."""
    return interpret_checkpoint(load_checkpoint_file(path), path)[2]


# Where the authors' names differ from ours: (our name part, theirs), matched at a name boundary
# inside a block (`layer1.0.`) or a stage attention (`bam1.`). Every other name is the same.
AUTHORS_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    # CBAM: ChannelGate.mlp = (Flatten, Linear, ReLU, Linear); SpatialGate.spatial = BasicConv(conv, bn)
    "cbam": (("cbam.mlp.0.", "cbam.ChannelGate.mlp.1."),
             ("cbam.mlp.2.", "cbam.ChannelGate.mlp.3."),
             ("cbam.spatial_conv.", "cbam.SpatialGate.spatial.conv."),
             ("cbam.spatial_bn.", "cbam.SpatialGate.spatial.bn.")),
    # BAM: channel_att.gate_c = (flatten, fc_0, bn_1, relu_1, fc_final); spatial_att.gate_s =
    # (conv_reduce0, bn_reduce0, relu, [conv_di_i, bn_di_i, relu] x 2, conv_final)
    "bam": (("channel_gate.1.", "channel_att.gate_c.gate_c_fc_0."),
            ("channel_gate.2.", "channel_att.gate_c.gate_c_bn_1."),
            ("channel_gate.4.", "channel_att.gate_c.gate_c_fc_final."),
            ("spatial_gate.0.", "spatial_att.gate_s.gate_s_conv_reduce0."),
            ("spatial_gate.1.", "spatial_att.gate_s.gate_s_bn_reduce0."),
            ("spatial_gate.3.", "spatial_att.gate_s.gate_s_conv_di_0."),
            ("spatial_gate.4.", "spatial_att.gate_s.gate_s_bn_di_0."),
            ("spatial_gate.6.", "spatial_att.gate_s.gate_s_conv_di_1."),
            ("spatial_gate.7.", "spatial_att.gate_s.gate_s_bn_di_1."),
            ("spatial_gate.9.", "spatial_att.gate_s.gate_s_conv_final.")),
    # SK*: the grouped branch and the selection sit directly in their Bottleneck
    "sk": (("sk.conv.", "conv2g."),
           ("sk.bn.", "bn2g."),
           ("sk.squeeze.", "conv_fc1."),
           ("sk.squeeze_bn.", "bn_fc1."),
           ("sk.select.", "conv_fc2.")),
}
LAYOUT_OURS = "ours"
LAYOUT_AUTHORS = "authors"


def _rename_part(key: str, renames: tuple[tuple[str, str], ...], reverse: bool = False) -> str:
    for ours, theirs in renames:
        old, new = (theirs, ours) if reverse else (ours, theirs)
        renamed, count = re.subn(r"(?:^|(?<=\.))" + re.escape(old), new, key, count=1)
        if count:
            return renamed
    return key


def _model_attention(model: nn.Module) -> str | None:
    attention = getattr(unwrap_model(model), "attention", None)
    return attention if isinstance(attention, str) else None


def to_authors_layout(state_dict: dict[str, torch.Tensor], attention: str) -> dict[str, torch.Tensor]:
    """Our state dict of a model with `attention` under the authors' names (no `module.` prefix)."""
    renames = AUTHORS_RENAMES.get(attention, ())
    return {_rename_part(key, renames): value for key, value in state_dict.items()}


def to_model_layout(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict under the model's names, LAYOUT_OURS | LAYOUT_AUTHORS). A file is in the authors'
    layout when one of its keys is a name only their model has; then every key is renamed."""
    renames = AUTHORS_RENAMES.get(_model_attention(model) or "", ())
    ours = unwrap_model(model).state_dict()
    authors_only = {_rename_part(key, renames) for key in ours} - set(ours)
    if not any(key in authors_only for key in state_dict):
        return state_dict, LAYOUT_OURS
    return {_rename_part(key, renames, reverse=True): value for key, value in state_dict.items()}, LAYOUT_AUTHORS


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike, detected: str,
                     layout: str = LAYOUT_OURS) -> dict:
    """Raise UserError unless `state_dict` (under the model's names) fits `model` exactly; returns
    the dict to load. Keys in messages are named as the file names them: the authors' names for a
    file in their layout or their release format (`detected` official), else ours.

    Only BN `num_batches_tracked` counters may be absent (old files); they are taken from the model.
    """
    expected = unwrap_model(model).state_dict()
    renames = AUTHORS_RENAMES.get(_model_attention(model) or "", ())
    authors_names = layout == LAYOUT_AUTHORS or detected == FORMAT_OFFICIAL

    def named(key: str) -> str:  # a model key as the file would name it
        return _rename_part(key, renames) if authors_names else key

    missing = [named(key) for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    # keys of the file under its own names (those of a file in the authors' layout renamed back to theirs)
    unexpected = [_rename_part(key, renames) if layout == LAYOUT_AUTHORS else key
                  for key in state_dict if key not in expected]
    wrong_shape = [
        f"{named(key)} {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if layout == LAYOUT_AUTHORS:
        detected = f"{detected}, the authors' {_model_attention(model)} key layout"
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {preview(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (first: {preview(unexpected)})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatches (first: {preview(wrong_shape)})")
        raise UserError(
            f"checkpoint {path} (detected format: {detected}) does not match the model: " + "; ".join(problems)
        )
    complete = dict(state_dict)
    for key, value in expected.items():
        complete.setdefault(key, value)
    return complete


def load_into(
    model: nn.Module,
    path: str | os.PathLike,
    expected_model: str | None = None,
    expected_kwargs: dict[str, Any] | None = None,
) -> str:
    """Load checkpoint `path` into `model` strictly; returns the detected format.

    For our own format, `expected_model` / `expected_kwargs` (if given) must equal the header.
    """
    state_dict, detected, header = interpret_checkpoint(load_checkpoint_file(path), path)
    if header is not None:
        if expected_model is not None and header["model"] != expected_model:
            raise UserError(f"checkpoint {path}: holds model {header['model']!r}, expected {expected_model!r}")
        recorded = {"sge_normalize": DEFAULT_NORMALIZE, **header["model_kwargs"]}  # see make_classifier_checkpoint
        for key, value in (expected_kwargs or {}).items():
            if key in recorded and recorded[key] != value:
                raise UserError(f"checkpoint {path}: model_kwargs.{key}={recorded[key]!r}, expected {value!r}")
    return load_state_dict_strict(model, state_dict, path, detected,
                                  authors_computation=bool(header and header["authors_computation"]))


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                           detected: str, authors_computation: bool = False) -> str:
    """Load a state dict (ours or in the authors' layout) into `model`, all or nothing; a file in the
    authors' layout (or one of ours saying so) also switches the model to their computation.
    Returns the detected format."""
    state_dict, layout = to_model_layout(model, state_dict)
    complete = check_state_dict(model, state_dict, path, detected, layout)
    bare = unwrap_model(model)
    bare.load_state_dict(complete, strict=True)
    if layout == LAYOUT_AUTHORS or authors_computation:
        bare.use_authors_computation()
    return detected


def infer_model_kwargs(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """width, SGE groups and classes of a foreign file (a state dict under our or the authors' names)."""
    kwargs = {}
    if "conv1.weight" in state_dict:
        kwargs["width"] = int(state_dict["conv1.weight"].shape[0])
    if "layer1.0.sge.weight" in state_dict:
        kwargs["groups"] = int(state_dict["layer1.0.sge.weight"].numel())
    if "fc.weight" in state_dict:
        kwargs["num_classes"] = int(state_dict["fc.weight"].shape[0])
    return kwargs
