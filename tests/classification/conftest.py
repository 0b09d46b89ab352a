"""Shared by the classification tests: a tiny generated set, a tiny recipe, and one finished run."""

import csv
from pathlib import Path

import pytest
import torch

from sge_repro.classification.train import train_classifier
from sge_repro.data.synthetic import generate_classification_set
from sge_repro.params import Params
from sge_repro.params_sections import ModelParams, TrainClsParams
from sge_repro.paths import ProjectPaths

REPO = Path(__file__).resolve().parents[2]
# groups: create_model's default, so the checkpoint header is what create_model(width=8) expects
# (plain ResNets have no SGE groups; ModelParams would otherwise store its default of 8).
TINY_MODEL = ("resnet18", {"width": 8, "groups": 64})
# train_cls params (TrainClsParams fields) plus the run's seed.
RECIPE = dict(epochs=6, batch_size=16, lr=0.02, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine",
              warmup_epochs=1, image_size=32, workers=0, seed=3, min_crop_scale=0.35)


@pytest.fixture(autouse=True)
def one_thread():
    # Same thread count in this process and the subprocesses: CPU results are bit-reproducible.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cls"
    generate_classification_set(root, num_classes=3, image_size=32, train_per_class=40, val_per_class=10, seed=0)
    return root


def cls_manifest(project: Path, **classification) -> Path:
    """data/manifests/cls.json of a project whose data stage generated the set `data_root` holds
    (the same generator arguments), with data.classification params such as max_val_images."""
    from sge_repro.data.prepare import prepare_data

    raw = Params().model_dump(mode="json")
    raw["data"]["classification"].update(num_classes=3, image_size=32, train_per_class=40, val_per_class=10,
                                         **classification)
    raw["data"]["detection"].update(num_train=1, num_val=1, image_size=64, num_categories=1)
    paths = ProjectPaths(project)
    prepare_data(Params.model_validate(raw).data, paths, workers=1)
    return paths.cls_manifest


def outputs(run: Path):
    return run / "ckpt", run / "metrics.json", run / "history.tsv"


def train_with_recipe(recipe: dict, model, data_root, run_dir, metrics_path, history_path, progress=None) -> dict:
    """train_classifier with a RECIPE-style dict (train_cls params + seed) and a (name, kwargs) model."""
    options = dict(recipe)
    seed = options.pop("seed")
    return train_classifier(TrainClsParams(**options), ModelParams(**model[1]), model[0], seed, data_root,
                            run_dir, metrics_path, history_path, progress=progress)


def train(data_root, run: Path, model=TINY_MODEL, progress=None, **overrides):
    return train_with_recipe({**RECIPE, **overrides}, model, data_root, *outputs(run), progress=progress)


def read_history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="package")
def finished_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    calls = []
    metrics = train(data_root, run, progress=lambda *args: calls.append(args))
    return run, metrics, calls
