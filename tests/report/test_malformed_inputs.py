"""Corrupt or wrongly typed input files of the report: a one-line UserError naming the file (and the
key), never a traceback; the real `sge-repro report` exits 2 with one line and writes nothing."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from sge_repro.errors import UserError
from sge_repro.params import Params
from sge_repro.params_yaml import dump_params
from sge_repro.paths import ProjectPaths
from sge_repro.report import build_report

from .conftest import fixture_complexity, populate, write_cls, write_det

BIG = "1" + "0" * 400  # a JSON integer Python parses exactly and float() refuses (OverflowError)
def _id(value):
    """Test ids: byte contents by their size (pytest numbers repeated ids)."""
    return f"{len(value)}bytes" if isinstance(value, bytes) else None


BBOX = {"AP": 20.0, "AP50": 40.0, "AP75": 22.0, "APs": 5.0, "APm": 20.0, "APl": 30.0}

# what each input name stands for in a populated project (tests/report/conftest.py)
TARGETS = {
    "eval_cls": lambda p: p.cls_metrics("resnet18", 0),
    "eval_det": lambda p: p.det_metrics("mask_rcnn", "resnet18", 0),
    "eval_det_coco": lambda p: p.det_metrics("faster_rcnn", "sge_resnet50", 1),
    "predictions": lambda p: p.cls_predictions("sge_resnet18", 1),
    "train_cls": lambda p: p.cls_train_metrics("resnet18", 1),
    "history": lambda p: p.cls_history("sge_resnet18", 0),
    # a run trained but not evaluated: its curve is still plotted, its dataset read from train_cls
    "orphan_history": lambda p: p.cls_history("se_resnet18", 0),
    "orphan_train_cls": lambda p: p.cls_train_metrics("se_resnet18", 0),
}


def _det(**changes) -> bytes:
    record = {"detector": "mask_rcnn", "backbone": "resnet18", "dataset": "embedded", "seed": 0, "bbox": dict(BBOX),
              "flags": {"no_detections": False, "nan_reported_as_zero": {"bbox": []}},
              "per_category": {"bbox": {"cat": 20.0}}}
    record.update(changes)
    return json.dumps(record, ensure_ascii=False).encode()


def _cls(**changes) -> bytes:
    record = {"model": "resnet18", "dataset": "embedded", "seed": 0, "top1": 60.0, "top5": 100.0, "loss": 1.0,
              "num_images": 10}
    record.update(changes)
    return json.dumps(record, ensure_ascii=False).encode()


def _raw(text: str) -> bytes:
    """JSON text as written, for literals json.dumps would not write (a 400-digit number)."""
    return text.encode()


def _project(root: Path, target: str, content: bytes) -> Path:
    """The fixture project with one input file replaced by `content`; returns that file."""
    populate(root)
    paths = ProjectPaths(root)
    if target.startswith("orphan"):  # se_resnet18 trained (history + train metrics), never evaluated
        write_cls(root, "se_resnet18", 0, "embedded", 50.0, 90.0)
        paths.cls_metrics("se_resnet18", 0).unlink()
        paths.cls_predictions("se_resnet18", 0).unlink(missing_ok=True)
    path = TARGETS[target](paths)
    path.write_bytes(content)
    return path


def _build(root: Path):
    return build_report(root, "embedded", bootstrap_samples=50, complexity=fixture_complexity)


def _assert_one_line_error(error: UserError, root: Path, path: Path, key: str | None) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 300, message
    assert message.startswith(f"{path.relative_to(root)}: "), message
    if key is not None:
        assert f"key '{key}'" in message, message


NOT_UTF8 = [
    ("eval_cls", b'\xff\xfe{\x00"\x00t\x00o\x00p\x001\x00"\x00', "not UTF-8 text"),  # UTF-16
    ("eval_cls", _cls(dataset="caf\u00e9").decode().encode("latin-1"), "not UTF-8 text"),
    ("eval_det", _det(dataset="r\u00e9sum\u00e9").decode().encode("latin-1"), "not UTF-8 text"),
    ("eval_det_coco", bytes(range(128, 256)) * 8, "not UTF-8 text"),
    ("predictions", b'{"correct": [1], "files": ["\xe9.jpg"]}', "not UTF-8 text"),
    ("train_cls", b'{"dataset": "caf\xe9"}', "not UTF-8 text"),
    ("orphan_train_cls", b"\xff\xfe", "not UTF-8 text"),
    ("eval_det", b'{"dataset": "embedded"\x00\x00}', "binary data"),
    ("eval_cls", b"\x00" * 64, "binary data"),
]


@pytest.mark.parametrize("target, content, reason", NOT_UTF8, ids=_id)
def test_a_json_input_that_is_not_utf8_text_is_a_one_line_error(tmp_path, target, content, reason):
    path = _project(tmp_path, target, content)
    with pytest.raises(UserError, match=reason) as error:
        _build(tmp_path)
    _assert_one_line_error(error.value, tmp_path, path, None)
    assert "expected a JSON file" in str(error.value)


WRONG_TYPES = [
    ("eval_det", _det(flags="abc"), "flags"),
    ("eval_det", _det(flags=["no_detections"]), "flags"),
    ("eval_det", _det(flags=True), "flags"),
    ("eval_det", _det(flags={"no_detections": "yes"}), "flags.no_detections"),
    ("eval_det_coco", _det(detector="faster_rcnn", backbone="sge_resnet50", seed=1, flags={"no_detections": 1}),
     "flags.no_detections"),
    ("eval_det", _det(flags={"nan_reported_as_zero": ["APs"]}), "flags.nan_reported_as_zero"),
    ("eval_det", _det(flags={"nan_reported_as_zero": "APs"}), "flags.nan_reported_as_zero"),
    ("eval_det", _det(flags={"nan_reported_as_zero": {"bbox": "APs"}}), "flags.nan_reported_as_zero.bbox"),
    ("eval_det", _det(flags={"nan_reported_as_zero": {"segm": 5}}), "flags.nan_reported_as_zero.segm"),
    ("eval_det", _det(flags={"nan_reported_as_zero": {"bbox": [1, 2]}}), "flags.nan_reported_as_zero.bbox"),
    ("eval_det", _det(bbox=[1, 2, 3]), "bbox"),
    ("eval_det", _det(bbox="AP"), "bbox"),
    ("eval_det", _det(bbox=37.5), "bbox"),
    ("eval_det", _det(dataset=None), "dataset"),
    ("eval_det", _det(dataset=["coco"]), "dataset"),
    ("eval_det", _det(dataset={"name": "coco"}), "dataset"),
    ("eval_det", _det(dataset=5), "dataset"),
    ("eval_det", _det(per_category="abc"), "per_category"),
    ("eval_det", _det(per_category={"bbox": ["cat", 20.0]}), "per_category.bbox"),
    ("eval_det", _det(per_category={"segm": {"cat": "high"}}), "per_category.segm.cat"),
    ("eval_det", _det(per_category={"bbox": {"cat": {"AP": 1.0}}}), "per_category.bbox.cat"),
    ("eval_cls", _cls(num_images=2.5), "num_images"),
    ("eval_cls", _cls(num_images=-10), "num_images"),
    ("train_cls", b'{"dataset": ["embedded"]}', "dataset"),
    ("train_cls", b'{"dataset": 7, "best_epoch": 3}', "dataset"),
    ("orphan_train_cls", b'{"dataset": {"name": "embedded"}}', "dataset"),
]


@pytest.mark.parametrize("target, content, key", WRONG_TYPES, ids=_id)
def test_a_wrongly_typed_field_is_a_one_line_error_naming_file_and_key(tmp_path, target, content, key):
    path = _project(tmp_path, target, content)
    with pytest.raises(UserError, match="should be") as error:
        _build(tmp_path)
    _assert_one_line_error(error.value, tmp_path, path, key)


HUGE_NUMBERS = [
    ("eval_cls", _raw(f'{{"dataset": "embedded", "top1": {BIG}, "top5": 100.0}}'), "top1"),
    ("eval_cls", _raw(f'{{"dataset": "embedded", "top1": 60.0, "top5": -{BIG}}}'), "top5"),
    ("eval_cls", _raw(f'{{"dataset": "embedded", "top1": 60.0, "top5": 100.0, "num_images": {BIG}}}'), "num_images"),
    ("eval_cls", _raw(f'{{"dataset": "embedded", "top1": 60.0, "top5": 100.0, "params_m": {BIG}}}'), "params_m"),
    ("eval_cls", _raw(f'{{"dataset": "embedded", "top1": 60.0, "top5": 100.0, "loss": {BIG}}}'), "loss"),
    ("eval_det", _raw(f'{{"dataset": "embedded", "bbox": {{"AP": {BIG}, "AP50": 1, "AP75": 1, "APs": 1, '
                      f'"APm": 1, "APl": 1}}}}'), "bbox.AP"),
    ("eval_det", _raw(f'{{"dataset": "embedded", "bbox": {{"AP": 1, "AP50": 1, "AP75": 1, "APs": 1, '
                      f'"APm": 1, "APl": -{BIG}}}}}'), "bbox.APl"),
    ("eval_det", _det(segm={"AP": 10.0}).replace(b'"AP": 10.0', f'"AP": {BIG}'.encode()), "segm.AP"),
    ("eval_det", _det().replace(b'"cat": 20.0', f'"cat": {BIG}'.encode()), "per_category.bbox.cat"),
    ("eval_det", _det().replace(b'"cat": 20.0', b'"cat": Infinity'), "per_category.bbox.cat"),
    ("eval_det", _det().replace(b'"cat": 20.0', b'"cat": -1e400'), "per_category.bbox.cat"),
    ("eval_det", _det(seed=0).replace(b'"seed": 0', f'"seed": {BIG}'.encode()), "seed"),
    ("eval_cls", _cls().replace(b'"seed": 0', f'"seed": -{BIG}'.encode()), "seed"),
]


@pytest.mark.parametrize("target, content, key", HUGE_NUMBERS, ids=_id)
def test_a_number_beyond_a_float_is_a_one_line_error_naming_file_and_key(tmp_path, target, content, key):
    path = _project(tmp_path, target, content)
    with pytest.raises(UserError) as error:
        _build(tmp_path)
    _assert_one_line_error(error.value, tmp_path, path, key)
    assert "0000000000" not in str(error.value)  # the number by its length, not 400 digits


@pytest.mark.parametrize(
    "target, content",
    [
        ("eval_cls", _raw('{"dataset": "embedded", "top1": %s, "top5": 100.0}' % ("7" * 5000))),
        ("predictions", _raw('{"correct": [%s], "files": ["a"]}' % ("1" * 4500))),
        ("eval_det", b'{"bbox": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("train_cls", b'{"dataset": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001),
    ],
    ids=["5000-digit-number", "4500-digit-number", "deep-list", "deep-object"],
)
def test_json_python_cannot_parse_is_not_valid_json(tmp_path, target, content):
    path = _project(tmp_path, target, content)
    with pytest.raises(UserError, match="not valid JSON") as error:
        _build(tmp_path)
    _assert_one_line_error(error.value, tmp_path, path, None)


@pytest.mark.parametrize(
    "target, content, reason",
    [
        ("history", bytes(range(256)) * 16, "binary data|not UTF-8"),
        ("history", b"epoch\tval_top1\n1\t\x0010\n", "binary data"),
        ("history", b"\x00" * 10, "binary data"),
        ("history", "epoch\tval_top1\tnote\n1\t10\tcaf\u00e9\n".encode("latin-1"), "not UTF-8 text"),
        ("orphan_history", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data|not UTF-8"),
        ("orphan_history", "epoch\tval_top1\n1\t10\u00b0\n".encode("cp1252"), "not UTF-8 text"),
        ("history", b'epoch\tval_top1\n"' + b"1" * 200_000 + b"\t2\n", "not a valid TSV"),
    ],
    ids=_id,
)
def test_a_history_tsv_that_is_not_text_is_a_one_line_error(tmp_path, target, content, reason):
    path = _project(tmp_path, target, content)
    with pytest.raises(UserError, match=reason) as error:
        _build(tmp_path)
    _assert_one_line_error(error.value, tmp_path, path, None)


@pytest.mark.parametrize(
    "target, content, expected",
    [
        # missing and extra cells, words: skipped; inf / nan / 1e400 / 400 digits: not plotted
        ("history", b"epoch\tval_top1\ttrain_loss\n1\t10\n2\t20\tinf\t9\n3\tx\t1.5\n",
         [{"epoch": 1.0, "val_top1": 10.0}, {"epoch": 2.0, "val_top1": 20.0}, {"epoch": 3.0, "train_loss": 1.5}]),
        ("history", b"epoch\tval_top1\tval_loss\n1\tnan\t2.0\n2\t1e400\t-inf\n",
         [{"epoch": 1.0, "val_loss": 2.0}, {"epoch": 2.0}]),
        ("orphan_history", f"epoch\tval_top1\n1\t{'9' * 400}\n2\t30.5\n".encode(),
         [{"epoch": 1.0}, {"epoch": 2.0, "val_top1": 30.5}]),
        ("orphan_history", b"epoch\tval_top1\nInfinity\t12\n-Infinity\tNaN\n",
         [{"val_top1": 12.0}]),
    ],
    ids=_id,
)
def test_history_cells_that_are_not_finite_numbers_are_left_out_of_the_curves(tmp_path, target, content, expected):
    _project(tmp_path, target, content)
    report = _build(tmp_path)
    model = "sge_resnet18" if target == "history" else "se_resnet18"
    [curve] = [c for c in report.curves if c.model == model]
    assert curve.histories[0] == expected


@pytest.mark.parametrize(
    "drop, reason",
    [((), "incomplete: no bbox"), (("dataset",), "incomplete: no dataset, bbox")],
    ids=["bbox", "dataset-and-bbox"],
)
def test_a_null_bbox_is_listed_missing_like_an_absent_one(tmp_path, drop, reason):
    """Not written yet (null, or absent) is 'missing'; a wrong type is an error (above)."""
    record = json.loads(_det(bbox=None))
    for key in drop:
        del record[key]
    _project(tmp_path, "eval_det", json.dumps(record).encode())
    report = _build(tmp_path)
    assert {m.path: m.reason for m in report.missing}["metrics/eval_det/mask_rcnn-resnet18-seed0.json"] == reason


# --- the real command line --------------------------------------------------------------------------

CORRECT = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]


def _cli_project(root: Path) -> ProjectPaths:
    params = Params.model_validate({
        "profile": "embedded", "seeds": [0], "models": ["resnet18", "sge_resnet18"],
        "detection": {"faster_rcnn": ["resnet18", "sge_resnet18"], "retinanet": []},
        "report": {"bootstrap_samples": 100},
    })
    (root / "params.yaml").write_text(dump_params(params))
    for model in ("resnet18", "sge_resnet18"):
        write_cls(root, model, 0, "embedded", top1=60.0, top5=100.0, correct=CORRECT)
        write_det(root, "faster_rcnn", model, 0, "embedded", 20.0)
    return ProjectPaths(root)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


CLI_FAULTS = [
    ("metrics/eval_cls/sge_resnet18-seed0.json", b'\xff\xfe{"top1": 1}', "not UTF-8 text", None),
    ("metrics/eval_det/faster_rcnn-sge_resnet18-seed0.json",
     _det(detector="faster_rcnn", backbone="sge_resnet18", flags="abc"), "should be an object", "flags"),
    ("metrics/eval_cls/resnet18-seed0.json",
     _raw(f'{{"model": "resnet18", "dataset": "embedded", "top1": {BIG}, "top5": 100.0}}'), "finite", "top1"),
    ("plots/train_cls/resnet18-seed0.tsv", bytes(range(256)) * 4, "not UTF-8|binary", None),
    ("runs/eval_cls/sge_resnet18-seed0.json", '{"files": ["\u00e9"]}'.encode("latin-1"), "not UTF-8 text", None),
    ("metrics/train_cls/resnet18-seed0.json", b'{"dataset": ["embedded"]}', "should be a string", "dataset"),
    ("runs/visualize/sge_resnet18-seed0/activation_stats.json", b'{"groups": [{"variance_before": "x"}]}',
     "should be a number", "groups.0.variance_before"),
]


@pytest.mark.parametrize("target, content, reason, key", CLI_FAULTS, ids=_id)
def test_sge_repro_report_exits_2_with_one_line_and_writes_nothing(tmp_path, sge_repro_bin, target, content, reason,
                                                                   key):
    paths = _cli_project(tmp_path)
    (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / target).write_bytes(content)
    before = _snapshot(tmp_path)
    result = subprocess.run([sge_repro_bin, "report"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {target}: "), lines[0]
    assert re.search(reason, lines[0]), lines[0]
    if key is not None:
        assert f"key '{key}'" in lines[0]
    assert not paths.reports.exists() and not paths.report_metrics.exists()
    assert _snapshot(tmp_path) == before
