"""Routing of a symbol's work: partition queue, dramatiq actor name and Postgres advisory-lock key.

Invariants: the same symbol always maps to the same partition for a given partition count, and to the same
64-bit lock key in every process (no use of Python's randomized ``hash``).
"""

from __future__ import annotations

import hashlib
import zlib

MATCHING_QUEUE_PREFIX = "matching."
WEBHOOK_QUEUE = "webhooks"


def partition_of(symbol: str, partitions: int) -> int:
    """``crc32(symbol) % partitions`` (DESIGN §3): stable across processes and languages."""
    return zlib.crc32(symbol.encode("utf-8")) % partitions


def matching_queue(partition: int) -> str:
    return f"{MATCHING_QUEUE_PREFIX}{partition}"


def matching_actor(partition: int) -> str:
    return f"match_{partition}"


def book_lock_key(symbol: str) -> int:
    """Signed 64-bit key for ``pg_advisory_xact_lock``: one writer per book."""
    digest = hashlib.blake2b(b"exchange:book:" + symbol.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def parse_partitions(spec: str, partitions: int) -> list[int]:
    """Parse ``"all"``, ``"3"``, ``"0-3"`` or ``"0,2,5-7"`` into sorted partition numbers < ``partitions``.

    Raises ValueError with a readable message on anything else.
    """
    if spec.strip() == "all":
        return list(range(partitions))
    chosen: set[int] = set()
    for part in spec.split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise ValueError(f"bad partition range {part!r} in {spec!r}") from None
        if not 0 <= lo <= hi < partitions:
            raise ValueError(f"partition range {part!r} outside 0..{partitions - 1}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise ValueError("no partitions given")
    return sorted(chosen)
