import os
import sys
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the session's test SLURM cluster, tests/slurm_cluster.py)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tests are CPU-only and must be reproducible; keep BLAS from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def strict_compile_on_gpu(request, monkeypatch):
    """A GPU test checks the compiled kernels: a torch.compile failure (or dynamo's recompile
    limit) there is an error, not a warning and a silent pass on eager kernels."""
    if request.node.get_closest_marker("gpu") is not None:
        from sge_repro.models.sge_fast import STRICT_COMPILE_ENV

        monkeypatch.setenv(STRICT_COMPILE_ENV, "1")


@pytest.fixture
def sge_repro_bin() -> str:
    return str(BIN / "sge-repro")
