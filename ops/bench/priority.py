"""The generator's claim on the CPU: a scheduling group of its own at a raised priority, when it may have one.

On a machine the server saturates, a sender that wakes for its next scheduled request waits for a core like every
other process, and the run then counts the generator's own wait as the server's latency (and, by its schedule lag,
declares itself invalid). A generator on a machine of its own would not wait. Linux shares the CPU between
*sessions* first when autogroup scheduling is on (``/proc/sys/kernel/sched_autogroup_enabled``, the default of
most distributions' kernels), so a process's nice value only orders it within its session: each sender and the
webhook receiver therefore start a session of their own and set that session's nice value (``/proc/self/autogroup``),
and their own nice value too, for kernels without autogroup. The exchange's processes keep their share: they get
whatever the generator leaves, as they would beside a generator on another machine.

Lowering a nice value needs root or CAP_SYS_NICE (or an RLIMIT_NICE that allows it). Without them the process stays
at its priority, and the outcome says so (the report prints it): on a saturated machine such a run measures the
generator's waits too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")


def raise_priority(nice: int) -> str:
    """Run this process (a forked worker: it must not lead a process group) in a session of its own at ``nice``
    (< 0 raises it; 0 changes nothing). Returns what was done, for the report; never raises."""
    if nice == 0:
        return "not raised (--nice 0)"
    with contextlib.suppress(OSError):  # already leads its group (run in-process): keep the session it has
        os.setsid()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        return f"not raised ({exc.strerror or exc.__class__.__name__}: needs root or CAP_SYS_NICE)"
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError:
        return f"nice {nice} (no autogroup scheduling)"
    return f"nice {nice}, own scheduling group"
