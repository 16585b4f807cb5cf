"""Retry delays for exports: exponential with a cap (dcm4chee's forwarding queue rules)."""

from __future__ import annotations

from datetime import timedelta


def next_delay(attempts: int, initial: float, multiplier: float, ceiling: float) -> timedelta:
    """Delay before attempt ``attempts + 1`` after ``attempts`` failed ones (attempts >= 1)."""
    seconds = initial * (multiplier ** max(0, attempts - 1))
    return timedelta(seconds=min(seconds, ceiling))
