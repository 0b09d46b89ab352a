"""requirements.lock: every Python package of the environment, pinned to a version and a hash.

`make` installs it in pip's hash-checking mode (`pip install --require-hashes -r requirements.lock`);
`make lock` regenerates it (tools/pin_requirements.py: pip's own resolver, `--dry-run --report`).
`sge-repro env` compares the installed distributions with it. What the lock does not cover, and
says so: sge-repro itself (installed editable from the checkout) and detectron2 (copied from a
sdist whose sha256 is pinned in sge_repro/detection/install.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from sge_repro.errors import UserError

LOCK_FILE = "requirements.lock"
NOT_LOCKED = ("sge-repro",)  # the checkout itself, installed editable after the lock

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: "PyYAML" and "pyyaml", "typing_extensions" and "typing-extensions" are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of a lock file; every pin must carry at least one sha256 hash."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the lock file ({exc.strerror})") from None
    pins: dict[str, str] = {}
    # a requirement continues over lines ending in a backslash
    for number, requirement in _requirements(text):
        match = _PIN.match(requirement)
        if not match:
            raise UserError(f"{path}:{number}: expected 'name==version --hash=sha256:...', got {requirement[:60]!r}")
        if "--hash=sha256:" not in requirement:
            raise UserError(f"{path}:{number}: {match.group(1)}=={match.group(2)} has no --hash=sha256:...")
        pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise UserError(f"{path}: no pinned packages")
    return pins


def _requirements(text: str):
    number, parts, start = 0, [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("--hash") else line.rstrip()
        if not line.strip():
            continue
        if not parts:
            start = number
        parts.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            yield start, " ".join(parts)
            parts = []
    if parts:
        yield start, " ".join(parts)


def installed_distributions() -> dict[str, str]:
    """{normalized name: version} of every distribution importlib.metadata sees."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


@dataclass
class LockComparison:
    missing: list[str] = field(default_factory=list)      # "name==locked"
    different: list[str] = field(default_factory=list)    # "name locked -> installed"
    extra: list[str] = field(default_factory=list)        # "name==installed", not in the lock

    @property
    def matches(self) -> bool:
        return not (self.missing or self.different or self.extra)


def compare(locked: dict[str, str], installed: dict[str, str]) -> LockComparison:
    result = LockComparison()
    for name, version in sorted(locked.items()):
        if name not in installed:
            result.missing.append(f"{name}=={version}")
        elif installed[name] != version:
            result.different.append(f"{name} {version} -> {installed[name]}")
    for name, version in sorted(installed.items()):
        if name not in locked and name not in NOT_LOCKED:
            result.extra.append(f"{name}=={version}")
    return result


def default_lock_path() -> Path:
    """The lock file of the checkout sge_repro is imported from."""
    return Path(__file__).resolve().parents[1] / LOCK_FILE
