"""Retry schedule: when the next attempt of a failed delivery is due.

Attempt ``n`` (1-based) that fails is followed by attempt ``n + 1`` after ``schedule[n - 1]`` seconds, ±``JITTER``
(so receivers coming back after an outage are not hit by every event at the same instant); after attempt
``len(schedule) + 1`` fails, the event is given up (``failed``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

JITTER = 0.2
_RNG = random.Random()  # noqa: S311  # jitter, not cryptography


def retry_delay(schedule: Sequence[float], attempts: int, rng: random.Random | None = None) -> float | None:
    """Seconds to wait after the ``attempts``-th attempt failed, or None when there is no retry left."""
    if attempts < 1 or attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    factor = 1.0 + (rng or _RNG).uniform(-JITTER, JITTER)
    return base * factor
