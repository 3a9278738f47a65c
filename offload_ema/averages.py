"""The averages an Averager keeps: their parameters, validation and schedules.

Steps count from 1 at the first ``optimizer.step()``. An average is *due* after step ``s`` when
``s > start`` and ``(s - start) % every == 0``; a snapshot of the parameters is taken at every
step where at least one average is due, and feeds all of them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["EMA", "LAWA"]


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


@dataclass(frozen=True)
class EMA(_Schedule):
    """Exponential moving average of the parameters.

    The first applied snapshot initialises ``avg = theta``; every later one does
    ``avg = beta * avg + (1 - beta) * theta`` (beta applies per applied snapshot, as in
    ``torch.optim.swa_utils.get_ema_multi_avg_fn``). The accumulator is float32 whatever the
    parameter dtype.

    Args:
        beta (float): decay per applied snapshot, in [0, 1).
        every (int, default 1): take a snapshot every ``every`` steps.
        start (int, default 0): steps before the first snapshot (burn-in).

    Example:
        >>> oe.EMA(0.999)                 # every step
        >>> oe.EMA(0.99, every=10, start=1000)
    """

    beta: float
    every: int = 1
    start: int = 0

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not (
                0.0 <= float(self.beta) < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "every", check_int(self.every, "every", 1))
        object.__setattr__(self, "start", check_int(self.start, "start", 0))

    kind = "ema"

    def weight(self, periods: int = 1) -> float:
        """Weight of a snapshot that stands for ``periods`` due snapshots (coalescing)."""
        return 1.0 - self.beta ** periods

    def config(self) -> dict:
        return {"kind": "ema", "beta": self.beta, "every": self.every, "start": self.start}


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
