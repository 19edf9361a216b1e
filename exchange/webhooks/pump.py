"""The delivery worker's engine: one :class:`Pump` per process, on one asyncio event loop.

Three parts run independently, so a slow receiver stalls only its own deliveries and a slow database only
delays bookkeeping:

* **claimer** — when woken (a hint arrived, a retry came due, the worker started) and while due events remain,
  claims in ONE statement as many as there is room for (``capacity`` deliveries in flight per process, at most
  ``max_in_flight`` per broker) and starts one task per event;
* **deliveries** — each POSTs its event (:func:`exchange.webhooks.delivery.attempt`); when it ends its slot is
  free at once and its attempt is queued for the recorder;
* **recorder** — records every attempt queued so far in ONE statement, again and again (group commit: the more
  deliveries end while a statement runs, the bigger the next one), then reports each result and arms a local
  timer for the retries it scheduled.

Nothing here is state the database does not have. A claimed event whose attempt is never recorded (process
killed, database unreachable for longer than half a lease) is due again when its lease ends; the sweeper then
hints the workers about it. Deliveries are concurrent, also within one broker (up to ``max_in_flight``): receivers
order events by their per-broker ``sequence``, which is gap-free.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from uuid import UUID

from sqlalchemy import Engine

from exchange.webhooks import store
from exchange.webhooks.delivery import DeliveryConfig, Endpoints, attempt
from exchange.webhooks.http import HttpClient
from exchange.webhooks.outcomes import DeliveryResult, Outcome
from exchange.webhooks.store import Attempt, Claim

log = logging.getLogger("exchange.webhooks")

CLAIM_ERROR_PAUSE_S = 1.0
"""After a failed claim (database down), wait this long before claiming again."""
RECORD_BACKOFF_S = (0.05, 2.0)
"""First and longest pause between tries of a failed record statement."""
FAN_OUT_INTERVAL_S = 0.1
"""At most one "more events are due" hint to the other workers per this many seconds."""
TIMER_GRANULARITY_S = 0.05
MAX_LOCAL_DELAY_S = 900.0
"""Retries due later than this are not timed in-process; the sweeper hints the workers when they are overdue."""

Observer = Callable[[DeliveryResult], None]


class Pump:
    """Claims, delivers and records webhook events (see the module docstring). Use it from one event loop."""

    def __init__(
        self,
        engine: Engine,
        config: DeliveryConfig,
        *,
        capacity: int,
        observe: Observer | None = None,
        fan_out: Callable[[], None] | None = None,
    ) -> None:
        """``capacity``: deliveries in flight at once. ``observe`` gets every result after it is recorded.
        ``fan_out`` (blocking, must not raise; called in a worker thread) tells the other worker processes that
        more events are due: called when a claim was full."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.engine = engine
        self.config = config
        self.capacity = capacity
        self._observe = observe
        self._fan_out = fan_out
        self._http = HttpClient(connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s)
        self._running = 0
        self._busy: dict[UUID, int] = {}
        """Deliveries in flight per broker."""
        self._finished: list[Attempt] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._wake.set()  # a pump starts by claiming whatever is due already (left by a worker that died, say)
        self._slot_freed = asyncio.Event()
        self._to_record = asyncio.Event()
        self._changed = asyncio.Event()
        self._claiming = False
        self._recording = False
        self._stopping = False
        self._timers: set[float] = set()
        self._last_fan_out = -math.inf

    def wake(self) -> None:
        """Events may be due: claim them (from the pump's loop; see :class:`PumpThread` for other threads)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, then finish what is in flight (bounded by the timeouts) and record it."""
        claimer = asyncio.create_task(self._claim_loop())
        recorder = asyncio.create_task(self._record_loop())
        try:
            await stop.wait()
        finally:
            self._stopping = True
            self._wake.set()
            self._slot_freed.set()
            await asyncio.wait({claimer}, timeout=self.config.connect_timeout_s)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.config.connect_timeout_s + self.config.read_timeout_s)
            recorded = asyncio.create_task(self._recorded())
            await asyncio.wait({recorded}, timeout=self.config.lease_s / 2)
            for task in (claimer, recorder, recorded, *self._tasks):
                task.cancel()
            self._http.close()

    async def idle(self) -> None:
        """Return once nothing is due that this pump may claim, nothing is in flight and everything is recorded."""
        while not self._is_idle():
            self._changed.clear()
            await self._changed.wait()

    # --------------------------------------------------------------------------------------------- claimer

    def _is_idle(self) -> bool:
        return not (self._wake.is_set() or self._claiming or self._running or self._finished or self._recording)

    async def _claim_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            self._claiming = True
            try:
                await self._claim_while_due()
            except Exception:
                log.warning("claiming webhook events failed; retrying in %g s", CLAIM_ERROR_PAUSE_S, exc_info=True)
                await asyncio.sleep(CLAIM_ERROR_PAUSE_S)
                self._wake.set()
            finally:
                self._claiming = False
                self._changed.set()

    async def _claim_while_due(self) -> None:
        while not self._stopping:
            # Cleared before the room is read: a delivery ending from here on (even during the claim) sets it.
            self._slot_freed.clear()
            room = self.capacity - self._running
            # Claim in batches: with deliveries in flight, wait until half the slots are free.
            if room < (1 if self._running == 0 else max(1, self.capacity // 2)):
                await self._slot_freed.wait()
                continue
            busy = dict(self._busy)
            claimed = await asyncio.to_thread(
                store.claim,
                self.engine,
                limit=room,
                lease_s=self.config.lease_s,
                per_broker=self.config.max_in_flight,
                busy=busy,
            )
            for event_id in claimed.skipped:
                self._report(DeliveryResult(event_id, Outcome.SKIPPED))
            self._start(claimed.claims)
            taken = len(claimed.claims) + len(claimed.skipped)
            if taken >= room:
                self._hint_others()
            elif taken == 0:
                # Judged on what the claim saw: brokers at their cap then were not even looked at.
                if all(n < self.config.max_in_flight for n in busy.values()):
                    return  # nothing due that this worker may take
                await self._slot_freed.wait()  # due events of brokers at their cap: claim when one finishes

    def _hint_others(self) -> None:
        now = time.monotonic()
        if self._fan_out is None or now - self._last_fan_out < FAN_OUT_INTERVAL_S:
            return
        self._last_fan_out = now
        self._track(asyncio.create_task(asyncio.to_thread(self._fan_out)))

    # ------------------------------------------------------------------------------------------ deliveries

    def _start(self, claims: Iterable[Claim]) -> None:
        endpoints = Endpoints(self.config)
        for claim in claims:
            self._running += 1
            self._busy[claim.broker_id] = self._busy.get(claim.broker_id, 0) + 1
            self._track(asyncio.create_task(self._deliver(claim, endpoints)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, claim: Claim, endpoints: Endpoints) -> None:
        try:
            finished = await attempt(self._http, endpoints, claim, self.config)
        finally:
            self._running -= 1
            left = self._busy[claim.broker_id] - 1
            if left:
                self._busy[claim.broker_id] = left
            else:
                del self._busy[claim.broker_id]
            self._slot_freed.set()
            self._changed.set()
        self._finished.append(finished)
        self._to_record.set()

    # -------------------------------------------------------------------------------------------- recorder

    async def _record_loop(self) -> None:
        while True:
            await self._to_record.wait()
            self._to_record.clear()
            batch, self._finished = _first_of_each_event(self._finished)
            if not batch:
                continue
            self._recording = True
            try:
                if await self._record(batch):
                    for finished in batch:
                        self._reported(finished)
            finally:
                self._recording = False
                self._changed.set()
            if self._finished:
                self._to_record.set()

    async def _record(self, batch: list[Attempt]) -> bool:
        """Record ``batch``, retrying while its leases last (half a lease: after that the events are being
        claimed again anyway). False: given up; the events are due again when their leases end."""
        deadline = time.monotonic() + self.config.lease_s / 2
        pause = RECORD_BACKOFF_S[0]
        while True:
            try:
                await asyncio.to_thread(store.record, self.engine, batch, disable_after=self.config.disable_after)
                return True
            except Exception:
                if self._stopping or time.monotonic() + pause > deadline:
                    log.error(
                        "could not record %d webhook attempts; their events are sent again when their leases end",
                        len(batch),
                        exc_info=True,
                    )
                    return False
                log.warning("recording %d webhook attempts failed; retrying", len(batch), exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECORD_BACKOFF_S[1])

    async def _recorded(self) -> None:
        while self._finished or self._recording:
            self._changed.clear()
            await self._changed.wait()

    def _reported(self, finished: Attempt) -> None:
        verdict = finished.verdict
        claim = finished.claim
        if verdict.retry_in_s is not None:
            self._arm(verdict.retry_in_s)
        if verdict.outcome is not Outcome.DELIVERED:
            log.info(
                "delivery event=%s attempt=%d outcome=%s error=%s",
                claim.event_id,
                claim.attempt,
                verdict.outcome,
                finished.error,
            )
        self._report(
            DeliveryResult(
                claim.event_id,
                verdict.outcome,
                claim.attempt,
                finished.status_code,
                finished.error,
                verdict.retry_in_s,
                finished.latency_ms / 1000,
            )
        )

    def _report(self, result: DeliveryResult) -> None:
        if self._observe is not None:
            self._observe(result)

    def _arm(self, delay_s: float) -> None:
        """Wake the claimer when a retry is due (timers coalesced to ``TIMER_GRANULARITY_S``, never early)."""
        if delay_s > MAX_LOCAL_DELAY_S:
            return
        loop = asyncio.get_running_loop()
        at = math.ceil((loop.time() + delay_s) / TIMER_GRANULARITY_S) * TIMER_GRANULARITY_S
        if at not in self._timers:
            self._timers.add(at)
            loop.call_at(at, self._timer_fired, at)

    def _timer_fired(self, at: float) -> None:
        self._timers.discard(at)
        self.wake()


def _first_of_each_event(finished: list[Attempt]) -> tuple[list[Attempt], list[Attempt]]:
    """Split into (a batch with each event once, the rest for the next batch). An event can finish twice only
    when its lease ran out mid-attempt and this worker claimed it again; one statement may update it once."""
    seen: set[UUID] = set()
    batch: list[Attempt] = []
    rest: list[Attempt] = []
    for item in finished:
        (rest if item.claim.event_id in seen else batch).append(item)
        seen.add(item.claim.event_id)
    return batch, rest


class PumpThread:
    """Runs a :class:`Pump` on an event loop of its own in a daemon thread; ``wake`` and ``stop`` may be called
    from any thread (the dramatiq actor threads)."""

    def __init__(self, pump: Pump) -> None:
        self.pump = pump
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="webhook-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        if self._thread.is_alive():  # after stop() the loop is closed; a pump that starts claims anyway
            self._loop.call_soon_threadsafe(self.pump.wake)

    def stop(self, timeout_s: float) -> None:
        """Stop claiming, let deliveries in flight finish and be recorded (at most ``timeout_s``)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self.pump.run(self._stop))
        finally:
            self._loop.close()
