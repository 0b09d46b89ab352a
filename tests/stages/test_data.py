"""The `data` stage: manifests of the embedded sets and of real-format sources read in place,
verification once (only new / changed files decoded), corrupt files named or skipped."""

import json
import os
import shutil
from pathlib import Path

import pytest

from sge_repro.data.imagefolder import build_imagefolder, imagefolder_from_manifest
from sge_repro.data.imagefolder import open_imagefolder
from sge_repro.data.manifest import evenly_spaced, imagefolder_samples, read_manifest, serialize
from sge_repro.data.prepare import pending_changes, prepare_data
from sge_repro.data.synthetic import generate_classification_set, generate_detection_set
from sge_repro.data.verify import IN_PROCESS_BELOW, SCAN_IN_PROCESS_BELOW, VerifyCache, scan, verify
from sge_repro.errors import UserError
from sge_repro.params import Params
from sge_repro.paths import ProjectPaths


def small_params(**data_changes) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"]["classification"].update(num_classes=3, image_size=32, train_per_class=4, val_per_class=2)
    raw["data"]["detection"].update(num_train=3, num_val=2, image_size=64, num_categories=2)
    for key, value in data_changes.items():
        section, _, name = key.partition("__")
        if name:
            raw["data"][section][name] = value
        else:
            raw["data"][key] = value
    return Params.model_validate(raw)


@pytest.fixture
def project(tmp_path):
    paths = ProjectPaths(tmp_path / "project")
    prepare_data(small_params().data, paths, workers=1)
    return paths


def state(paths: ProjectPaths) -> dict:
    """(bytes, mtime_ns) of both manifests."""
    return {name: (paths.manifest(name).read_bytes(), paths.manifest(name).stat().st_mtime_ns)
            for name in ("cls", "det")}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_manifests_index_the_generated_sets(project):
    cls = read_manifest(project.cls_manifest, "classification")
    assert cls["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert cls["counts"]["train"] == 12 and cls["counts"]["val"] == 6 and cls["corrupt"] == []
    assert cls["root"] == "../cls"   # relative: the project can move
    det = read_manifest(project.det_manifest, "detection")
    assert det["counts"]["train"] == 3 and det["counts"]["val"] == 2
    assert set(det["annotations"]) == {"train", "val"} and len(det["annotations"]["val"]["sha256"]) == 64
    # the loader's file list is the manifest's, in the order of a sorted folder walk
    from_manifest = imagefolder_from_manifest(project.cls_manifest, "train")
    walked = build_imagefolder(project.cls_data, "train")
    assert from_manifest.samples == walked.samples and from_manifest.classes == walked.classes


def test_a_rerun_decodes_nothing_and_leaves_the_manifests_untouched(project):
    before = state(project)
    summary = prepare_data(small_params().data, project, workers=1)
    assert summary["classification"]["decoded"] == 0 and summary["detection"]["decoded"] == 0
    assert summary["classification"]["manifest"] == "unchanged"
    assert state(project) == before
    assert pending_changes(small_params().data, project) == {"cls": None, "det": None}
    # a manifest edited behind the stage's back is rebuilt, even though no image changed
    project.cls_manifest.write_text(project.cls_manifest.read_text().replace('"val": 6', '"val": 7'))
    assert pending_changes(small_params().data, project) == {"cls": "manifest content changed", "det": None}
    prepare_data(small_params().data, project, workers=1)
    assert project.cls_manifest.read_bytes() == before["cls"][0]


def test_the_same_content_gives_the_same_bytes_anywhere(project, tmp_path):
    """Another project generating the same set, verified without the cache: identical bytes."""
    other = ProjectPaths(tmp_path / "other")
    prepare_data(small_params().data, other, workers=1)
    assert other.cls_manifest.read_bytes() == project.cls_manifest.read_bytes()
    assert other.det_manifest.read_bytes() == project.det_manifest.read_bytes()


def test_changed_added_removed_image_change_only_their_manifest(project):
    params = small_params().data
    images = sorted((project.cls_data / "train" / "n00000001").iterdir())
    fingerprints = [read_manifest(project.cls_manifest)["fingerprint"]]
    det_before = state(project)["det"]

    images[0].write_bytes(images[1].read_bytes())                       # changed content
    assert pending_changes(params, project) == {"cls": "1 new or changed file(s) to verify", "det": None}
    summary = prepare_data(params, project, workers=1)
    assert summary["classification"]["decoded"] == 1 and summary["classification"]["manifest"] == "written"
    fingerprints.append(read_manifest(project.cls_manifest)["fingerprint"])

    shutil.copy(images[2], images[2].with_name("added.jpg"))            # added
    summary = prepare_data(params, project, workers=1)
    assert summary["classification"]["decoded"] == 1 and summary["classification"]["train"] == 13
    fingerprints.append(read_manifest(project.cls_manifest)["fingerprint"])

    images[3].unlink()                                                  # removed
    summary = prepare_data(params, project, workers=1)
    assert summary["classification"]["decoded"] == 0 and summary["classification"]["train"] == 12
    fingerprints.append(read_manifest(project.cls_manifest)["fingerprint"])

    assert len(set(fingerprints)) == 4
    assert state(project)["det"] == det_before                          # the other dataset: untouched


def test_a_touched_but_unchanged_file_is_decoded_again_without_changing_the_manifest(project):
    before = state(project)
    image = sorted((project.det_data / "val").iterdir())[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    summary = prepare_data(small_params().data, project, workers=1)
    assert summary["detection"]["decoded"] == 1
    assert state(project) == before


def test_a_corrupt_image_is_named_and_nothing_written(project):
    before = state(project)
    bad = sorted((project.cls_data / "val" / "n00000002").iterdir())[0]
    truncate(bad)
    with pytest.raises(UserError) as error:
        prepare_data(small_params().data, project, workers=1)
    message = str(error.value)
    assert "1 corrupt image(s)" in message and str(bad) in message and "data.skip_corrupt" in message
    assert "\n" not in message
    assert state(project) == before


def test_skip_corrupt_leaves_the_file_out_and_lists_it(project):
    bad = sorted((project.cls_data / "train" / "n00000000").iterdir())[1]
    truncate(bad)
    with pytest.raises(UserError):
        prepare_data(small_params().data, project, workers=1)
    # the failed run's decode is cached: the rerun with skip_corrupt decodes nothing again
    summary = prepare_data(small_params(skip_corrupt=True).data, project, workers=1)
    assert summary["classification"]["decoded"] == 0 and summary["classification"]["corrupt"] == 1
    manifest = read_manifest(project.cls_manifest)
    assert [item["file"] for item in manifest["corrupt"]] == [f"train/n00000000/{bad.name}"]
    assert manifest["counts"]["train"] == 11
    dataset = imagefolder_from_manifest(project.cls_manifest, "train")
    assert len(dataset) == 11 and dataset.skipped == [bad] and bad not in [p for p, _ in dataset.samples]
    with pytest.raises(UserError, match=bad.name):   # skip_corrupt off again: named again
        prepare_data(small_params().data, project, workers=1)


def test_params_change_regenerates_only_that_set(project):
    cls_before = state(project)["cls"]
    summary = prepare_data(small_params(detection__num_train=4).data, project, workers=1)
    assert summary["detection"]["train"] == 4
    assert state(project)["cls"] == cls_before


def subset_params(max_train: int | None, max_val: int | None) -> Params:
    return small_params(classification__max_train_images=max_train, classification__max_val_images=max_val)


def test_evenly_spaced_picks_floor_i_n_over_k():
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly_spaced(list(range(3)), 3) == evenly_spaced(list(range(3)), 7) == [0, 1, 2]
    # 1000 classes of 50 sorted samples, 1000 picked: one of every class
    samples = [(f"n{c:04d}/{i}.JPEG", c) for c in range(1000) for i in range(50)]
    assert [label for _, label in evenly_spaced(samples, 1000)] == list(range(1000))


def test_a_subset_is_evenly_spaced_recorded_beside_the_full_index_and_the_same_for_every_reader(project, tmp_path):
    full = {split: imagefolder_from_manifest(project.cls_manifest, split).samples for split in ("train", "val")}
    before = read_manifest(project.cls_manifest)
    summary = prepare_data(subset_params(5, 4).data, project, workers=1)
    assert summary["classification"]["decoded"] == 0 and summary["classification"]["manifest"] == "written"

    manifest = read_manifest(project.cls_manifest)
    assert manifest["subset"] == {"train": 5, "val": 4}
    # the full verified index is kept: counts, folders, corrupt and fingerprint as without a subset
    assert {key: manifest[key] for key in ("classes", "counts", "fingerprint", "corrupt", "folders")} == \
        {key: before[key] for key in ("classes", "counts", "fingerprint", "corrupt", "folders")}

    train = imagefolder_from_manifest(project.cls_manifest, "train")
    assert train.samples == [full["train"][i] for i in (0, 2, 4, 7, 9)]   # floor(i * 12 / 5)
    assert train.subset_of == 12 and train.classes == before["classes"]
    val = open_imagefolder(project.cls_manifest, "val")                  # what train / eval / the report open
    assert val.samples == [full["val"][i] for i in (0, 1, 3, 4)]          # floor(i * 6 / 4): every class
    assert {label for _, label in val.samples} == {0, 1, 2} and val.subset_of == 6
    assert imagefolder_samples(read_manifest(project.cls_manifest), "val")[2] == val.samples   # visualize

    other = ProjectPaths(tmp_path / "other")   # the same params elsewhere: the same bytes
    prepare_data(subset_params(5, 4).data, other, workers=1)
    assert other.cls_manifest.read_bytes() == project.cls_manifest.read_bytes()


def test_a_max_at_or_above_the_split_size_is_the_whole_split(project):
    before = state(project)
    summary = prepare_data(subset_params(12, 100).data, project, workers=1)
    assert summary["classification"]["manifest"] == "unchanged" and state(project) == before
    assert "subset" not in read_manifest(project.cls_manifest)
    dataset = imagefolder_from_manifest(project.cls_manifest, "val")
    assert len(dataset) == 6 and dataset.subset_of is None


def test_the_manifest_changes_exactly_when_the_subset_changes(project):
    default = state(project)
    params = subset_params(None, 2).data
    assert pending_changes(params, project) == {"cls": "manifest content changed", "det": None}
    assert prepare_data(params, project, workers=1)["classification"]["manifest"] == "written"
    cut = state(project)
    assert cut["cls"][0] != default["cls"][0] and cut["det"] == default["det"]

    summary = prepare_data(params, project, workers=1)            # the same max: untouched
    assert summary["classification"]["decoded"] == 0 and state(project) == cut
    assert pending_changes(params, project) == {"cls": None, "det": None}

    prepare_data(subset_params(None, 3).data, project, workers=1)  # another max: another manifest
    assert read_manifest(project.cls_manifest)["subset"] == {"val": 3}
    prepare_data(subset_params(None, None).data, project, workers=1)  # none again: the default bytes
    assert project.cls_manifest.read_bytes() == default["cls"][0]


def test_pool_verification_names_corrupt_files(tmp_path):
    """More files than IN_PROCESS_BELOW: decoded in a 2-process pool, each once."""
    root = tmp_path / "cls"
    per_class = IN_PROCESS_BELOW // 2 + 1
    generate_classification_set(root, num_classes=2, image_size=16, train_per_class=per_class, val_per_class=1, seed=3)
    bad = root / "train" / "n00000001" / "train_0001_000004.jpg"
    bad.write_bytes(b"GIF89a not really")
    folders = {f"{split}/n0000000{k}": None for split in ("train", "val") for k in (0, 1)}
    cache = VerifyCache(tmp_path / "cache.json", root)
    results, decoded = verify(root, scan(root, folders, (".jpg",)), cache, workers=2)
    assert decoded == 2 * per_class + 2
    assert set(results["train/n00000001"].errors) == {bad.name}
    assert all(d and len(d) == 32 for r in results.values() for d in r.digests)
    again = VerifyCache(tmp_path / "cache.json", root)   # from disk
    _, decoded = verify(root, scan(root, folders, (".jpg",)), again, workers=2)
    assert decoded == 0


def test_a_pool_scan_lists_what_an_in_process_scan_lists(tmp_path):
    """Enough folders for the process pool: the same names, sizes and mtimes in the same order as
    one process; hidden files, other extensions and folders named like images are left out,
    symlinked files are followed, a `wanted` set keeps only its names."""
    root = tmp_path / "tree"
    folders: dict[str, set[str] | None] = {}
    for k in range(SCAN_IN_PROCESS_BELOW + 3):
        folder = root / f"c{k:03d}"
        folder.mkdir(parents=True)
        for i in range(k % 4 + 1):
            (folder / f"img{i}.JPG").write_bytes(b"x" * (k * 10 + i))
        (folder / ".hidden.jpg").write_bytes(b"h")
        (folder / "notes.txt").write_bytes(b"t")
        (folder / "dir.jpg").mkdir()
        folders[folder.name] = None
    (root / "c000" / "linked.jpg").symlink_to(root / "c001" / "img0.JPG")
    folders["c002"] = {"img1.JPG", "img9.JPG"}
    pooled = scan(root, folders, (".jpg",), workers=2)
    alone = scan(root, folders, (".jpg",), workers=1)
    assert list(pooled) == sorted(folders) == list(alone)
    assert {rel: vars(found) for rel, found in pooled.items()} == {rel: vars(found) for rel, found in alone.items()}
    assert pooled["c000"].names == ["img0.JPG", "linked.jpg"]
    assert pooled["c000"].sizes == [0, 10]
    assert pooled["c002"].names == ["img1.JPG"] and pooled["c003"].names == [f"img{i}.JPG" for i in range(4)]
    assert pooled["c005"].mtimes == [(root / "c005" / f"img{i}.JPG").stat().st_mtime_ns for i in range(2)]
    assert scan(root, {}, (".jpg",)) == {}   # no folders: nothing to divide among workers


# ------------------------------------------------------------------ real-format sources, in place


def imagenet_like_tree(root: Path) -> list[str]:
    generate_classification_set(root, num_classes=3, image_size=32, train_per_class=2, val_per_class=1, seed=0)
    return sorted(p.name for p in (root / "train").iterdir())


def coco2017_like_root(root: Path) -> Path:
    generated = root.parent / "generated"
    generate_detection_set(generated, num_train=3, num_val=2, image_size=64, num_categories=2, seed=0)
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(generated / split, root / f"{split}2017")
        shutil.copy(generated / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{split}2017.json")
    return root


def real_params(imagenet: Path, coco: Path, subset: list[str] | None) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"]["classification"].update(source="imagenet", source_path=str(imagenet), subset_classes=subset)
    raw["data"]["detection"].update(source="coco", source_path=str(coco))
    return Params.model_validate(raw)


def test_data_stage_indexes_imagenet_and_coco_in_place(tmp_path):
    classes = imagenet_like_tree(tmp_path / "imagenet")
    coco = coco2017_like_root(tmp_path / "coco")
    paths = ProjectPaths(tmp_path / "project")
    summary = prepare_data(real_params(tmp_path / "imagenet", coco, classes[:2]).data, paths, workers=1)

    assert summary["classification"]["source"] == "imagenet"
    assert summary["classification"]["train"] == 4 and summary["classification"]["val"] == 2
    cls = read_manifest(paths.cls_manifest)
    assert cls["root"] == str((tmp_path / "imagenet").resolve()) and cls["classes"] == classes[:2]
    assert not paths.cls_data.exists()   # nothing copied or linked into the project
    det = read_manifest(paths.det_manifest)
    assert det["layout"] == "coco2017" and det["counts"]["val"] == 2
    assert det["annotations"]["val"]["file"] == "annotations/instances_val2017.json"
    assert sorted(det["folders"]) == ["train2017", "val2017"]
    assert json.loads(serialize({k: v for k, v in det.items() if k != "_path"})) == \
        {k: v for k, v in det.items() if k != "_path"}


def test_a_copy_of_the_project_reuses_the_verification_of_datasets_read_in_place(tmp_path, monkeypatch):
    """DVC's queued experiments run in a temporary copy of the project, without data/.cache: the
    verification of a dataset read in place is kept in the user cache under its root, so a copy
    decodes nothing, and a cache an older version kept in data/.cache is still used."""
    monkeypatch.setenv("SGE_REPRO_CACHE", str(tmp_path / "user-cache"))
    classes = imagenet_like_tree(tmp_path / "imagenet")
    data = real_params(tmp_path / "imagenet", coco2017_like_root(tmp_path / "coco"), classes).data
    project = ProjectPaths(tmp_path / "project")
    first = prepare_data(data, project, workers=1)
    assert first["classification"]["decoded"] == 9 and first["detection"]["decoded"] == 5
    shared = {name: project.verify_cache(name, tmp_path / source) for name, source in (("cls", "imagenet"), ("det", "coco"))}
    assert all(path.parent == tmp_path / "user-cache" / "verified" and path.is_file() for path in shared.values())
    assert not project.verify_cache("cls").exists()  # nothing of it in the project

    copy = ProjectPaths(tmp_path / "queued-copy")
    second = prepare_data(data, copy, workers=1)
    assert second["classification"]["decoded"] == 0 and second["detection"]["decoded"] == 0
    assert copy.cls_manifest.read_bytes() == project.cls_manifest.read_bytes()
    assert copy.det_manifest.read_bytes() == project.det_manifest.read_bytes()

    older = ProjectPaths(tmp_path / "verified-by-an-older-version")
    for name, path in shared.items():
        older.verify_cache(name).parent.mkdir(parents=True, exist_ok=True)
        path.replace(older.verify_cache(name))
    third = prepare_data(data, older, workers=1)
    assert third["classification"]["decoded"] == 0 and third["detection"]["decoded"] == 0
    assert all(path.is_file() for path in shared.values())  # saved in the new place


def test_an_unwritable_user_cache_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SGE_REPRO_CACHE", str(blocker))
    classes = imagenet_like_tree(tmp_path / "imagenet")
    data = real_params(tmp_path / "imagenet", coco2017_like_root(tmp_path / "coco"), classes).data
    project = ProjectPaths(tmp_path / "project")
    with caplog.at_level("WARNING", logger="sge_repro.data.verify"):
        summary = prepare_data(data, project, workers=1)
    assert summary["classification"]["train"] == 6 and read_manifest(project.cls_manifest)["classes"] == classes
    assert "cannot save the verification cache" in caplog.text and "SGE_REPRO_CACHE" in caplog.text


def test_archives_as_source_path_point_at_data_prepare_imagenet(tmp_path):
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "ILSVRC2012_img_train.tar").write_bytes(b"")
    coco = coco2017_like_root(tmp_path / "coco")
    with pytest.raises(UserError, match=r"holds the ImageNet archives; unpack them once with "
                                        r"`sge-repro data prepare imagenet --source .*archives --destination DIR`"):
        prepare_data(real_params(tmp_path / "archives", coco, None).data, ProjectPaths(tmp_path / "project"))


def test_data_stage_refuses_a_broken_coco_root(tmp_path):
    classes = imagenet_like_tree(tmp_path / "imagenet")
    coco = coco2017_like_root(tmp_path / "coco")
    (coco / "annotations" / "instances_val2017.json").write_text("{not json")
    paths = ProjectPaths(tmp_path / "project")
    with pytest.raises(UserError, match="instances_val2017.json"):
        prepare_data(real_params(tmp_path / "imagenet", coco, classes).data, paths, workers=1)
    assert not paths.manifests.exists()


def test_a_listed_coco_image_missing_is_named(tmp_path):
    classes = imagenet_like_tree(tmp_path / "imagenet")
    coco = coco2017_like_root(tmp_path / "coco")
    (coco / "val2017" / "val_000001.jpg").unlink()
    with pytest.raises(UserError, match=r"1 image\(s\) listed in the annotations are missing \(val2017/val_000001.jpg\)"):
        prepare_data(real_params(tmp_path / "imagenet", coco, classes).data, ProjectPaths(tmp_path / "p"), workers=1)


def test_data_stage_names_a_missing_source_path(tmp_path):
    params = real_params(tmp_path / "nowhere", tmp_path / "coco", None)
    with pytest.raises(UserError, match=r"data.classification.source_path: .*nowhere does not exist"):
        prepare_data(params.data, ProjectPaths(tmp_path / "project"))


def test_a_missing_or_foreign_manifest_is_named(tmp_path):
    with pytest.raises(UserError, match=r"cls.json: missing; run the data stage first"):
        imagefolder_from_manifest(tmp_path / "cls.json", "train")
    (tmp_path / "cls.json").write_text('{"format": 1}')
    with pytest.raises(UserError, match=r"cls.json: not a dataset manifest \(lacks kind, root"):
        imagefolder_from_manifest(tmp_path / "cls.json", "train")


def test_a_rescan_that_changes_nothing_keeps_the_status_record_of_the_run_that_wrote_the_manifests(tmp_path):
    from sge_repro.stage_status import read_status
    from sge_repro.stages.data import data

    paths = ProjectPaths(tmp_path / "project")
    data(small_params(), paths)
    record = paths.stage_status("data").read_bytes()
    assert read_status(paths.stage_status("data"))["state"] == "done"
    data(small_params(), paths)  # what every `dvc repro` does (always_changed): nothing new
    assert paths.stage_status("data").read_bytes() == record
    truncate(next(iter(sorted((paths.cls_data / "train").rglob("*.jpg")))))
    data(small_params(skip_corrupt=True), paths)  # a manifest rewritten: this run's record
    assert paths.stage_status("data").read_bytes() != record
    assert read_status(paths.stage_status("data"))["state"] == "done"


def test_a_width_by_height_size_reaches_the_generated_sets(tmp_path):
    """data.*.image_size [W, H] in params -> generator -> manifests (a rerun keeps the sets)."""
    from PIL import Image

    paths = ProjectPaths(tmp_path / "project")
    data = small_params(classification__image_size=[40, 24], detection__image_size=[96, 64]).data
    prepare_data(data, paths, workers=1)   # checks each JPEG's size against the COCO JSON
    assert pending_changes(data, paths) == {"cls": None, "det": None}
    coco = json.loads((paths.det_data / "annotations" / "instances_train.json").read_text())
    assert {(image["width"], image["height"]) for image in coco["images"]} == {(96, 64)}
    with Image.open(next(iter(sorted(paths.cls_data.rglob("*.jpg"))))) as image:
        assert image.size == (40, 24)
