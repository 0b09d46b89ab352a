"""COCO-format datasets for detectron2: real COCO 2017 and the embedded set, one code path.

    coco2017:  root/train2017/, root/val2017/, root/annotations/instances_{train,val}2017.json
    embedded:  root/train/,     root/val/,     root/annotations/instances_{train,val}.json

Both are validated (JSON shape, image files, category ids, box sizes) before detectron2 sees
them, so a broken annotation fails in seconds with its file and id, not hours into training.
"""

from __future__ import annotations

from pathlib import Path

# One COCO validator for the whole project: the data stage and detection use the same checks.
from sge_repro.data.coco_json import check_records, coco_split_paths, load_coco_document, validate_coco_json
from sge_repro.detection.compat import import_detectron2


def register_coco_dataset(name: str, json_file: str | Path, image_root: str | Path, validate: bool = True,
                          exclude: frozenset[str] = frozenset()) -> dict:
    """Validate and register a COCO instances dataset in detectron2's catalogs under `name`.

    Re-registering the same name with the same files is a no-op; with other files it replaces
    the old entry. Returns the counts from validation (empty when validate=False). `exclude`:
    image files (absolute paths) left out of the dataset, e.g. those the data stage found corrupt
    with data.skip_corrupt (recorded in the metadata as `excluded`; evaluation lists them and
    computes AP over the rest, see sge_repro.detection.engine.evaluate_detector).
    """
    import_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    counts = validate_coco_json(json_file, image_root) if validate else {}
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("json_file") == str(json_file) and metadata.get("image_root") == str(image_root) \
                and metadata.get("excluded", frozenset()) == exclude:
            return counts
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    def load() -> list[dict]:
        records = load_coco_json(str(json_file), str(image_root), name)
        return [record for record in records if record["file_name"] not in exclude] if exclude else records

    # what detectron2's register_coco_instances does, with the exclusion
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco",
                                  excluded=exclude)
    return counts


def register_split(name: str, root: str | Path, split: str, layout: str = "embedded", validate: bool = True,
                   exclude: frozenset[str] = frozenset()) -> dict:
    """`register_coco_dataset` for `split` of a dataset folder in one of LAYOUTS."""
    json_file, image_root = coco_split_paths(root, split, layout)
    return register_coco_dataset(name, json_file, image_root, validate=validate, exclude=exclude)


def dataset_num_classes(json_file: str | Path) -> int:
    """Number of categories in a COCO instances file (the detector's NUM_CLASSES)."""
    return len(check_records(Path(json_file), load_coco_document(Path(json_file)), "categories"))
