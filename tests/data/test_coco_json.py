import json

import pytest

from sge_repro.data.coco_json import validate_coco_json
from sge_repro.data.synthetic import generate_detection_set
from sge_repro.errors import UserError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "det"
    generate_detection_set(root, num_train=3, num_val=1, image_size=96, num_categories=2, seed=0)
    return root


@pytest.fixture
def document(coco_root):
    return json.loads((coco_root / "annotations" / "instances_train.json").read_text())


def check(tmp_path, coco_root, document):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return validate_coco_json(path, coco_root / "train")


def test_generated_file_is_valid(tmp_path, coco_root, document):
    stats = check(tmp_path, coco_root, document)
    assert stats["images"] == 3 and stats["categories"] == 2
    assert stats["annotations"] == len(document["annotations"]) > 0
    assert sum(stats["annotations_per_category"].values()) == stats["annotations"]
    assert stats["small"] + stats["medium"] + stats["large"] == stats["annotations"]


def test_malformed_json(tmp_path, coco_root):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(UserError, match=r"broken.json: malformed JSON at line 1"):
        validate_coco_json(path, coco_root / "train")


def test_missing_file(tmp_path, coco_root):
    with pytest.raises(UserError, match="annotation file not found"):
        validate_coco_json(tmp_path / "none.json", coco_root / "train")


def test_missing_top_level_key(tmp_path, coco_root, document):
    del document["categories"]
    with pytest.raises(UserError, match=r"missing key 'categories'"):
        check(tmp_path, coco_root, document)


def test_missing_record_key_names_the_id(tmp_path, coco_root, document):
    del document["annotations"][0]["bbox"]
    annotation_id = document["annotations"][0]["id"]
    with pytest.raises(UserError, match=rf"annotation id {annotation_id} lacks 'bbox'"):
        check(tmp_path, coco_root, document)


def test_duplicate_image_id(tmp_path, coco_root, document):
    document["images"][2]["id"] = document["images"][1]["id"]
    with pytest.raises(UserError, match=r"duplicate image id 2"):
        check(tmp_path, coco_root, document)


def test_duplicate_annotation_id(tmp_path, coco_root, document):
    document["annotations"][-1]["id"] = 1
    with pytest.raises(UserError, match=r"duplicate annotation id 1"):
        check(tmp_path, coco_root, document)


def test_unknown_image_id(tmp_path, coco_root, document):
    document["annotations"][0]["image_id"] = 77
    with pytest.raises(UserError, match=r"annotation id 1 points at unknown image id 77"):
        check(tmp_path, coco_root, document)


def test_unknown_category_id(tmp_path, coco_root, document):
    document["annotations"][-1]["category_id"] = 5
    last = document["annotations"][-1]["id"]
    with pytest.raises(UserError, match=rf"annotation id {last} points at unknown category id 5"):
        check(tmp_path, coco_root, document)


@pytest.mark.parametrize("bbox", [[1, 1, 0, 5], [1, 1, 4, -2]])
def test_non_positive_box(tmp_path, coco_root, document, bbox):
    document["annotations"][0]["bbox"] = bbox
    with pytest.raises(UserError, match=r"annotation id 1 has bbox .* non-positive size"):
        check(tmp_path, coco_root, document)


def test_box_outside_image(tmp_path, coco_root, document):
    document["annotations"][0]["bbox"] = [90, 10, 20, 20]
    with pytest.raises(UserError, match=r"annotation id 1 has bbox .* outside image id"):
        check(tmp_path, coco_root, document)


def test_missing_image_file(tmp_path, coco_root, document):
    document["images"][1]["file_name"] = "gone.jpg"
    with pytest.raises(UserError, match=r"image id 2: file .*gone.jpg not found"):
        check(tmp_path, coco_root, document)


def test_bad_polygon(tmp_path, coco_root, document):
    document["annotations"][0]["segmentation"] = [[1, 2, 3]]
    with pytest.raises(UserError, match=r"annotation id 1 has a polygon with 3 values"):
        check(tmp_path, coco_root, document)
