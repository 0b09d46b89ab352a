"""params.yaml and the profiles as files: reading them as DVC does (YAML 1.2), profile overlays,
`-S KEY=VALUE` assignments, and writing params.yaml."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml

from sge_repro.detection.detectors import DETECTORS
from sge_repro.errors import UserError, not_utf8
from sge_repro.params import PARAMS_FILE, PROFILES_DIR, Params, validate_params


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for plain scalars, as DVC reads and writes
    params.yaml (ruamel.yaml): only true/false are booleans, `1e-05` is a float, `010` is ten, and
    on / off / yes / no / dates stay strings. So a value DVC writes back without quotes
    (`dvc exp run -S key=value`) means here what it meant to DVC. A key given twice in one mapping
    is an error, as it is to DVC (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                break
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _yaml12_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    return {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}.get(text) or float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _yaml12_float)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise not_utf8(path, error, "a UTF-8 YAML file") from None
    try:
        return yaml.load(text, Loader=Yaml12Loader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None


# the lists dvc.yaml's stages loop over, besides the top-level ones: DVC reads them from the file itself
DVC_LISTS = [f"detection.{name}" for name in DETECTORS] + ["convert.trained", "convert.files", "convert.torchvision"]


def load_params(path: Path = PARAMS_FILE) -> Params:
    """params.yaml, validated; it must name every top-level key and every list dvc.yaml loops over
    (DVC reads them from the file, not from the schema's defaults)."""
    raw = read_yaml(path)
    if raw == {}:
        raise UserError(f"{path}: empty; expected every section of the schema "
                        "(`sge-repro run all --profile embedded` writes a complete one)")
    params = validate_params(raw, str(path))
    missing = [key for key in Params.model_fields if key not in raw]
    missing += [key for key in DVC_LISTS
                if key.split(".")[0] in raw and key.split(".")[1] not in (raw[key.split(".")[0]] or {})]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)} "
                        "(`sge-repro run all --profile NAME` writes a complete file)")
    return params


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def profile_overlay(name: str, profiles_dir: Path = PROFILES_DIR, _seen: tuple[str, ...] = ()) -> dict:
    """The keys profile `name` sets: its file, on top of the profile it `extends` (if any)."""
    path = profiles_dir / f"{name}.yaml"
    if not path.exists():
        allowed = ", ".join(available_profiles(profiles_dir)) or "none found"
        raise UserError(f"unknown profile {name!r}: no {path} (available: {allowed})")
    overlay = read_yaml(path)
    if not isinstance(overlay, dict):
        raise UserError(f"{path}: expected a mapping, got {type(overlay).__name__}")
    base = overlay.pop("extends", None)
    if base is None:
        return overlay
    if not isinstance(base, str) or base in (*_seen, name):
        raise UserError(f"{path}: extends: expected the name of another profile that does not extend this one, "
                        f"got {base!r}")
    return deep_merge(profile_overlay(base, profiles_dir, (*_seen, name)), overlay)


def profile_params(name: str, profiles_dir: Path = PROFILES_DIR) -> Params:
    """Schema defaults with the profile's overlay applied (and `profile: name` set)."""
    merged = deep_merge(Params().model_dump(mode="json"), profile_overlay(name, profiles_dir))
    merged["profile"] = name
    return validate_params(merged, str(profiles_dir / f"{name}.yaml"))


def set_values(raw: dict, assignments: list[str]) -> dict:
    """A copy of raw params with each `KEY=VALUE` applied, as DVC's `-S` spells them: a dotted key
    (`train_cls.lr`, `seeds`) and a YAML value (`[0, 1]`, `0.1`, `fp32`), read as params.yaml is."""
    raw = copy.deepcopy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        names = key.strip().split(".")
        if not sep or not all(names):
            raise UserError(f"-S {assignment!r}: expected KEY=VALUE with a dotted params.yaml key, e.g. "
                            "train_cls.lr=0.1 or 'seeds=[0, 1]'")
        try:
            value = yaml.load(text, Loader=Yaml12Loader)
        except yaml.YAMLError as exc:
            raise UserError(f"-S {assignment!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        section = raw
        for depth, name in enumerate(names[:-1]):
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise UserError(f"-S {assignment!r}: {'.'.join(names[:depth + 1])} is a value, not a section")
        section[names[-1]] = value
    return raw


def dump_params(params: Params) -> str:
    header = (
        "# Every knob of the pipeline. `sge-repro run all --profile NAME` rewrites this file as\n"
        "# the schema defaults (sge_repro/params.py) plus pipelines/profiles/NAME.yaml.\n"
        "# Edit freely: `dvc repro` reruns only the stages whose params changed.\n"
    )
    data = params.model_dump(mode="json")
    return header + yaml.dump(data, Dumper=_ParamsDumper, sort_keys=False, width=100)


class _ParamsDumper(yaml.SafeDumper):
    """Block style for sections, one-line lists of scalars (`seeds: [0, 1, 2]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ParamsDumper.add_representer(list, _represent_list)
