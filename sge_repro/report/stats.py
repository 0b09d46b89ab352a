"""Statistics of the comparison: mean +- std over seeds, bootstrap confidence intervals of a gain,
and the verdicts the report prints.

Top-1 gains are bootstrapped paired over validation images: both models were scored on the same
images, so each image contributes (correct_attention - correct_plain), averaged over each model's
seeds. AP gains are bootstrapped over seeds (COCO AP is not a per-image mean). Everything random
takes a seed.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from sge_repro.report.schema import GainInterval

SINGLE_RUN = "single run"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return float(array.mean()), std


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def paired_image_bootstrap(
    treated: Sequence[np.ndarray],
    baseline: Sequence[np.ndarray],
    samples: int,
    seed: int,
    confidence: float = 0.95,
) -> GainInterval:
    """CI of top-1(treated) - top-1(baseline) in points, resampling validation images.

    `treated` / `baseline`: one 0/1 correctness array per seed, all over the same images in the
    same order. Per image the difference of the two models' mean correctness over their seeds takes
    only a few distinct values, so a bootstrap resample is exactly a multinomial draw of how often
    each value is picked: as exact as resampling indices, at O(samples x values) cost even for
    ImageNet's 50k images.
    """
    treated_mean = np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in treated]), axis=0)
    baseline_mean = np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in baseline]), axis=0)
    if treated_mean.shape != baseline_mean.shape or treated_mean.size == 0:
        raise ValueError("paired bootstrap needs the same, non-empty set of images for both models")
    differences = (treated_mean - baseline_mean) * 100.0
    # Round before grouping so that float noise (e.g. 1/3 - 2/3) does not split equal values.
    values, counts = np.unique(np.round(differences, 9), return_counts=True)
    n = differences.size
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=samples) @ values / n
    low, high = _percentile_interval(draws, confidence)
    seeds_text = f"{len(treated)} vs {len(baseline)} seeds"
    return GainInterval(
        estimate=float(differences.mean()),
        low=low,
        high=high,
        method=f"paired bootstrap over {n} validation images ({seeds_text})",
        units=n,
        samples=samples,
        confidence=confidence,
    )


def seed_bootstrap(
    treated: Mapping[int, float],
    baseline: Mapping[int, float],
    samples: int,
    seed: int,
    confidence: float = 0.95,
) -> GainInterval:
    """CI of mean(treated) - mean(baseline) over seeds ({seed: metric}).

    Paired by seed when at least two seeds are shared (same data order / initialisation seed);
    otherwise both groups are resampled independently when each has two or more runs. With fewer
    runs there is no CI: the gain is a single run. With only a handful of seeds the percentile
    bootstrap is coarse (few distinct resamples), which the method string says.
    """
    if not treated or not baseline:
        raise ValueError("seed_bootstrap needs at least one run of each model")
    treated_mean, _ = mean_std(list(treated.values()))
    baseline_mean, _ = mean_std(list(baseline.values()))
    common = sorted(set(treated) & set(baseline))
    rng = np.random.default_rng(seed)
    if len(common) >= 2:
        differences = np.array([treated[s] - baseline[s] for s in common], dtype=np.float64)
        picks = rng.integers(0, differences.size, size=(samples, differences.size))
        draws, estimate = differences[picks].mean(axis=1), float(differences.mean())
        method, units = f"bootstrap over {len(common)} paired seeds", len(common)
    elif len(treated) >= 2 and len(baseline) >= 2:
        a = np.array(list(treated.values()), dtype=np.float64)
        b = np.array(list(baseline.values()), dtype=np.float64)
        draws = (
            a[rng.integers(0, a.size, size=(samples, a.size))].mean(axis=1)
            - b[rng.integers(0, b.size, size=(samples, b.size))].mean(axis=1)
        )
        estimate = treated_mean - baseline_mean
        method, units = f"unpaired bootstrap over {a.size} vs {b.size} seeds", a.size + b.size
    else:
        return GainInterval(estimate=treated_mean - baseline_mean, low=None, high=None, method=SINGLE_RUN, units=0,
                            samples=0, confidence=confidence)
    low, high = _percentile_interval(draws, confidence)
    return GainInterval(estimate=estimate, low=low, high=high, method=method, units=units, samples=samples,
                        confidence=confidence)


def significance_label(gain: GainInterval | None) -> str:
    if gain is None:
        return "-"
    if gain.significant is None:
        return SINGLE_RUN
    return "significant" if gain.significant else "not significant"


def paper_verdict(ours: float, paper: float | None, tolerance: float) -> str:
    """On the paper's own dataset: "reproduced" within `tolerance` points, else the signed gap."""
    if paper is None:
        return "no paper figure"
    gap = ours - paper
    if round(abs(gap), 9) <= tolerance:
        return "reproduced"
    return f"{gap:+.2f} vs paper"


def gain_verdict(gain: GainInterval | None, paper_gain: float | None) -> str:
    """On a dataset the paper did not use: compare the sign and size of the gain with the paper's."""
    if gain is None:
        return "no baseline run"
    if paper_gain is None or math.isclose(paper_gain, 0.0, abs_tol=1e-12):
        return "no paper gain to compare"
    if math.isclose(gain.estimate, 0.0, abs_tol=1e-9):  # the tolerance of paper_verdict's rounding
        text = "no gain"
    elif (gain.estimate > 0) == (paper_gain > 0):
        text = f"same sign, {gain.estimate / paper_gain:.1f}x paper"
    else:
        text = "opposite sign"
    if gain.significant is False:
        text += ", n.s."
    elif gain.significant is None:
        text += ", single run"
    return text


def gain_vs_paper_verdict(gain: GainInterval | None, paper_gain: float | None, compact: bool = False) -> str:
    """On the paper's dataset but another engine / protocol: is the paper's gain inside our gain's CI?

    "gain reproduced" when the paper's gain lies in the 95% CI of ours; otherwise where the CI lies
    relative to the paper's gain and to 0. A single run (no CI) is not judged.

    compact: the same judgement without the CI and our gain, for a table that shows them in a
    column of their own (the console's compact view; every form at most 28 characters).
    """
    if gain is None:
        return "no baseline run"
    if paper_gain is None:
        return "no paper gain to compare"
    paper = f"{paper_gain:+.2f}"
    if gain.low is None or gain.high is None:
        not_judged = "single run: not judged"
        return not_judged if compact else f"gain {gain.estimate:+.2f} vs paper {paper}, {not_judged}"
    ci = f"95% CI [{gain.low:+.2f}, {gain.high:+.2f}]"
    if gain.low <= paper_gain <= gain.high:
        judgement = f"gain reproduced: paper {paper}"
        return judgement if compact else f"{judgement} within {ci}"
    if gain.high < 0.0 < paper_gain or gain.low > 0.0 > paper_gain:
        return f"opposite to paper's {paper}" if compact else f"opposite sign to paper's {paper}: {ci}"
    if gain.low > paper_gain:
        judgement = f"gain above paper's {paper}"
    elif gain.low <= 0.0 <= gain.high:
        return f"below paper's {paper}, n.s." if compact else f"gain not significant, below paper's {paper}: {ci}"
    else:
        judgement = f"gain below paper's {paper}"
    return judgement if compact else f"{judgement}: {ci}"


def detection_gain_verdict(plain: bool, gain: GainInterval | None, paper_gain: float | None, ap: float | None,
                           paper_ap: float | None, compact: bool = False) -> str:
    """The verdict of a COCO row judged on the gain (trained with another engine or protocol than the
    authors'): an attention backbone's by gain_vs_paper_verdict; a plain backbone (the baseline) is not
    judged itself, its AP is put beside the paper's for orientation. The report builds it in full; the
    compact console view asks again with `compact` (its Gain column shows the CI)."""
    if not plain:
        return gain_vs_paper_verdict(gain, paper_gain, compact)
    if ap is None or paper_ap is None:
        return "baseline"
    text = f"baseline; AP {ap - paper_ap:+.2f} vs paper"
    return text if compact else f"{text}, not judged"


def is_reproduced(verdict: str) -> bool:
    """Whether a verdict string says the paper's figure (or gain) was reproduced."""
    return verdict == "reproduced" or verdict.startswith("gain reproduced")
