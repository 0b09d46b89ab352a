"""Downloads against a real HTTP server on 127.0.0.1 started here (no outside network)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sge_repro.data.download import COCO_FILES, download, extract_zip_safely, fetch_coco, file_digest
from sge_repro.errors import UserError

PAYLOAD = bytes(range(256)) * 1000  # 256,000 bytes


class FileServer:
    """Serves `files` (URL path -> bytes) with Range support and counts the body bytes it sent.

    mode: "range" (honours Range, 206 / 416), "ignore-range" (always 200 with the whole file),
    "drop-once" (the first GET sends half the body, then closes the connection).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode = "range"
        self.body_bytes_sent = 0
        self.range_headers: list[str | None] = []
        self._dropped = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        data = self.files.get(handler.path)
        range_header = handler.headers.get("Range")
        self.range_headers.append(range_header)
        if data is None:
            handler.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and self.mode != "ignore-range":
            start = int(match.group(1))
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.mode == "drop-once" and not self._dropped:
            self._dropped = True
            body = body[: len(body) // 2]
            handler.close_connection = True
        # count before writing: the client may finish reading (and the test assert) before this
        # thread runs another line after the write
        self.body_bytes_sent += len(body)
        handler.wfile.write(body)
        handler.wfile.flush()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    # Whatever the environment says, requests to 127.0.0.1 must go straight to the local server.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server():
    file_server = FileServer()
    file_server.files["/data.bin"] = PAYLOAD
    yield file_server
    file_server.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_verifies_checksums(server, tmp_path):
    calls = []
    path = download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD),
                    md5=hashlib.md5(PAYLOAD).hexdigest(), progress=lambda d, t: calls.append((d, t)),
                    chunk_size=64 * 1024)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(calls) == 4
    assert server.body_bytes_sent == len(PAYLOAD)
    # An existing verified file is not fetched again.
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD))
    assert server.body_bytes_sent == len(PAYLOAD)


def test_resume_from_partial_file_sends_only_the_rest(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:100_000])
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD))
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.range_headers == ["bytes=100000-"]
    assert server.body_bytes_sent == len(PAYLOAD) - 100_000


def test_dropped_connection_is_resumed(server, tmp_path):
    server.mode = "drop-once"
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD))
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.range_headers == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert server.body_bytes_sent == len(PAYLOAD)  # half, then the other half: nothing twice


def test_dropped_connection_without_retries_keeps_part_for_next_run(server, tmp_path):
    server.mode = "drop-once"
    with pytest.raises(UserError, match=r"download failed after 1 attempts.*data\.bin\.part is kept"):
        download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD), retries=0)
    assert (tmp_path / "data.bin.part").stat().st_size == len(PAYLOAD) // 2
    assert not (tmp_path / "data.bin").exists()
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD), retries=0)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.body_bytes_sent == len(PAYLOAD)


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.mode = "ignore-range"
    (tmp_path / "data.bin.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD))
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.range_headers == ["bytes=5000-"]


def test_complete_part_file_is_finished_without_body(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # killed between the last byte and the rename
    download(server.url("data.bin"), tmp_path / "data.bin", sha256=_sha256(PAYLOAD))
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.body_bytes_sent == 0


def test_checksum_mismatch_names_file_and_hashes_and_removes_part(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(UserError) as error:
        download(server.url("data.bin"), tmp_path / "data.bin", sha256=wrong)
    message = str(error.value)
    assert str(tmp_path / "data.bin") in message and wrong in message and _sha256(PAYLOAD) in message
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    with pytest.raises(UserError, match="md5 mismatch"):
        download(server.url("data.bin"), tmp_path / "data.bin", md5="0" * 32)


def test_http_error_and_bad_url(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download(server.url("missing.bin"), tmp_path / "missing.bin")
    with pytest.raises(UserError, match="expected an http"):
        download("file:///etc/passwd", tmp_path / "passwd")


def _zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, target)
    return buffer.getvalue()


def test_extract_zip_safely(tmp_path):
    archive = tmp_path / "good.zip"
    archive.write_bytes(_zip_bytes({"val2017/a.jpg": b"a", "val2017/sub/b.jpg": b"b", "top.txt": b"t"}))
    created = extract_zip_safely(archive, tmp_path / "root")
    assert created == [tmp_path / "root" / "top.txt", tmp_path / "root" / "val2017"]
    assert (tmp_path / "root" / "val2017" / "sub" / "b.jpg").read_bytes() == b"b"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["top.txt", "val2017"]  # no temp left
    with pytest.raises(UserError, match="already exists"):
        extract_zip_safely(archive, tmp_path / "root")


@pytest.mark.parametrize("entries,symlinks,reason", [
    ({"ok/a.jpg": b"a", "../evil": b"x"}, None, "contains '..'"),
    ({"ok/../../evil": b"x"}, None, "contains '..'"),
    ({"/abs/evil": b"x"}, None, "absolute path"),
    ({"ok/a.jpg": b"a"}, {"ok/link": "/etc/passwd"}, "symbolic link"),
])
def test_extract_zip_refuses_unsafe_members(tmp_path, entries, symlinks, reason):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes(entries, symlinks))
    with pytest.raises(UserError, match=reason):
        extract_zip_safely(archive, tmp_path / "root" / "inner")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "root" / "evil").exists()
    assert not (tmp_path / "root" / "inner" / "ok").exists()  # nothing written before the check


def _tiny_coco_zips() -> dict[str, bytes]:
    annotations = {"images": [{"id": 1, "file_name": "000000000001.jpg", "width": 4, "height": 4}],
                   "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    return {
        "train2017": _zip_bytes({"train2017/000000000001.jpg": b"jpeg", "train2017/000000000002.jpg": b"jpeg"}),
        "val2017": _zip_bytes({"val2017/000000000001.jpg": b"jpeg"}),
        "annotations": _zip_bytes({f"annotations/{kind}_{split}2017.json": json.dumps(annotations).encode()
                                   for kind in ("instances", "captions") for split in ("train", "val")}),
    }


def test_fetch_coco_from_local_server(server, tmp_path):
    zips = _tiny_coco_zips()
    for part, data in zips.items():
        server.files["/" + COCO_FILES[part][0]] = data
    md5s = {part: hashlib.md5(data).hexdigest() for part, data in zips.items()}
    events = []
    result = fetch_coco(tmp_path / "coco", base_url=server.base_url, expected_md5=md5s,
                        progress=lambda part, done, total: events.append((part, done, total)))
    root = tmp_path / "coco"
    assert result["parts"] == {"train2017": "fetched", "val2017": "fetched", "annotations": "fetched"}
    assert sorted(p.name for p in (root / "train2017").iterdir()) == ["000000000001.jpg", "000000000002.jpg"]
    assert (root / "val2017" / "000000000001.jpg").is_file()
    for split in ("train", "val"):
        assert json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())["images"][0]["id"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "train2017", "val2017"]  # zips removed
    assert {part for part, _, _ in events} == set(zips)
    assert ("val2017", len(zips["val2017"]), len(zips["val2017"])) in events
    # A second run finds everything in place and downloads nothing.
    sent = server.body_bytes_sent
    assert fetch_coco(root, base_url=server.base_url, expected_md5=md5s)["parts"]["val2017"] == "present"
    assert server.body_bytes_sent == sent


def test_fetch_coco_uses_official_md5_by_default(server, tmp_path):
    zips = _tiny_coco_zips()
    server.files["/zips/val2017.zip"] = zips["val2017"]
    assert COCO_FILES["val2017"][1] == "442b8da7639aecaf257c1dceb8ba8c80"
    with pytest.raises(UserError, match="val2017.zip: md5 mismatch \\(expected 442b8da7639aecaf257c1dceb8ba8c80"):
        fetch_coco(tmp_path / "coco", parts=("val2017",), base_url=server.base_url)
    assert not (tmp_path / "coco" / "val2017").exists()
    with pytest.raises(UserError, match="unknown test2017"):
        fetch_coco(tmp_path / "coco", parts=("test2017",), base_url=server.base_url)


def test_fetch_coco_refuses_zip_without_expected_layout(server, tmp_path):
    wrong = _zip_bytes({"images/000000000001.jpg": b"jpeg"})
    server.files["/zips/val2017.zip"] = wrong
    with pytest.raises(UserError, match="extracted without val2017"):
        fetch_coco(tmp_path / "coco", parts=("val2017",), base_url=server.base_url,
                   expected_md5={"val2017": hashlib.md5(wrong).hexdigest()})


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_file_digest_matches_hashlib_across_read_blocks(tmp_path, algorithm):
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB read block
    (tmp_path / "f.bin").write_bytes(data)
    assert file_digest(tmp_path / "f.bin", algorithm) == hashlib.new(algorithm, data).hexdigest()
