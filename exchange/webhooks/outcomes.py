"""What follows from one attempt's answer (pure: no I/O, no clock), and what a worker reports per event.

* 2xx → ``delivered``; the broker's count of consecutive failed events goes back to 0.
* 410 Gone → the event ``failed`` and the endpoint disabled at once (the receiver said it will never want more).
* anything else (other status, timeout, refused connection, SSRF refusal, a URL that cannot be requested) →
  retried after the schedule's next delay while the schedule lasts, else ``failed`` ("exhausted"), which counts
  one more consecutive failed event for the broker (the endpoint is disabled at ``disable_after``).

That is the verdict; what the worker reports (:class:`Outcome`) is the record's: a failed attempt whose event a
redeliver or a newer attempt took over since its claim is fenced off by the record (it neither fails the event nor
schedules its retry) and reported ``superseded`` (:func:`exchange.webhooks.store.record`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from exchange.webhooks import schedule


class Kind(StrEnum):
    """How an attempt is recorded (the record statement switches on these values)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GONE = "gone"
    EXHAUSTED = "exhausted"


class Outcome(StrEnum):
    """What happened to an event in one pass of a worker, as recorded (the metrics' ``outcome`` label and the
    worker's log line)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    """Failed; another attempt is scheduled."""
    FAILED = "failed"
    """Failed for good (schedule exhausted, or 410 Gone)."""
    SKIPPED = "skipped"
    """Not sent: no URL or endpoint disabled."""
    SUPERSEDED = "superseded"
    """Failed, but the record's fence set it aside: since its claim the event was redelivered, claimed again (the
    attempt's lease ran out) or ended by another attempt, which decides what happens to it; this attempt neither
    failed it nor scheduled its retry (it is still logged and still judges the broker's endpoint)."""


_OUTCOME_OF = {
    Kind.DELIVERED: Outcome.DELIVERED,
    Kind.RETRY: Outcome.RETRY,
    Kind.GONE: Outcome.FAILED,
    Kind.EXHAUSTED: Outcome.FAILED,
}


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    retry_in_s: float | None = None
    """Seconds until the next attempt (``retry`` only)."""
    disable_reason: str | None = None
    """Why the endpoint is disabled, if this attempt disables it (``gone``; ``exhausted`` at the limit)."""

    @property
    def outcome(self) -> Outcome:
        """The outcome the verdict asks for; the record may report :attr:`Outcome.SUPERSEDED` instead."""
        return _OUTCOME_OF[self.kind]


def judge(
    status_code: int | None,
    error: str | None,
    *,
    attempt: int,
    started: datetime,
    retry_schedule: Sequence[float],
    disable_after: int,
) -> Verdict:
    """The verdict on attempt number ``attempt`` that got ``status_code`` (None: no answer, see ``error``)."""
    if status_code is not None and 200 <= status_code < 300:
        return Verdict(Kind.DELIVERED)
    if status_code == 410:
        return Verdict(
            Kind.GONE, disable_reason=f"receiver answered 410 Gone at {started.isoformat(timespec='seconds')}"
        )
    retry_in = schedule.retry_delay(retry_schedule, attempt)
    if retry_in is not None:
        return Verdict(Kind.RETRY, retry_in_s=retry_in)
    reason = f"{disable_after} consecutive events failed after every retry; last error: {error}"
    return Verdict(Kind.EXHAUSTED, disable_reason=reason[:1000])


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One event's outcome in one pass (``attempt`` and the answer are None for ``skipped``)."""

    event_id: UUID
    outcome: Outcome
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    retry_in_s: float | None = None
    seconds: float | None = None
    """How long the HTTP attempt took."""
