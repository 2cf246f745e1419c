"""Confidence intervals: 1.96·sd/√n over many test tasks, Student's t over a few seeds."""

from __future__ import annotations

import math

import numpy as np

# Student's t, two-sided 95% (the 0.975 quantile), for n − 1 = 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t quantile for a 95% interval; past 30 degrees of freedom 1.96 + 2.5/df (within 0.002)."""
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.5 / df


def mean_ci95(values: np.ndarray, student: bool = False) -> tuple[float, float]:
    """Mean and half-width of the 95% interval, z · std / √n (sample std): z = 1.96 over many
    tasks (the field's convention), Student's t over a few seeds (``student``), where 1.96
    would be 2.2× too narrow for 3 seeds and 6.5× for 2."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    z = t975(values.size - 1) if student else 1.96
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


#: the equivalence margin stated in advance (issue #23): ±1.5 accuracy points at ~20% density
EQUIVALENCE_MARGIN = 0.015
#: seeds below which a paired comparison is not called equivalent, whatever its interval
MIN_EQUIVALENCE_SEEDS = 8


def equivalence(diffs: np.ndarray, margin: float = EQUIVALENCE_MARGIN,
                min_seeds: int = MIN_EQUIVALENCE_SEEDS) -> str:
    """The verdict on paired differences (one per seed) against ±``margin``, from their 95%
    Student-t interval — a two one-sided test at 2.5% each side, stricter than the usual 90%
    TOST interval: ``equivalent`` (inside ±margin), ``better``/``worse`` (wholly above or below
    it), ``not worse`` (above −margin, reaching past +margin), ``inconclusive`` (reaching past
    −margin), or ``too few seeds`` (fewer than ``min_seeds``: the interval is then too wide to
    be trusted with a verdict of equivalence)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size < 2:
        return "too few seeds"
    mean, half = mean_ci95(diffs, student=True)
    low, high = mean - half, mean + half
    if high < -margin:
        return "worse"
    if low > margin:
        return "better"
    if diffs.size < min_seeds:
        return "too few seeds"
    if -margin < low and high < margin:
        return "equivalent"
    return "not worse" if low > -margin else "inconclusive"
