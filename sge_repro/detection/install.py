"""Install detectron2's Python package from the registry sdist `pb1-detectron2==0.6`.

detectron2 has no working build on the package registry (see README, "detectron2"). The sdist
`pb1-detectron2==0.6` carries upstream v0.6's `detectron2/` package byte for byte (plus the
model-zoo configs) but not the C++ sources, so `pip install` of it fails. We download it,
verify its sha256, and copy only `detectron2/` into site-packages; `sge_repro.detection.compat`
supplies what the missing compiled extension would. An already importable detectron2 (an
official build from git) is left alone.

Run as `python -m sge_repro.detection.install [--cache DIR]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from sge_repro.data.download import file_digest

SDIST = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"


def download_sdist(cache: Path) -> Path:
    target = cache / SDIST_FILE
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: its setup.py imports torch (already installed) for metadata.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-build-isolation", "--dest", str(cache), SDIST],
            check=True,
        )
    actual = file_digest(target, "sha256")
    if actual != SDIST_SHA256:
        target.unlink()
        raise SystemExit(f"{target}: sha256 {actual} does not match the expected {SDIST_SHA256}")
    return target


def extract_package(sdist: Path, site_packages: Path) -> Path:
    """Copy `<sdist root>/detectron2/**` into site-packages, refusing unsafe members."""
    with tempfile.TemporaryDirectory(dir=site_packages) as tmp, tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["detectron2"]]
        if not members:
            raise SystemExit(f"{sdist}: no detectron2/ package inside")
        archive.extractall(tmp, members=members, filter="data")  # 'data' rejects ../ and links out
        (source,) = Path(tmp).iterdir()
        destination = site_packages / "detectron2"
        if destination.exists():
            shutil.rmtree(destination)
        shutil.move(str(source / "detectron2"), destination)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".venv/cache"))
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("detectron2") is not None and not args.force:
        print(f"detectron2 already importable: {importlib.util.find_spec('detectron2').origin}")
        return 0
    site_packages = Path(sysconfig.get_paths()["purelib"])
    destination = extract_package(download_sdist(args.cache), site_packages)
    print(f"installed detectron2 v0.6 (Python package, {SDIST}) into {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
