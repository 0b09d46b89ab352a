"""The detectron2 installer checks the sha256 of the cached sdist before using it."""

import pytest

from sge_repro.detection.install import SDIST_FILE, SDIST_SHA256, download_sdist


def test_a_cached_sdist_with_the_wrong_sha256_is_refused_and_removed(tmp_path):
    (tmp_path / SDIST_FILE).write_bytes(b"not the sdist")
    with pytest.raises(SystemExit, match=f"does not match the expected {SDIST_SHA256}"):
        download_sdist(tmp_path)
    assert not (tmp_path / SDIST_FILE).exists()
