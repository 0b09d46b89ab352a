"""The paper's SGE ablations as DVC experiments: which G, gamma's initial value, the normalisation.

`ablate` runs one classification experiment per variant on top of the current commit (through
`pipeline.run_experiment`, so each takes a validated params.yaml; `dvc exp run --temp`, one after
the other) and collects them into a table with the authors' three conclusions marked held / not
held / not significant. Each experiment trains and evaluates one model only (it runs in a fresh
copy: anything else listed would be trained again in every one).
Every comparison is a paired bootstrap over the validation images, whose per-image results the
eval_cls stage caches (`runs/eval_cls/*.json`); they are read back at each experiment's commit
through DVC's public API. Rerunning `ablate` resumes: finished experiments are kept, only missing
ones run. An experiment interrupted midway starts again from its first epoch, and says so: DVC's
temporary copy keeps no checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvc import api as dvc_api
import numpy as np

from sge_repro import atomic
from sge_repro.errors import UserError
from sge_repro.models.registry import SGE_VARIANT_DEFAULTS, parse_model_name, sge_channels
from sge_repro.params import Params, validate_params
from sge_repro.params_yaml import read_yaml, set_values
from sge_repro.paths import ProjectPaths
from sge_repro.pipeline import dvc, run_experiment
from sge_repro.provenance import git_state
from sge_repro.report.schema import GainInterval
from sge_repro.report.stats import paired_image_bootstrap

log = logging.getLogger(__name__)
REPORT_JSON = Path("reports") / "ablation.json"
REPORT_MD = Path("reports") / "ablation.md"
HELD, NOT_HELD, NOT_SIGNIFICANT, UNDETERMINED = "held", "not held", "not significant", "undetermined"


@dataclass(frozen=True)
class Variant:
    name: str  # the DVC experiment's name
    model: str
    groups: int | None = None  # None for the plain model
    weight_init: float = SGE_VARIANT_DEFAULTS["sge_weight_init"]
    normalize: bool = SGE_VARIANT_DEFAULTS["sge_normalize"]

    def settings(self) -> list[str]:
        """The `-S KEY=VALUE`s of this experiment: one model (also the one detection backbone, as
        params.yaml must name one), and every SGE knob spelt out (the workspace's params.yaml may
        hold other values)."""
        values = [f"models=[{self.model}]", f"detection.faster_rcnn=[{self.model}]", "detection.mask_rcnn=[]",
                  "detection.cascade_rcnn=[]", "detection.retinanet=[]", f"convert.trained=[{self.model}]",
                  "convert.files={}", "convert.torchvision=[]", "convert.torchvision_weights={}"]
        if self.groups is not None:
            values += [f"model.groups={self.groups}", f"model.sge_weight_init={self.weight_init}",
                       f"model.sge_bias_init={SGE_VARIANT_DEFAULTS['sge_bias_init']}",
                       f"model.sge_normalize={str(self.normalize).lower()}"]
        return values

    def label(self) -> str:
        if self.groups is None:
            return "plain"
        changed = [f"gamma init {self.weight_init:g}"] if self.weight_init != SGE_VARIANT_DEFAULTS["sge_weight_init"] else []
        changed += [] if self.normalize else ["no normalisation"]
        return f"G = {self.groups}" + "".join(f", {text}" for text in changed)


@dataclass(frozen=True)
class Plan:
    model: str
    default_groups: int
    sweep: list[int]
    variants: list[Variant]

    def variant(self, groups: int, weight_init: float = 0.0, normalize: bool = True) -> Variant:
        return next(v for v in self.variants if (v.groups, v.weight_init, v.normalize) == (groups, weight_init, normalize))


def default_sweep(model: str, width: int) -> list[int]:
    """G = 1, 2, 4, ... up to the largest power of two that divides every SGE block's channels."""
    common = math.gcd(*sge_channels(model, width))
    return [2 ** k for k in range((common & -common).bit_length())]


def plan(params: Params, model: str | None = None, groups: list[int] | None = None) -> Plan:
    """The ablation set of one SGE model: its plain ResNet, the G sweep (at the paper's gamma / beta
    and with normalisation), and at params.yaml's G: gamma initialised to 1, no normalisation."""
    if params.released:
        raise UserError("params.yaml: released: the ablations train their classifiers; expected a profile that "
                        "trains (embedded, smoke, paper), not released checkpoints")
    sge_models = [name for name in params.models if parse_model_name(name).attention == "sge"]
    model = model or (sge_models[0] if sge_models else None)
    if model is None or parse_model_name(model).attention != "sge":
        raise UserError(f"--model {model}: expected an SGE model (sge_resnet<depth>)" if model else
                        "params.yaml: models: no SGE model to ablate; expected e.g. sge_resnet50 (or give --model)")
    channels = sge_channels(model, params.model.width)
    sweep = sorted(set(groups or default_sweep(model, params.model.width)) | {params.model.groups})
    for g in sweep:
        if g < 1 or any(c % g for c in channels):
            raise UserError(f"--groups {g}: expected a G that divides every SGE block's channels of {model} at width "
                            f"{params.model.width} ({', '.join(map(str, channels))})")
    g0 = params.model.groups
    variants = [Variant(f"{parse_model_name(model).plain}-plain", parse_model_name(model).plain)]
    variants += [Variant(f"{model}-g{g}", model, g) for g in sweep]
    variants += [Variant(f"{model}-g{g0}-gamma1", model, g0, weight_init=1.0),
                 Variant(f"{model}-g{g0}-nonorm", model, g0, normalize=False)]
    return Plan(model, g0, sweep, variants)


def experiments(root: Path = Path(".")) -> dict[str, dict]:
    """{name: {"state": queued | running | success | failed, "rev": commit or None, "params": the
    params.yaml it ran with or None}} of the experiments on the current commit (`dvc exp show`)."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=root).stdout or "[]")
    found = {}
    for entry in shown:
        if entry.get("rev") == "workspace":
            continue
        for experiment in entry.get("experiments") or []:
            revs = experiment.get("revs") or [{}]
            state = ((experiment.get("executor") or {}).get("state") or "success").lower()
            params = (((revs[0].get("data") or {}).get("params") or {}).get("params.yaml") or {}).get("data")
            found[experiment.get("name") or revs[0].get("name")] = {"state": state, "rev": revs[0].get("rev"),
                                                                    "params": params}
    return found


def run_missing(plan_: Plan, on_start: Callable[[Variant, int, int], None] = lambda variant, index, total: None,
                root: Path = Path(".")) -> dict[str, dict]:
    """Run the plan's experiments that this commit does not have yet, one after the other, each
    with `dvc exp run --temp` (in a temporary copy, in the foreground: DVC's background queue can
    stall between experiments, treeverse/dvc#10398); returns `experiments()`."""
    found = experiments(root)
    names = [v.name for v in plan_.variants]
    _refuse_failed(names, found)
    missing = [v for v in plan_.variants if v.name not in found]
    commit = git_state(root)["commit"] or ""  # an experiment of another commit is another experiment
    for index, variant in enumerate(missing):
        started = ProjectPaths(root).ablation_started(variant.name)
        if started.exists() and started.read_text(encoding="utf-8") == commit:
            log.warning("experiment %s began in an earlier run and did not finish: it starts again from its first "
                        "epoch (DVC's temporary copy of an experiment keeps no checkpoint)", variant.name)
        on_start(variant, index, len(missing))
        started.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(started, commit)
        if run_experiment(variant.settings(), ["eval_cls"], name=variant.name, params_file=root / "params.yaml",
                          temp=True):
            kept = f"; the {index} run before it are kept" if index else ""
            raise UserError(f"experiment {variant.name} failed (DVC's output above){kept}: rerun to go on from it")
        started.unlink()
    found = experiments(root)
    _refuse_failed(names, found)
    unfinished = [name for name in names if found.get(name, {}).get("state") != "success"]
    if unfinished:
        raise UserError(f"experiment {unfinished[0]} is {found.get(unfinished[0], {}).get('state', 'missing')} in "
                        "DVC's queue; expected it finished (`dvc queue status`), or remove it "
                        f"(`dvc exp remove {unfinished[0]}`) and rerun")
    return found


def _refuse_failed(names: list[str], found: dict[str, dict]) -> None:
    failed = [name for name in names if found.get(name, {}).get("state") == "failed"]
    if failed:
        raise UserError(f"experiment {failed[0]} failed: see `dvc queue logs {failed[0]}`; remove it with "
                        f"`dvc exp remove {failed[0]}` and rerun to queue it again")


def check_same_recipe(plan_: Plan, found: dict[str, dict], root: Path = Path(".")) -> None:
    """An experiment of this commit that ran with other params than params.yaml now gives (e.g. an
    uncommitted edit of train_cls.epochs since) is not part of this ablation: one line naming it
    and the first key that differs, instead of a table mixing two recipes."""
    workspace = read_yaml(root / "params.yaml")
    for variant in plan_.variants:
        ran = found.get(variant.name, {})
        if ran.get("state") != "success" or ran.get("params") is None:
            continue
        wanted = _flat(validate_params(set_values(workspace, variant.settings())).model_dump())
        actual = _flat(validate_params(ran["params"], f"experiment {variant.name}").model_dump())
        for key in sorted(set(wanted) | set(actual)):
            if wanted.get(key) != actual.get(key):
                raise UserError(f"experiment {variant.name} ran with {key} = {actual.get(key)!r}, params.yaml now gives "
                                f"{wanted.get(key)!r}; expected the same recipe: commit the change to start a new "
                                f"ablation, or remove it (`dvc exp remove {variant.name}`) and rerun")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class Row:
    variant: Variant
    top1: float | None = None  # mean over seeds
    interval: GainInterval | None = None  # top-1 itself, over images
    gain: GainInterval | None = None  # over the plain model, paired over images
    correct: list[np.ndarray] = field(default_factory=list, repr=False)  # one 0/1 array per seed


def read_results(variant: Variant, rev: str, params: Params, root: Path = Path(".")) -> list[np.ndarray]:
    """The per-image top-1 correctness of each seed of one experiment, read at its commit."""
    arrays = []
    for seed in params.seeds:
        path = f"runs/eval_cls/{variant.model}-seed{seed}.json"
        try:
            result = json.loads(dvc_api.read(path, repo=str(root.resolve()), rev=rev))
            arrays.append(np.asarray(result["correct_top1"], dtype=np.float64))
        except (FileNotFoundError, KeyError, ValueError, TypeError) as error:
            raise UserError(f"experiment {variant.name}: {path}: expected the eval_cls stage's per-image results "
                            f"in DVC's cache ({type(error).__name__}: {error})") from None
    return arrays


def compare(treated: Row, baseline: Row, params: Params) -> GainInterval | None:
    if not treated.correct or not baseline.correct:
        return None
    if {a.size for a in treated.correct} != {a.size for a in baseline.correct}:
        raise UserError(f"experiments {treated.variant.name} and {baseline.variant.name} were evaluated on different "
                        "validation sets; expected the same images (same data params)")
    return paired_image_bootstrap(treated.correct, baseline.correct, params.report.bootstrap_samples, params.report.seed)


def verdict(gain: GainInterval | None) -> str:
    """held when the CI of (claimed better - claimed worse) is above 0, not held when below."""
    if gain is None or gain.significant is None:
        return UNDETERMINED
    if not gain.significant:
        return NOT_SIGNIFICANT
    return HELD if gain.low > 0 else NOT_HELD


def read_rows(plan_: Plan, found: dict[str, dict], params: Params, root: Path = Path(".")) -> dict[str, Row]:
    """A row per variant, with the per-image results of its experiment when it finished."""
    rows = {v.name: Row(v) for v in plan_.variants}
    for name, row in rows.items():
        if found.get(name, {}).get("state") == "success" and found[name]["rev"]:
            row.correct = read_results(row.variant, found[name]["rev"], params, root)
            row.top1 = 100.0 * float(np.mean([a.mean() for a in row.correct]))
    return rows


def summarise(plan_: Plan, rows: dict[str, Row], params: Params) -> dict[str, Any]:
    """The ablation table and the authors' three conclusions."""
    samples, seed = params.report.bootstrap_samples, params.report.seed
    plain = rows[plan_.variants[0].name]
    for row in rows.values():
        if row.correct:  # the CI of top-1 itself: the gain over a model that gets no image right
            row.interval = paired_image_bootstrap(row.correct, [np.zeros_like(a) for a in row.correct], samples, seed)
        if row is not plain:
            row.gain = compare(row, plain, params)
    reference = rows[plan_.variant(plan_.default_groups).name]
    g0 = plan_.default_groups
    claims = [
        _middle_g_claim(plan_, rows, params),
        _claim("gamma initialised to 0 beats 1", compare(reference, rows[plan_.variant(g0, 1.0).name], params),
               f"G = {g0}: gamma 0 minus gamma 1"),
        _claim("the normalisation is needed", compare(reference, rows[plan_.variant(g0, normalize=False).name], params),
               f"G = {g0}: with minus without"),
    ]
    return {"model": plan_.model, "plain": plain.variant.model, "seeds": list(params.seeds),
            "rows": [_row_record(row) for row in rows.values()], "claims": claims}


def _middle_g_claim(plan_: Plan, rows: dict[str, Row], params: Params) -> dict[str, Any]:
    """Held when the best G is inside the sweep and beats both ends significantly; not held when
    an end is best and beats the best inner G significantly."""
    sweep = {g: rows[plan_.variant(g).name] for g in plan_.sweep}
    done = {g: row for g, row in sweep.items() if row.top1 is not None}
    text = "a middle G is best"
    if len(plan_.sweep) < 3 or len(done) < len(sweep):
        return _claim(text, None, "needs every G of a sweep of three or more")
    best = max(done, key=lambda g: done[g].top1)
    ends = (plan_.sweep[0], plan_.sweep[-1])
    if best in ends:
        inner = max((g for g in done if g not in ends), key=lambda g: done[g].top1)
        gain = compare(done[inner], done[best], params)
        return _claim(text, gain, f"best inner G = {inner} minus best G = {best}")
    gains = {end: compare(done[best], done[end], params) for end in ends}
    end = min(ends, key=lambda g: gains[g].low if gains[g].low is not None else gains[g].estimate)
    return _claim(text, gains[end], f"best G = {best} minus G = {end} (the end it beats least)")


def _claim(text: str, gain: GainInterval | None, how: str) -> dict[str, Any]:
    return {"claim": text, "comparison": how, "verdict": verdict(gain),
            "difference": None if gain is None else gain.model_dump(by_alias=True)}


def _row_record(row: Row) -> dict[str, Any]:
    v = row.variant
    return {"experiment": v.name, "model": v.model, "variant": v.label(), "groups": v.groups,
            "sge_weight_init": v.weight_init if v.groups else None, "sge_normalize": v.normalize if v.groups else None,
            "top1": row.top1,
            "top1_ci": None if row.interval is None else [row.interval.low, row.interval.high],
            "gain": None if row.gain is None else row.gain.model_dump(by_alias=True)}


ROW_HEADERS = ("experiment", "variant", "top-1", "95% CI", "gain over plain", "95% CI")
CLAIM_HEADERS = ("the authors' conclusion", "compared", "difference", "95% CI", "verdict")


def cells(result: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The table's rows and the conclusions' rows as text, for report.md and the console."""
    rows = []
    for row in result["rows"]:
        gain = row["gain"] or {}
        rows.append([row["experiment"], row["variant"], _number(row["top1"]), _ci(row["top1_ci"], signed=False),
                     _number(gain.get("gain"), signed=True), _ci([gain.get("ci_low"), gain.get("ci_high")])])
    claims = []
    for claim in result["claims"]:
        diff = claim["difference"] or {}
        claims.append([claim["claim"], claim["comparison"], _number(diff.get("gain"), signed=True),
                       _ci([diff.get("ci_low"), diff.get("ci_high")]), claim["verdict"]])
    return rows, claims


def title(result: dict[str, Any]) -> str:
    return f"SGE ablations: {result['model']} against {result['plain']} (seeds {result['seeds']})"


def write(result: dict[str, Any], root: Path = Path(".")) -> list[Path]:
    """reports/ablation.json and reports/ablation.md, each written atomically."""
    lines = [f"# {title(result)}", ""]
    for headers, rows in zip((ROW_HEADERS, CLAIM_HEADERS), cells(result)):
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
    return [atomic.write_json(root / REPORT_JSON, result), atomic.write_text(root / REPORT_MD, "\n".join(lines))]


def _number(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def _ci(bounds: list | None, signed: bool = True) -> str:
    if not bounds or bounds[0] is None:
        return "-"
    return f"[{_number(bounds[0], signed)}, {_number(bounds[1], signed)}]"


def ablate(params: Params, model: str | None = None, groups: list[int] | None = None,
           on_start: Callable[[Variant, int, int], None] = lambda variant, index, total: None,
           root: Path = Path(".")) -> tuple[dict[str, Any], list[Path]]:
    """Plan, run what is missing, and write the table: (table, files written)."""
    plan_ = plan(params, model, groups)
    check_same_recipe(plan_, experiments(root), root)  # before anything runs
    found = run_missing(plan_, on_start, root)
    check_same_recipe(plan_, found, root)  # hand-queued ones that finished meanwhile
    result = summarise(plan_, read_rows(plan_, found, params, root), params)
    return result, write(result, root)
