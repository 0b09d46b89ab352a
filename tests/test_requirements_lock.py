"""requirements.lock: complete, hashed, agreeing with pyproject.toml and environment.yml, and checked by `sge-repro env`."""

import json
import re
import subprocess
import tomllib

import pytest
import yaml

from conftest import REPO
from sge_repro.errors import UserError
from sge_repro.requirements_lock import compare, installed_distributions, normalize, read_lock

LOCK = REPO / "requirements.lock"


def _dependency_names_and_pins() -> dict[str, str | None]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    found = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(==\s*([^\s,;]+))?", requirement)
        found[normalize(match.group(1))] = match.group(3)
    return found


def test_every_pyproject_dependency_is_locked_at_its_pin():
    locked = read_lock(LOCK)
    for name, pin in _dependency_names_and_pins().items():
        assert name in locked, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        if pin is not None:
            assert locked[name] == pin, f"{name}: pyproject pins {pin}, requirements.lock has {locked[name]}"
    assert locked["pip"] == "24.0"  # the Makefile's reason: newer pip refuses detectron2's sdist


def test_every_lock_entry_has_a_sha256_and_the_lock_is_complete_for_the_resolver():
    text = LOCK.read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.M)
    pins = [line for line in text.splitlines() if "==" in line and not line.startswith("#")]
    assert len(entries) == len(pins) == len(read_lock(LOCK))


def test_environment_yml_has_the_same_pins_as_the_lock():
    spec = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict))
    listed = {normalize(name): version for name, version in (line.split("==") for line in pip_section)}
    locked = read_lock(LOCK)
    assert "pip=24.0" in spec["dependencies"]
    assert listed == {name: version for name, version in locked.items() if name != "pip"}


def test_the_installed_packages_are_the_locked_versions():
    # `make` installs exactly the lock; packages a developer added by hand show up as extras only
    result = compare(read_lock(LOCK), installed_distributions())
    assert result.missing == [] and result.different == []


def test_env_check_names_what_differs_from_a_lock(tmp_path, sge_repro_bin):
    locked = LOCK.read_text()
    torch_version = read_lock(LOCK)["torch"]
    changed = tmp_path / "requirements.lock"
    # torch at another version, and one package (rich) gone from the lock: it becomes an extra
    text = locked.replace(f"torch=={torch_version} ", "torch==0.0.1 ")
    text = re.sub(r"^rich==\S+ \\\n    --hash=sha256:[0-9a-f]{64}\n", "", text, flags=re.M)
    changed.write_text(text)
    run = subprocess.run([sge_repro_bin, "env", "--json", "--check", "--lock", str(changed)],
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert f"version torch 0.0.1 -> {torch_version}" in report["lock_differences"]
    assert any(line.startswith("extra rich==") for line in report["lock_differences"])
    assert report["packages"].startswith("differs from requirements.lock")


def test_a_pin_without_a_hash_is_named_with_its_line(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nnumpy==2.0.0 \\\n    --hash=sha256:" + "0" * 64 + "\nrich==15.0.0\n")
    with pytest.raises(UserError, match=r"requirements.lock:4: rich==15.0.0 has no --hash"):
        read_lock(lock)
