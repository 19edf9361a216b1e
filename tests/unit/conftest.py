"""Hypothesis profiles for the engine's property tests.

``ci`` (loaded when the ``CI`` env var is set) and ``default`` both run >= 200 examples per property without a
deadline (the naive reference is slow on purpose); ``HYPOTHESIS_PROFILE`` picks any registered profile
explicitly, e.g. ``HYPOTHESIS_PROFILE=thorough`` for a long local run.
"""

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

settings.register_profile("default", max_examples=200, **_COMMON)
settings.register_profile("ci", max_examples=300, derandomize=False, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=5000, **_COMMON)
settings.register_profile("quick", max_examples=25, **_COMMON)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))
