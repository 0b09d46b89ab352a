"""Train and eval transforms of the ImageNet recipe, parameterised by the crop size, and the step
that turns their uint8 batches into the model's input on the device.

Train: RandomResizedCrop(size) + horizontal flip. Eval: resize the shorter side to
size * 256/224 (256 for 224), then center crop `size`. The loader workers only decode, crop and
resize to uint8 (a quarter of float32's bytes through shared memory and the host-to-device copy);
`to_model_input` normalises on the device, equal to torchvision's ToTensor + Normalize bit for bit.

`decoder`: "torchvision" (default) decodes JPEGs with libjpeg-turbo (the pixels equal PIL's) and
crops / resizes with torch's uint8 antialiased bilinear kernel (+-1 from PIL's resize in under 1 %
of the values); other files go through PIL's decode, then the same tensor ops. "pil" decodes,
crops and resizes with PIL, bit for bit the input of runs made before the option existed. Both
draw the crop and the flip in the same order: the same seed gives the same boxes and flips.
"""

from __future__ import annotations

import os
import warnings
from typing import get_args

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from sge_repro.classification.precision import memory_format
from sge_repro.data.imagefolder import decode_rgb
from sge_repro.params_sections import Decoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224
DEFAULT_MIN_SCALE = 0.08  # RandomResizedCrop's ImageNet default
# torchvision 0.29 deprecates its image decoders for TorchCodec's (torchcodec >= 0.16) and warns on every
# call; torchvision is pinned here, so the warning is said once, in README, instead of per image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
DECODERS = get_args(Decoder)  # ("torchvision", "pil"): params.yaml's train_cls.decoder / eval_cls.decoder


def eval_resize_size(image_size: int) -> int:
    return int(round(image_size * EVAL_RESIZE_RATIO))


def decode_tensor(path: str | os.PathLike) -> torch.Tensor:
    """The RGB pixels of an image file as a uint8 (3, H, W) tensor, equal to `decode_rgb`'s.

    A complete 8-bit RGB / grayscale JPEG (baseline or progressive) is decoded by libjpeg-turbo
    through torchvision; anything else (other formats, CMYK, a file without its end marker, one
    over PIL's decompression-bomb limit, one libjpeg-turbo refuses) by `decode_rgb`, which also
    names a corrupt file (UserError).
    """
    with open(path, "rb") as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        complete = file.readinto(data) == len(data)
    if complete and _plain_jpeg(data):
        try:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # decode_rgb below says what is wrong with it, or decodes what PIL can
    return F.pil_to_tensor(decode_rgb(path))


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic coded).
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _plain_jpeg(data: bytearray) -> bool:
    """JPEG start and end markers, a frame header of 8-bit samples with 1 or 3 components, and
    width * height within PIL's decompression-bomb limit (the markers are walked here, without
    decoding; anything unexpected answers False and goes to PIL)."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = (data[position + 2] << 8) | data[position + 3]
        if marker in _SOF_MARKERS:
            precision, components = data[position + 4], data[position + 9]
            height = (data[position + 5] << 8) | data[position + 6]
            width = (data[position + 7] << 8) | data[position + 8]
            limit = Image.MAX_IMAGE_PIXELS
            return (precision == 8 and components in (1, 3) and width * height > 0
                    and (limit is None or width * height <= limit))
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we know
            return False
        position += 2 + length
    return False


class _Preset:
    """A transform that also says how to decode a file for itself (`decode(path)`)."""

    decoder: Decoder

    def decode(self, path: str | os.PathLike):
        return decode_rgb(path) if self.decoder == "pil" else decode_tensor(path)

    def _input(self, image):
        """A PIL image for the pil decoder, a uint8 tensor for torchvision (either is accepted)."""
        if self.decoder == "pil":
            return image if isinstance(image, Image.Image) else F.to_pil_image(image)
        return F.pil_to_tensor(image) if isinstance(image, Image.Image) else image

    @staticmethod
    def _output(image) -> torch.Tensor:
        return F.pil_to_tensor(image) if isinstance(image, Image.Image) else image


class TrainTransform(_Preset):
    """RandomResizedCrop(image_size, scale=(min_scale, 1)) + flip -> uint8 (3, S, S) tensor.

    min_scale 0.08 is the ImageNet default; small synthetic images with one object may want more.
    The crop box and the flip are drawn from torch's global generator exactly as torchvision's
    RandomResizedCrop and RandomHorizontalFlip draw them.
    """

    def __init__(self, image_size: int, min_scale: float = DEFAULT_MIN_SCALE, hflip: bool = True,
                 decoder: Decoder = "torchvision"):
        _check_decoder(decoder)
        self.image_size, self.scale, self.hflip, self.decoder = image_size, (min_scale, 1.0), hflip, decoder
        self.ratio = (3 / 4, 4 / 3)

    def __call__(self, image) -> torch.Tensor:
        image = self._input(image)
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        size = [self.image_size, self.image_size]
        if isinstance(image, Image.Image):
            image = F.resized_crop(image, top, left, height, width, size, T.InterpolationMode.BILINEAR, antialias=True)
        else:
            image = F2.resized_crop(image, top, left, height, width, size, antialias=True)
        if self.hflip and torch.rand(1) < 0.5:
            image = F.hflip(image)
        return self._output(image)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
                f"decoder={self.decoder!r})")


class EvalTransform(_Preset):
    """Resize the shorter side to eval_resize_size(image_size), center crop -> uint8 (3, S, S)."""

    def __init__(self, image_size: int, decoder: Decoder = "torchvision"):
        _check_decoder(decoder)
        self.image_size, self.decoder = image_size, decoder

    def __call__(self, image) -> torch.Tensor:
        image = self._input(image)
        resize = [eval_resize_size(self.image_size)]
        if isinstance(image, Image.Image):
            image = F.resize(image, resize, T.InterpolationMode.BILINEAR, antialias=True)
        else:
            image = F2.resize(image, resize, antialias=True)
        return self._output(F.center_crop(image, [self.image_size, self.image_size]))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, decoder={self.decoder!r})"


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: expected one of {', '.join(DECODERS)}")


def train_transform(image_size: int, min_scale: float = DEFAULT_MIN_SCALE, hflip: bool = True,
                    decoder: Decoder = "torchvision") -> TrainTransform:
    return TrainTransform(image_size, min_scale, hflip, decoder)


def eval_transform(image_size: int, decoder: Decoder = "torchvision") -> EvalTransform:
    return EvalTransform(image_size, decoder)


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A uint8 (N, 3, H, W) batch from the loader -> the normalised float32 model input on `device`,
    in the model's memory format, in one call on the device.

    On the device, one pass converts to float32 / 255 straight into the requested layout, two
    more subtract the mean and divide by the std in place: ToTensor's and Normalize's float32
    operations in their order. A float batch (someone else's transform) is only moved and laid out.
    """
    images = images.to(device, non_blocking=True)
    layout = memory_format(channels_last)
    if images.is_floating_point():
        return images.contiguous(memory_format=layout)
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_input: a {images.dtype} batch; expected uint8 images or a float batch")
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
    torch.div(images, 255, out=out)
    mean, std = _statistics(images.device)
    return out.sub_(mean).div_(std)


_STATISTICS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) float32 tensors on `device`, made once per device
    (Normalize's `torch.as_tensor(mean, dtype=float32)`, so the same float32 values)."""
    if device not in _STATISTICS:
        _STATISTICS[device] = tuple(torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                                    for values in (IMAGENET_MEAN, IMAGENET_STD))
    return _STATISTICS[device]

