import inspect
import sys

import pytest

from sge_repro.detection.compat import detectron2_info, import_detectron2


def test_detectron2_imports_with_the_shims():
    import_detectron2()
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.modeling  # noqa: F401
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR
    info = detectron2_info()
    assert info["version"] == "0.6" or info["compiled_ops"]
    assert info["build"] in ("official build with compiled ops", "registry sdist pb1-detectron2 0.6 (python only)")
    assert info["path"].endswith("detectron2")


def test_missing_compiled_op_names_itself():
    import_detectron2()
    compiled = sys.modules["detectron2._C"]
    if detectron2_info()["compiled_ops"]:  # an official build: its real extension is used untouched
        assert not getattr(compiled, "__sge_repro_placeholder__", False)
        return
    with pytest.raises(RuntimeError, match="detectron2._C.nms_rotated"):
        compiled.nms_rotated
    # dunder lookups behave like a normal module's, so inspect / pickle keep working
    assert not hasattr(compiled, "__wrapped__")
    inspect.getmembers(compiled)


def test_import_is_idempotent():
    first = import_detectron2()
    assert import_detectron2() is first
