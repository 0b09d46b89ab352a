"""The uint8 loader path: decoders, train / eval transforms, the device-side normalisation, and
which runs it lets resume."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from benchmarks.loader import photo_like_image
from float_compare import relative_error
from sge_repro.classification.checkpoint import recipe_fingerprint
from sge_repro.classification.sampling import resolve_workers
from sge_repro.classification.transforms import (IMAGENET_MEAN, IMAGENET_STD, decode_tensor, eval_resize_size,
                                                 eval_transform, to_model_input, train_transform)
from sge_repro.errors import UserError
from sge_repro.params_sections import EvalClsParams, TrainClsParams

CPU = torch.device("cpu")


def float_reference(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """torchvision's float path on a uint8 CHW tensor or PIL image: ToTensor + Normalize."""
    pil = image if isinstance(image, Image.Image) else T.functional.to_pil_image(image)
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pil))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Photo-like JPEGs of a few shapes (quality 90, as the generated and ImageNet sets)."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate([(160, 120), (120, 160), (150, 150), (200, 90)] * 2):
        path = folder / f"{index}.JPEG"
        Image.fromarray(photo_like_image(rng, width, height)).save(path, quality=90)
        paths.append(path)
    return paths


def old_train_pipeline(size):
    """The float pipeline every run used before the uint8 batches (torchvision's recipe)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def old_eval_pipeline(size):
    return T.Compose([T.Resize(eval_resize_size(size), antialias=True), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def sample(transform, path, seed):
    torch.manual_seed(seed)
    return transform(transform.decode(path))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pil_decoder_is_the_old_float_pipeline_bit_for_bit(jpegs, channels_last):
    # decoder "pil" + to_model_input = what runs before this change computed (so they resume unchanged).
    for seed, path in enumerate(jpegs):
        torch.manual_seed(seed)
        expected = old_train_pipeline(64)(Image.open(path).convert("RGB"))
        uint8 = sample(train_transform(64, decoder="pil"), path, seed)
        assert uint8.dtype == torch.uint8 and uint8.shape == (3, 64, 64)
        batch = to_model_input(uint8[None], CPU, channels_last)
        assert torch.equal(batch[0], expected)
        assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        expected_eval = old_eval_pipeline(64)(Image.open(path).convert("RGB"))
        assert torch.equal(to_model_input(eval_transform(64, decoder="pil")(Image.open(path))[None], CPU)[0],
                           expected_eval)


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_uint8_path_equals_the_float_path_after_normalisation(jpegs, decoder):
    # The same uint8 crop normalised by ToTensor + Normalize (in the worker, as before) and by
    # to_model_input (on the device): the same float32 operations in the same order, so equal;
    # 1e-6 norm-wise is the bound (a reordering would be ~1e-7 here).
    transform = train_transform(48, decoder=decoder)
    for seed, path in enumerate(jpegs):
        uint8 = sample(transform, path, seed)
        device_side = to_model_input(uint8[None], CPU, channels_last=seed % 2 == 1)[0]
        assert relative_error(device_side, float_reference(uint8)) <= 1e-6
        assert torch.equal(device_side, float_reference(uint8))  # and in fact bit for bit


def test_both_decoders_draw_the_same_crop_and_flip(jpegs):
    # Same seed -> same crop box and flip; the decoded pixels are equal and only the resize
    # rounds differently (torch's uint8 antialiased bilinear vs PIL's): a level or two on a few
    # values, where a different crop or flip would move most values by tens of levels.
    # Measured on these images: max 2 levels, mean 0.016 levels, norm-wise <= 1.6e-3 after
    # normalisation (on 500x375 photo-like JPEGs cropped to 224: <= 7.8e-3).
    for seed, path in enumerate(jpegs):
        by_pil = sample(train_transform(64, decoder="pil"), path, seed).int()
        by_torchvision = sample(train_transform(64, decoder="torchvision"), path, seed).int()
        difference = (by_pil - by_torchvision).abs()
        assert difference.max() <= 2 and difference.float().mean() <= 0.05
        assert relative_error(to_model_input(by_torchvision.byte()[None], CPU),
                              to_model_input(by_pil.byte()[None], CPU)) <= 1e-2
        eval_pil = eval_transform(64, decoder="pil")(Image.open(path)).int()
        eval_torchvision = sample(eval_transform(64, decoder="torchvision"), path, seed).int()
        difference = (eval_pil - eval_torchvision).abs()
        assert difference.max() <= 2 and difference.float().mean() <= 0.05


def encoded(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["rgb", "progressive", "gray", "cmyk", "png_named_jpeg", "trailing_bytes"])
def test_decode_tensor_equals_pil_for_every_kind_of_file(tmp_path, case):
    rgb = Image.fromarray(photo_like_image(np.random.default_rng(1), 64, 48))
    data = {
        "rgb": lambda: encoded(rgb, "JPEG", quality=90),
        "progressive": lambda: encoded(rgb, "JPEG", quality=90, progressive=True),
        "gray": lambda: encoded(rgb.convert("L"), "JPEG", quality=90),
        "cmyk": lambda: encoded(rgb.convert("CMYK"), "JPEG", quality=90),  # goes to PIL: its CMYK conversion
        "png_named_jpeg": lambda: encoded(rgb, "PNG"),
        "trailing_bytes": lambda: encoded(rgb, "JPEG", quality=90) + b"camera padding",
    }[case]()
    path = tmp_path / "image.JPEG"
    path.write_bytes(data)
    decoded = decode_tensor(path)
    with Image.open(path) as image:
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_decode_tensor_names_a_corrupt_file(tmp_path, damage):
    good = encoded(Image.fromarray(photo_like_image(np.random.default_rng(2), 64, 48)), "JPEG", quality=90)
    data = {"truncated": good[: len(good) // 2], "garbage": b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9",
            "empty": b""}[damage]
    path = tmp_path / "broken.JPEG"
    path.write_bytes(data)
    with pytest.raises(UserError, match="broken.JPEG"):
        decode_tensor(path)


def test_transform_sizes_and_inputs():
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    assert eval_resize_size(224) == 256
    for decoder in ("torchvision", "pil"):
        assert eval_transform(32, decoder=decoder)(image).shape == (3, 32, 32)
        torch.manual_seed(0)
        assert train_transform(32, min_scale=0.35, decoder=decoder)(image).shape == (3, 32, 32)
        # A uint8 tensor is accepted by either.
        assert eval_transform(16, decoder=decoder)(torch.full((3, 20, 24), 7, dtype=torch.uint8)).shape == (3, 16, 16)
    # Normalised with the ImageNet statistics, on the device.
    white = eval_transform(16)(Image.new("RGB", (16, 16), (255, 255, 255)))
    assert white.dtype == torch.uint8 and white.max() == 255
    value = to_model_input(white[None], CPU)[0, 0, 0, 0].item()
    assert value == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    with pytest.raises(ValueError, match="decoder='opencv'"):
        train_transform(32, decoder="opencv")


def test_to_model_input_moves_float_batches_and_refuses_other_dtypes():
    floats = torch.randn(2, 3, 8, 8)
    assert torch.equal(to_model_input(floats, CPU), floats)
    assert to_model_input(floats, CPU, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="torch.int16"):
        to_model_input(torch.zeros(1, 3, 4, 4, dtype=torch.int16), CPU)


def test_workers_auto_from_cores_and_local_processes(monkeypatch):
    import os

    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto") == max(0, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers("auto") == max(0, cores // 2 - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more processes than cores: load in-process
    assert resolve_workers("auto") == 0


def test_workers_auto_in_a_slurm_task_uses_the_tasks_own_cores(monkeypatch):
    """Under SLURM with task binding a task's affinity mask already holds only its own cores: it is
    not divided again by the tasks of the node (that gave 0 workers on an 8-GPU node)."""
    import os

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cores))
    assert resolve_workers("auto") == max(0, cores - 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(4 * cores))  # never more than the mask allows
    assert resolve_workers("auto") == max(0, cores - 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert resolve_workers("auto") == 0


def test_workers_and_decoder_params():
    for section in (TrainClsParams, EvalClsParams):
        assert section(workers="auto").workers == "auto" and section(workers=4).workers == 4
        assert section().decoder == "torchvision" and section(decoder="pil").decoder == "pil"
        for bad in ({"workers": -1}, {"workers": "many"}, {"workers": True}, {"workers": 2.0}, {"decoder": "cv2"}):
            with pytest.raises(Exception):
                section(**bad)


def test_runs_before_the_decoder_key_resume_with_decoder_pil():
    # A recipe saved before `decoder` existed has no such key: its fingerprint must equal that of
    # decoder "pil" (the same pipeline bit for bit), and differ from "torchvision" (other rounding).
    recipe = {**TrainClsParams().model_dump(mode="json"), "model": "resnet18", "seed": 0}
    old = {key: value for key, value in recipe.items() if key != "decoder"}
    assert recipe_fingerprint({**recipe, "decoder": "pil"}) == recipe_fingerprint(old)
    assert recipe_fingerprint({**recipe, "decoder": "torchvision"}) != recipe_fingerprint(old)
