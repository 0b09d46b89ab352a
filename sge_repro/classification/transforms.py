"""Train and eval transforms of the ImageNet recipe, parameterised by the crop size.

Train: RandomResizedCrop(size) + horizontal flip. Eval: resize the shorter side to
size * 256/224 (256 for 224), then center crop `size`. Both normalise with ImageNet mean/std.
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224


def eval_resize_size(image_size: int) -> int:
    return int(round(image_size * EVAL_RESIZE_RATIO))


def train_transform(image_size: int, min_scale: float = 0.08, hflip: bool = True) -> T.Compose:
    """RandomResizedCrop(image_size, scale=(min_scale, 1)) + flip + normalise.

    min_scale 0.08 is the ImageNet default; small synthetic images with one object may want more.
    """
    steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([
        T.Resize(eval_resize_size(image_size), antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
