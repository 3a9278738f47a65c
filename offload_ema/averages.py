"""The averages an Averager keeps: their parameters, validation and schedules.

Steps count from 1 at the first ``optimizer.step()``. An average is *due* after step ``s`` when
``s > start`` and ``(s - start) % every == 0``; a snapshot of the parameters is taken at every
step where at least one average is due, and feeds all of them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

__all__ = ["EMA", "PowerEMA", "SWA", "LAWA", "Decaying", "sigma_rel_to_gamma"]


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming the argument and what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _Schedule:
    every: int
    start: int

    def is_due(self, step: int) -> bool:
        """Whether this average takes the snapshot of step ``step``."""
        return step > self.start and (step - self.start) % self.every == 0

    def periods(self, from_step: int, to_step: int) -> int:
        """Due steps in (from_step, to_step]."""
        def count(s):
            return max(0, (s - self.start) // self.every) if s > self.start else 0
        return count(to_step) - count(from_step)


class Decaying(_Schedule):
    """An average kept as ``avg = beta_k * avg + (1 - beta_k) * theta`` for its k-th snapshot
    period (``beta_1 = 0``: the first initialises). Its weights are computed by the worker from
    the periods it has applied, so they stay exact when a snapshot is dropped or coalesced."""

    def beta_at(self, k: int) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def weight(self, done: int, periods: int = 1) -> float:
        """Weight of a snapshot that stands for ``periods`` due periods after ``done`` periods
        already applied: ``1 - prod(beta_k)`` over k = done+1 .. done+periods (a coalesced
        snapshot stands in for the ones it replaces)."""
        keep = 1.0
        for k in range(done + 1, done + periods + 1):
            keep *= self.beta_at(k)
        return 1.0 - keep


@dataclass(frozen=True)
class EMA(Decaying):
    """Exponential moving average of the parameters.

    The first applied snapshot initialises ``avg = theta``; every later one does
    ``avg = beta_k * avg + (1 - beta_k) * theta`` (beta applies per applied snapshot, as in
    ``torch.optim.swa_utils.get_ema_multi_avg_fn``). The accumulator is float32 whatever the
    parameter dtype. With ``warmup_gamma`` the decay warms up as in timm / diffusers:
    ``beta_k = min(beta, max(min_beta, 1 - (1 + (k - 1) / warmup_gamma) ** -warmup_power))``.

    Args:
        beta (float): decay per applied snapshot, in [0, 1).
        every (int, default 1): take a snapshot every ``every`` steps.
        start (int, default 0): steps before the first snapshot (burn-in).
        warmup_gamma (float, optional): warm-up horizon (> 0) in snapshots; None: constant beta.
        warmup_power (float, default 2/3): warm-up exponent (> 0); 3/4 for shorter runs.
        min_beta (float, default 0.0): lower clamp of the warmed-up beta, in [0, beta].

    Example:
        >>> oe.EMA(0.999)                 # every step
        >>> oe.EMA(0.99, every=10, start=1000)
        >>> oe.EMA(0.9999, warmup_gamma=1.0, warmup_power=2 / 3)
    """

    beta: float
    every: int = 1
    start: int = 0
    warmup_gamma: Optional[float] = None
    warmup_power: float = 2 / 3
    min_beta: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "beta", _check_unit(self.beta, "beta"))
        object.__setattr__(self, "every", check_int(self.every, "every", 1))
        object.__setattr__(self, "start", check_int(self.start, "start", 0))
        if self.warmup_gamma is not None:
            object.__setattr__(self, "warmup_gamma",
                               _check_positive(self.warmup_gamma, "warmup_gamma"))
        object.__setattr__(self, "warmup_power", _check_positive(self.warmup_power,
                                                                 "warmup_power"))
        min_beta = _check_unit(self.min_beta, "min_beta")
        if min_beta > self.beta:
            raise ValueError(f"min_beta must be <= beta ({self.beta}), got {min_beta}")
        object.__setattr__(self, "min_beta", min_beta)

    kind = "ema"

    def beta_at(self, k: int) -> float:
        if k <= 1:
            return 0.0
        if self.warmup_gamma is None:
            return self.beta
        warm = 1.0 - (1.0 + (k - 1) / self.warmup_gamma) ** -self.warmup_power
        return min(self.beta, max(self.min_beta, warm))

    def config(self) -> dict:
        cfg = {"kind": "ema", "beta": self.beta, "every": self.every, "start": self.start}
        if self.warmup_gamma is not None:  # absent otherwise: states saved before stay loadable
            cfg.update(warmup_gamma=self.warmup_gamma, warmup_power=self.warmup_power,
                       min_beta=self.min_beta)
        return cfg


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's conversion of a power EMA's relative standard deviation to its exponent: the real
    root of ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0``."""
    import numpy as np

    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


@dataclass(frozen=True)
class PowerEMA(Decaying):
    """EDM2's power-function EMA (Karras et al., 2024): ``beta_k = (1 - 1/k) ** (gamma + 1)``
    for the k-th snapshot, so the average weighs snapshot i of the first k by about
    ``i ** gamma``. Give exactly one of ``sigma_rel`` (its width relative to the training
    length, as in EDM2: 0.05 to 0.1 typical, < 0.2887) or ``gamma`` (>= 0).

    Example:
        >>> oe.PowerEMA(0.08)            # sigma_rel
        >>> oe.PowerEMA(gamma=16.97, every=10)
    """

    sigma_rel: Optional[float] = None
    gamma: Optional[float] = None
    every: int = 1
    start: int = 0

    def __post_init__(self):
        if (self.sigma_rel is None) == (self.gamma is None):
            raise ValueError("give exactly one of sigma_rel and gamma, got "
                             f"sigma_rel={self.sigma_rel!r}, gamma={self.gamma!r}")
        if self.sigma_rel is not None:
            s = self.sigma_rel
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (
                    0.0 < float(s) < 12 ** -0.5):
                raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {s!r}")
            object.__setattr__(self, "sigma_rel", float(s))
            object.__setattr__(self, "gamma", sigma_rel_to_gamma(float(s)))
        else:
            g = self.gamma
            if isinstance(g, bool) or not isinstance(g, numbers.Real) or not float(g) >= 0.0:
                raise ValueError(f"gamma must be a number >= 0, got {g!r}")
            object.__setattr__(self, "gamma", float(g))
        object.__setattr__(self, "every", check_int(self.every, "every", 1))
        object.__setattr__(self, "start", check_int(self.start, "start", 0))

    kind = "power_ema"

    def beta_at(self, k: int) -> float:
        return (1.0 - 1.0 / k) ** (self.gamma + 1.0) if k > 1 else 0.0

    def config(self) -> dict:
        return {"kind": "power_ema", "gamma": self.gamma, "sigma_rel": self.sigma_rel,
                "every": self.every, "start": self.start}


@dataclass(frozen=True)
class SWA(Decaying):
    """The running mean of every snapshot since ``start`` (stochastic weight averaging, as
    ``torch.optim.swa_utils.AveragedModel``'s default): ``beta_k = (k - 1) / k``. A float32
    accumulator, no window buffers.

    Example:
        >>> oe.SWA(every=100, start=10_000)
    """

    every: int = 1
    start: int = 0

    def __post_init__(self):
        object.__setattr__(self, "every", check_int(self.every, "every", 1))
        object.__setattr__(self, "start", check_int(self.start, "start", 0))

    kind = "swa"

    def beta_at(self, k: int) -> float:
        return (k - 1) / k if k > 1 else 0.0

    def config(self) -> dict:
        return {"kind": "swa", "every": self.every, "start": self.start}


def _check_unit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LAWA(_Schedule):
    """Latest weight averaging: the arithmetic mean of the last ``window`` snapshots taken on
    this schedule (the snapshots of a ``collections.deque(maxlen=window)``).

    Slots store the parameter dtype exactly (bf16 stays bf16); the mean is computed in float64
    and rounded to float32.

    Args:
        window (int): snapshots averaged, >= 1.
        every (int): steps between snapshots, >= 1.
        start (int, default 0): steps before the first snapshot (burn-in).

    Example:
        >>> oe.LAWA(window=10, every=100)
    """

    window: int
    every: int
    start: int = 0

    def __post_init__(self):
        object.__setattr__(self, "window", check_int(self.window, "window", 1))
        object.__setattr__(self, "every", check_int(self.every, "every", 1))
        object.__setattr__(self, "start", check_int(self.start, "start", 0))

    kind = "lawa"

    def config(self) -> dict:
        return {"kind": "lawa", "window": self.window, "every": self.every, "start": self.start}
