import functools
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def copy_project(destination: Path) -> Path:
    """The project as a fresh clone would have it, in its own git repo: the tracked files (as they are
    in the working tree), never the checkout's run outputs (metrics/, plots/, dvc.lock are not
    git-ignored, so `make run` leaves them untracked beside the code). A new source file takes part
    once `git add`ed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    return destination


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(tmp_path):
    """(folder, base URL): the folder's files served over HTTP on 127.0.0.1 (torchvision's weights
    as the fetch_weights stage downloads them, never from the outside)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
