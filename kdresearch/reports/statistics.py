"""Differences between two configurations' results over seeds: the mean difference, its 95 %
Student-t confidence interval and the two-sided p-value of the t-test (scipy.stats).

Runs with one fixed seed see the same data order and start from the same weights, so a method's
run of seed s and the reference's run of seed s form a pair. `seed_difference` pairs them when
every seed of the compared side has a run of the reference (each seed once on both sides): the
interval and test are then those of the per-seed differences (`scipy.stats.ttest_rel`). Otherwise
the two sides are independent samples, compared with Welch's t (unequal variances,
Welch–Satterthwaite degrees of freedom, `scipy.stats.ttest_ind(equal_var=False)`).

With one value on a side (one pair, or one run on either side of an unpaired difference) there is
no spread to estimate, and with values that do not vary the t statistic is undefined: such a
difference has its mean but no interval and no p-value. A difference (or a cell) over fewer than
FEW_SEEDS seeds is marked: its interval is too wide, or its spread too poorly estimated, to trust.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

CONFIDENCE = 0.95
FEW_SEEDS = 3
PAIRED = "paired t"
WELCH = "Welch t"
# Spread below this fraction of the values' size is rounding, not variation (SciPy then warns of
# catastrophic cancellation and its t statistic means nothing).
NO_SPREAD = 1e-9

FOOTNOTE = (f"Δ: difference of the means in percentage points, with its {CONFIDENCE * 100:.0f} % Student-t "
            "confidence interval [low, high] and the two-sided p-value of the t-test; paired by seed (the per-seed "
            "differences: same data order, same initial weights) when every seed of the row has a run of the "
            "reference, else Welch's unpaired t-test (unequal variances; marked Welch, n=the row's seeds vs the "
            f"reference's); n: seeds; < {FEW_SEEDS} seeds: too few to trust the spread; no interval with one seed "
            "on a side or when the values do not vary")


@dataclass(frozen=True)
class Difference:
    """The compared side's mean minus the reference's (paired: the mean per-seed difference)."""

    mean: float
    low: Optional[float]  # the confidence interval; None when there is no spread to estimate it from
    high: Optional[float]
    p_value: Optional[float]
    test: str  # PAIRED or WELCH
    n: int  # pairs (PAIRED) or values of the compared side (WELCH)
    n_reference: int  # values of the reference side (equal to n when PAIRED)

    @property
    def few_seeds(self) -> bool:
        return min(self.n, self.n_reference) < FEW_SEEDS

    def format(self, digits: int = 2) -> str:
        """`+1.23 [+0.10, +2.36] (n=5)`, `-0.40 [-2.10, +1.30] (n=2 vs 5, Welch, < 3 seeds)`,
        `+1.23 (n=1, < 3 seeds, no interval)`."""
        text = f"{self.mean:+.{digits}f}"
        if self.low is not None:
            text += f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        notes = [f"n={self.n}" if self.test == PAIRED else f"n={self.n} vs {self.n_reference}, Welch"]
        if self.few_seeds:
            notes.append(f"< {FEW_SEEDS} seeds")
        if self.low is None:
            notes.append("no interval")
        return f"{text} ({', '.join(notes)})"

    def format_p(self) -> str:
        return format_p(self.p_value)


def format_p(p_value: Optional[float]) -> str:
    if p_value is None:
        return "—"
    return f"{p_value:.3f}" if p_value >= 0.001 else "< 0.001"


def seed_count(n: int) -> str:
    """A cell's number of seeds, marked when too few: `n=5`, `n=2, < 3 seeds`."""
    return f"n={n}" if n >= FEW_SEEDS else f"n={n}, < {FEW_SEEDS} seeds"


def _varies(values: Sequence[float]) -> bool:
    if len(values) < 2:
        return False
    scale = max(1.0, max(abs(value) for value in values))
    return statistics.stdev(values) > NO_SPREAD * scale


def _interval(mean: float, standard_error: float, degrees_of_freedom: float) -> tuple[float, float]:
    from scipy import stats

    half_width = float(stats.t.ppf((1 + CONFIDENCE) / 2, degrees_of_freedom)) * standard_error
    return mean - half_width, mean + half_width


def mean_interval(values: Sequence[float]) -> Optional[tuple[float, float]]:
    """The 95 % Student-t confidence interval of the mean of `values` (one per seed); None with
    fewer than two values or values that do not vary (no spread to estimate it from)."""
    if not _varies(list(values)):
        return None
    mean, n = statistics.fmean(values), len(values)
    return _interval(mean, statistics.stdev(values) / math.sqrt(n), n - 1)


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> Difference:
    """`values[i] - reference[i]` over pairs i (one seed each): mean, interval and `ttest_rel`'s p-value."""
    from scipy import stats

    if len(values) != len(reference) or not values:
        raise ValueError(f"a paired difference needs as many values as reference values, got "
                         f"{len(values)} and {len(reference)}")
    differences = [value - base for value, base in zip(values, reference)]
    mean, n = statistics.fmean(differences), len(differences)
    interval = mean_interval(differences)
    if interval is None:
        return Difference(mean, None, None, None, PAIRED, n, n)
    low, high = interval
    return Difference(mean, low, high, float(stats.ttest_rel(values, reference).pvalue), PAIRED, n, n)


def welch_difference(values: Sequence[float], reference: Sequence[float]) -> Difference:
    """mean(values) - mean(reference) of independent samples: Welch's interval and `ttest_ind`'s p-value."""
    from scipy import stats

    if not values or not reference:
        raise ValueError("an unpaired difference needs at least one value on each side")
    mean = statistics.fmean(values) - statistics.fmean(reference)
    n, n_reference = len(values), len(reference)
    if n < 2 or n_reference < 2 or not (_varies(values) or _varies(reference)):
        return Difference(mean, None, None, None, WELCH, n, n_reference)
    share, share_reference = statistics.variance(values) / n, statistics.variance(reference) / n_reference
    degrees_of_freedom = (share + share_reference) ** 2 / (
        share ** 2 / (n - 1) + share_reference ** 2 / (n_reference - 1))
    low, high = _interval(mean, math.sqrt(share + share_reference), degrees_of_freedom)
    p_value = float(stats.ttest_ind(values, reference, equal_var=False).pvalue)
    return Difference(mean, low, high, p_value, WELCH, n, n_reference)


def seed_difference(values: Iterable[tuple[Optional[int], Optional[float]]],
                    reference: Iterable[tuple[Optional[int], Optional[float]]]) -> Optional[Difference]:
    """`values` minus `reference`, each given as (seed, value) per run (value None: left out):
    paired by seed when every seed of `values` is one of `reference`'s (each seed once on both
    sides, none None), else Welch's. None when a side has no value."""
    values = [(seed, value) for seed, value in values if value is not None]
    reference = [(seed, value) for seed, value in reference if value is not None]
    if not values or not reference:
        return None
    seeds, reference_seeds = [seed for seed, _ in values], [seed for seed, _ in reference]
    by_seed = dict(reference)
    if (None not in seeds and None not in reference_seeds and len(set(seeds)) == len(seeds)
            and len(by_seed) == len(reference) and set(seeds) <= set(by_seed)):
        return paired_difference([value for _, value in values], [by_seed[seed] for seed in seeds])
    return welch_difference([value for _, value in values], [value for _, value in reference])
