"""Confidence intervals for sample means (indirect effects are plain sample means, METHOD.md §8).

Neither scipy nor a Student-t quantile in torch is available here (`torch.distributions.StudentT.icdf` and `.cdf` raise
NotImplementedError in torch 2.13, and `torch.special` has no incomplete beta), so the t quantile is computed in pure
Python: the t CDF through the regularized incomplete beta function (Lentz continued fraction, Numerical Recipes
§6.4), inverted by bisection. The bootstrap uses a seeded numpy Generator, so the same seed gives the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Method = Literal["t", "bootstrap"]
_CF_EPS = 1e-15  # relative convergence threshold of the continued fraction
_CF_TINY = 1e-300  # guards the Lentz recurrences against division by zero
_CF_MAX_ITER = 100_000  # enough for df up to ~1e9 (iterations grow like sqrt(df))
_BISECT_ITER = 200  # bisection steps; stops earlier once the bracket no longer shrinks in float64
# Beyond this df, lgamma cancellation in the incomplete beta costs precision (~1e-10 here, growing like df), while
# the two-term asymptotic expansion of the quantile is already exact to ~1e-14 (next term ~2.6/df³).
_LARGE_DF = 1e5
_BOOT_CHUNK = 1_000_000  # resampled values drawn per numpy call, bounds memory for large n


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _CF_TINY else _CF_TINY
            delta = c * d
            h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    `y` = 1 - x may be passed when the caller has it without cancellation (x close to 1), which keeps full precision.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}")
    y = 1.0 - x if y is None else y
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with `df` degrees of freedom (df = inf: the normal CDF); error < 1e-10 up to df = 1e5."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t: the t with `t_cdf(t, df) == p` (relative accuracy ~1e-10 or better).

    Bisection on `t_cdf`; for df > 1e5 (and df = inf) the normal quantile with its asymptotic t correction
    (Abramowitz & Stegun 26.7.5).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if df > _LARGE_DF:
        # Abramowitz & Stegun 26.7.5: t = z + g1(z)/df + g2(z)/df² + O(df⁻³)
        z = NormalDist().inv_cdf(p)
        return z + (z**3 + z) / (4.0 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96.0 * df**2)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(_BISECT_ITER):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """A sample mean with a two-sided confidence interval [low, high].

    `low`/`high` are NaN when n < 2; `mean` is NaN when n == 0. `seed` is the bootstrap seed (None for "t").
    """

    mean: float
    low: float
    high: float
    n: int
    method: str
    seed: int | None
    level: float = 0.95

    @property
    def half_width(self) -> float:
        """(high - low) / 2; exact for the symmetric t interval, a summary for a (possibly skewed) bootstrap one."""
        return (self.high - self.low) / 2.0


def mean_ci(
    values: Iterable[float],
    level: float = 0.95,
    method: Method = "t",
    seed: int = 0,
    n_boot: int = 10_000,
) -> MeanCI:
    """Mean of `values` with a `level` confidence interval.

    method "t": mean ± t_{(1+level)/2, n-1} · s/√n (s = sample standard deviation, ddof 1).
    method "bootstrap": percentile interval of `n_boot` resampled means drawn with `np.random.default_rng(seed)`.
    n == 0 gives NaN everywhere, n == 1 the value with a NaN interval. Non-finite values are an error (an IE list
    with NaN means a probability was missing upstream).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be a flat sequence of numbers, got shape {x.shape}")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{bad} of {x.size} values are not finite (NaN or inf)")
    n = int(x.size)
    used_seed = seed if method == "bootstrap" else None
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0, method, used_seed, level)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, 1, method, used_seed, level)
    alpha = 1.0 - level
    if method == "t":
        half = t_quantile(1.0 - alpha / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
        return MeanCI(mean, mean - half, mean + half, n, method, None, level)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _BOOT_CHUNK // n)
    sizes = [min(per_chunk, n_boot - start) for start in range(0, n_boot, per_chunk)]
    means = np.concatenate([x[rng.integers(0, n, size=(size, n))].mean(axis=1) for size in sizes])
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return MeanCI(mean, float(low), float(high), n, method, seed, level)
