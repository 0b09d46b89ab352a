"""The ImageFolder loader that real ImageNet and the embedded set both go through.

Layout: root/train/<class>/<image>, root/val/<class>/<image>, the same class folders in both.
Every image decodes to RGB (grayscale, CMYK, palette, 16-bit, PNG bytes in a .JPEG file);
a corrupt or truncated image raises UserError naming the file, or, with skip_corrupt, is
skipped and counted. The pipeline builds datasets from the data stage's manifest
(`open_imagefolder(data/manifests/cls.json, ...)`); a folder works too, for one-off use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from sge_repro.data.manifest import SPLITS, imagefolder_samples, is_manifest, read_manifest, split_subset
from sge_repro.errors import UserError, preview

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any supported image file as an 8-bit RGB PIL image; UserError naming it if corrupt.

    PIL identifies the format from the bytes, so a PNG saved as .JPEG (a few exist in ImageNet)
    decodes fine. `load()` forces the full decode so truncation is caught here, not later.
    """
    try:
        return _decode_rgb(path)
    except _DECODE_ERRORS as error:
        raise UserError(f"{path}: corrupt or unreadable image ({_one_line(error)}); "
                        "expected a decodable image file (or set data.skip_corrupt)") from error


def decode_error(path: str | os.PathLike) -> str | None:
    """Why `path` does not decode as `decode_rgb` decodes it (one line), or None when it does."""
    try:
        _decode_rgb(path)
    except _DECODE_ERRORS as error:
        return _one_line(error)
    return None


_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


def _decode_rgb(path: str | os.PathLike) -> Image.Image:
    with warnings.catch_warnings():
        # A truncated file must fail, not decode half grey.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the used range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        gray = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = values.max() - values.min() if values.size else 0.0
        scaled = (values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL knows the conversion.
    return image.convert("RGB")


def _list_images(folder: Path) -> list[Path]:
    # scandir reads the file type from the directory entry: no stat per file (1.28M in ImageNet).
    with os.scandir(folder) as entries:
        names = [entry.name for entry in entries
                 if entry.is_file() and not entry.name.startswith(".")
                 and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS]
    return [folder / name for name in sorted(names)]


def list_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_same_classes(root: Path, train: Sequence[str], val: Sequence[str]) -> None:
    """UserError naming `root` unless train/ and val/ hold the same class folders."""
    if list(train) != list(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise UserError(f"{root}: train/ and val/ class folders differ (only in train: "
                        f"{preview(only_train)}; only in val: {preview(only_val)}); expected the same classes")


def check_layout(root: str | os.PathLike, expected_classes: Sequence[str] | None = None) -> list[str]:
    """Validate root/{train,val}/<class>/ and return the sorted class list (UserError otherwise)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found; expected an ImageFolder tree with train/ and val/")
    classes_by_split = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise UserError(f"{split_dir}: missing; expected {split}/<class>/<image> under {root}")
        classes = list_classes(split_dir)
        if not classes:
            raise UserError(f"{split_dir}: no class folders; expected {split}/<class>/<image>")
        for name in classes:
            if not _list_images(split_dir / name):
                raise UserError(f"{split_dir / name}: empty class folder; expected at least one image "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        classes_by_split[split] = classes
    train, val = classes_by_split["train"], classes_by_split["val"]
    check_same_classes(root, train, val)
    if expected_classes is not None:
        expected = sorted(expected_classes)
        if train != expected:
            missing = sorted(set(expected) - set(train))
            extra = sorted(set(train) - set(expected))
            raise UserError(f"{root}: class folders do not match the expected {len(expected)} classes "
                            f"(missing: {preview(missing)}; extra: {preview(extra)})")
    return train


@dataclass
class ImageFolderDataset:
    """(image tensor, class index) pairs of one split, in a fixed sorted order.

    `skipped` lists the files the data stage found corrupt and left out. A file that
    fails later, at load time, raises UserError, or with skip_corrupt yields None, which
    `collate_skipping_none` drops and counts.
    """

    root: Path
    split: str
    classes: list[str]
    samples: list[tuple[Path, int]]
    transform: Callable | None = None
    skip_corrupt: bool = False
    skipped: list[Path] = field(default_factory=list)
    # the split's size when `samples` is the manifest's evenly spaced subset of it (else None)
    subset_of: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            # A transform that decodes for itself (classification/transforms.py: uint8 tensors) says how.
            image = getattr(self.transform, "decode", decode_rgb)(path)
        except UserError:
            if self.skip_corrupt:
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    @property
    def file_names(self) -> list[str]:
        """Paths relative to the split folder, e.g. n01440764/x.JPEG."""
        return [f"{path.parent.name}/{path.name}" for path, _ in self.samples]


def open_imagefolder(data: str | os.PathLike, split: str, transform: Callable | None = None,
                     expected_classes: Sequence[str] | None = None, skip_corrupt: bool = False) -> ImageFolderDataset:
    """The dataset of one split from `data`: a dataset manifest (data/manifests/cls.json, what the
    pipeline passes: no directory walk) or an ImageFolder folder (walked; for one-off use)."""
    if is_manifest(data):
        return imagefolder_from_manifest(data, split, transform, expected_classes, skip_corrupt)
    return build_imagefolder(data, split, transform, expected_classes, skip_corrupt)


def imagefolder_from_manifest(manifest_path: str | os.PathLike, split: str, transform: Callable | None = None,
                              expected_classes: Sequence[str] | None = None,
                              skip_corrupt: bool = False) -> ImageFolderDataset:
    """The dataset of one split as the data stage indexed it: the files of the manifest (its subset
    of the split, when it records one), nothing re-verified (the data stage decoded each once); its
    corrupt files are in `.skipped`."""
    manifest = read_manifest(manifest_path, "classification")
    root, classes, samples, corrupt = imagefolder_samples(manifest, split)
    subset_of = manifest["counts"][split] if split_subset(manifest, split) is not None else None
    if expected_classes is not None and classes != sorted(expected_classes):
        expected = sorted(expected_classes)
        raise UserError(f"{manifest_path}: classes do not match the expected {len(expected)} classes "
                        f"(missing: {preview(sorted(set(expected) - set(classes)))}; "
                        f"extra: {preview(sorted(set(classes) - set(expected)))})")
    return ImageFolderDataset(root=root, split=split, classes=classes, samples=samples, transform=transform,
                              skip_corrupt=skip_corrupt, skipped=corrupt, subset_of=subset_of)


def build_imagefolder(root: str | os.PathLike, split: str, transform: Callable | None = None,
                      expected_classes: Sequence[str] | None = None, skip_corrupt: bool = False) -> ImageFolderDataset:
    """The dataset of root/<split>/ after validating the layout of both splits (a directory walk).

    No file is decoded here: the pipeline's data stage verifies each image once
    (`sge_repro.data.verify`); a file that fails at load time raises UserError naming it, or with
    skip_corrupt yields None (dropped and counted by `collate_skipping_none`).
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    classes = check_layout(root, expected_classes)
    samples = [(path, class_index) for class_index, name in enumerate(classes)
               for path in _list_images(root / split / name)]
    return ImageFolderDataset(root=root, split=split, classes=classes, samples=samples, transform=transform,
                              skip_corrupt=skip_corrupt)


def collate_skipping_none(batch):
    """Default collation of the samples that loaded; returns (images, targets, num_skipped)."""
    loaded = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(loaded)
    if not loaded:
        return None, None, skipped
    images, targets = default_collate(loaded)
    return images, targets, skipped
