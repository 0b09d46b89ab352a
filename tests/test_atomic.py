"""Atomic file writes and directory publishing: one temp naming scheme, one cleanup."""

import os
import signal
import subprocess
import sys

import pytest

from sge_repro import atomic


def temps(folder):
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


def tree(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def publish(root, files):
    with atomic.publish_dir(root) as staging:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)


def test_publish_creates_the_tree_and_leaves_no_temp(tmp_path):
    publish(tmp_path / "out", {"a/x.bin": b"1", "b.txt": b"2"})
    assert tree(tmp_path / "out") == {"a/x.bin": b"1", "b.txt": b"2"}
    assert temps(tmp_path) == []


def test_publish_replaces_the_previous_tree_as_a_whole(tmp_path):
    publish(tmp_path / "out", {"old.txt": b"old"})
    publish(tmp_path / "out", {"new.txt": b"new"})
    assert tree(tmp_path / "out") == {"new.txt": b"new"}
    assert temps(tmp_path) == []


def test_interrupted_publish_keeps_the_previous_tree_and_leaves_no_temp(tmp_path):
    publish(tmp_path / "out", {"keep.txt": b"previous"})
    with pytest.raises(KeyboardInterrupt):
        with atomic.publish_dir(tmp_path / "out") as staging:
            (staging / "half.txt").write_bytes(b"half")
            raise KeyboardInterrupt
    assert tree(tmp_path / "out") == {"keep.txt": b"previous"}
    assert temps(tmp_path) == []


def test_interrupted_first_publish_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.publish_dir(tmp_path / "out") as staging:
            (staging / "half.txt").write_bytes(b"half")
            raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []


def test_killed_publish_keeps_the_previous_tree_and_the_next_publish_clears_its_temp(tmp_path):
    publish(tmp_path / "out", {"keep.txt": b"previous"})
    script = (
        "import os, signal, sys\n"
        "from sge_repro import atomic\n"
        "with atomic.publish_dir(sys.argv[1]) as staging:\n"
        "    (staging / 'half.txt').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert tree(tmp_path / "out") == {"keep.txt": b"previous"}
    (stray,) = temps(tmp_path)
    assert stray.startswith(".out.tmp-") and (tmp_path / stray / "half.txt").is_file()
    publish(tmp_path / "out", {"new.txt": b"new"})
    assert tree(tmp_path / "out") == {"new.txt": b"new"}
    assert temps(tmp_path) == []


def test_temps_of_a_running_process_and_of_other_targets_are_kept(tmp_path):
    alive = tmp_path / f".out.tmp-{os.getppid()}-1"  # our parent still runs
    other = tmp_path / ".outer.tmp-999999999-1"     # another target's temp
    alive.mkdir()
    other.mkdir()
    dead = tmp_path / ".out.tmp-999999999-1"
    dead.mkdir()
    publish(tmp_path / "out", {"x": b"x"})
    assert alive.is_dir() and other.is_dir() and not dead.exists()


def test_the_temp_in_use_is_not_cleared_by_a_concurrent_cleanup(tmp_path):
    with atomic.publish_dir(tmp_path / "out") as staging:
        assert atomic.remove_stale_temps(tmp_path / "out") == []
        assert staging.is_dir()


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.txt").write_bytes(b"keep")
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    publish(tmp_path / "out", {"new.txt": b"new"})
    assert not (tmp_path / "out").is_symlink() and tree(tmp_path / "out") == {"new.txt": b"new"}
    assert tree(tmp_path / "elsewhere") == {"precious.txt": b"keep"}
    assert temps(tmp_path) == []


def test_file_writes_use_the_same_temp_scheme_and_cleanup(tmp_path):
    target = tmp_path / "m.json"
    atomic.write_json(target, {"a": 1})
    stale = tmp_path / ".m.json.tmp-999999999-1"
    stale.write_bytes(b"half")

    def fail(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic._atomic(target, fail)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert temps(tmp_path) == []  # the failed write's temp and the dead process's temp are gone


def test_written_files_get_the_usual_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o644
