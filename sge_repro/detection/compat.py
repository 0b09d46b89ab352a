"""The one door to detectron2: import shims so its v0.6 Python package runs here.

Every other module in `sge_repro.detection` imports detectron2 through `import_detectron2()`.
What the shims cover (see shared notes, "detectron2 on these machines"):

- `detectron2._C` (compiled ops) may be missing: the registry sdist ships no C++ sources. A
  placeholder stands in and names any op that is touched. Faster / Mask / Cascade R-CNN and
  RetinaNet with FPN never touch them (torchvision provides roi_align and nms; COCO evaluation
  runs on pycocotools with `use_fast_impl=False`).
- Pillow >= 10 removed `Image.LINEAR` and numpy >= 1.24 the `np.int` / `np.float` aliases; v0.6
  still uses them.
- torch's warnings at detectron2's import (`torch.jit.script` deprecated, torch.meshgrid without
  `indexing`) are filtered by message, so a detection command's error is its one line.

An official build (compiled `_C` present) is imported untouched apart from the aliases.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from typing import Any

_PLACEHOLDER_FLAG = "__sge_repro_placeholder__"
_installed = False


class _MissingCompiledOps(types.ModuleType):
    """Stands in for `detectron2._C`; every op lookup fails with a message naming the op."""

    def __getattr__(self, name: str) -> Any:
        # dunder lookups (inspect, pickle, importlib) must behave like a normal module's
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"detectron2._C.{name} is a compiled op that this detectron2 lacks (python-only "
            "package from the registry sdist pb1-detectron2 0.6); use a model without it "
            "(deformable conv, rotated boxes, fast COCO eval) or install an official build"
        )


def _has_compiled_ops() -> bool:
    module = sys.modules.get("detectron2._C")
    if module is not None:
        return not getattr(module, _PLACEHOLDER_FLAG, False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _install_shims() -> None:
    global _installed
    if _installed:
        return
    # detectron2 / fvcore script a few helpers at import; torch's deprecation notice is not ours to act on
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # ... and v0.6's anchor generator calls torch.meshgrid without `indexing` (its "ij" default is what it means)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR  # the same filter under its pre-Pillow-10 name

    import numpy as np

    for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
        try:
            getattr(np, alias)
        except AttributeError:
            setattr(np, alias, builtin)  # removed in numpy 1.24, still used by detectron2 0.6

    if importlib.util.find_spec("detectron2") is None:
        from sge_repro.errors import UserError

        raise UserError(
            "detectron2: not importable; run `make` (python -m sge_repro.detection.install) "
            "or install an official build"
        )
    if not _has_compiled_ops():
        placeholder = _MissingCompiledOps("detectron2._C")
        setattr(placeholder, _PLACEHOLDER_FLAG, True)
        placeholder.__file__ = None
        sys.modules["detectron2._C"] = placeholder
        # `from detectron2 import _C` reads the package attribute once the package is imported
        package = importlib.import_module("detectron2")
        package._C = placeholder
    _installed = True


def import_detectron2() -> types.ModuleType:
    """Install the shims once, then return the `detectron2` package (submodules importable)."""
    _install_shims()
    return importlib.import_module("detectron2")


def detectron2_info() -> dict:
    """Version, location and kind of the detectron2 in use (for `sge-repro env`)."""
    detectron2 = import_detectron2()
    compiled = _has_compiled_ops()
    return {
        "version": getattr(detectron2, "__version__", "unknown"),
        "path": str(detectron2.__path__[0]),
        "compiled_ops": compiled,
        "build": (
            "official build with compiled ops"
            if compiled
            else "registry sdist pb1-detectron2 0.6 (python only)"
        ),
    }
