"""The delivery worker's engine: one :class:`Pump` per process, on one asyncio event loop.

Three parts run independently, so a slow receiver stalls only its own deliveries and a slow database only
delays bookkeeping:

* **claimer** — when woken (a hint arrived, a retry came due, the worker started) and while due events remain
  (a claim that got fewer than it asked for, no broker held back at its cap, ends the round: what commits later
  hints again), claims in ONE statement as many as there is room for (``capacity`` deliveries in flight per
  process, at most ``max_in_flight`` per broker, at most ``MAX_CLAIM`` per statement) and starts one task per
  event. It claims as
  soon as ONE slot is free: slots never sit idle while events are due. Batches still grow with load, the way the
  recorder's do: deliveries that end while a claim runs are all refilled by the next one. When it has no room
  left (a claim filled it, or a hint arrived while it was full) it hints the other workers instead;
* **deliveries** — each POSTs its event (:func:`exchange.webhooks.delivery.attempt`); when it ends its slot is
  free at once and its attempt is queued for the recorder;
* **recorder** — records every attempt queued so far in ONE statement, again and again (group commit: the more
  deliveries end while a statement runs, the bigger the next one), then reports each result as the record gave it
  (a failure the record's fence set aside is ``superseded``, see :func:`~exchange.webhooks.store.record`) and arms
  a local timer for the retries it scheduled. Woken by an attempt that ended, it first lingers ``record_linger_s``
  (``EXCHANGE_WEBHOOK_RECORD_LINGER_MS``) so that the attempts ending meanwhile join the same statement: under
  load deliveries end one by one, and recording each on its own cost a transaction, a database thread's wake-ups
  and the server's work per event. Nothing waits for a record but the bookkeeping (the receiver has the event, the
  slot is free, a retry is timed from its record); a stopping pump records at once.

Blocking work runs on two thread pools of the pump's own, never on asyncio's default executor: database calls
(a claim, a record, a fan-out hint: at most one of each at a time, so they never wait for a thread) and DNS
lookups (at most one per host at a time, answers reused for a short while: :class:`~delivery.Resolver`). A DNS
server that hangs therefore delays only the deliveries to its hosts, never claims or records.

The claimer and the recorder are supervised: if either ends while the pump runs (a bug), :meth:`Pump.run` logs
it and raises :class:`PumpDiedError` instead of going on half-dead (claiming without recording would send every
event again each lease, forever); :class:`PumpThread` then calls its ``on_crash``, which in a worker process
exits the process so that its supervisor starts a new one. A report callback that raises only loses its report.

Nothing here is state the database does not have. A claimed event whose attempt is never recorded (process
killed, database unreachable for longer than half a lease) is due again when its lease ends; the sweeper then
hints the workers about it. Deliveries are concurrent, also within one broker (up to ``max_in_flight``): receivers
order events by their per-broker ``sequence``, which is gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from uuid import UUID

import uvloop
from sqlalchemy import Engine

from exchange.observability import metrics
from exchange.webhooks import ssrf, store
from exchange.webhooks.delivery import DeliveryConfig, Endpoints, HostLookup, Resolver, attempt
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
MAX_CLAIM = 256
"""Events claimed by one statement at most (bounds its run time and the rows it locks); with more room free the
claimer claims again at once."""
DB_THREADS = 3
"""Threads for the pump's blocking calls other than DNS: the claimer, the recorder and the fan-out each run at most
one call at a time, so a call never waits for a thread."""
DNS_THREADS = 32
"""Threads for host-name lookups. At most one lookup per host runs, so only more than this many hosts whose DNS
hangs at the same time delay other hosts' lookups (never database calls). A blocked lookup costs no CPU."""

Observer = Callable[[DeliveryResult], None]
_T = TypeVar("_T")


def count_in_metrics(result: DeliveryResult) -> None:
    """A worker's observer: counts ``result`` in ``exchange_webhook_deliveries_total{outcome}`` and its HTTP
    attempt's duration in ``exchange_webhook_delivery_duration_seconds{outcome}``."""
    metrics.record_webhook_delivery(result.outcome.value, result.seconds)


async def _any_set(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class PumpDiedError(RuntimeError):
    """The claimer or the recorder ended while the pump was running (see the module docstring)."""


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
        resolve_host: HostLookup = ssrf.resolve_host,
    ) -> None:
        """``capacity``: deliveries in flight at once. ``observe`` gets every result after it is recorded (an
        exception it raises is logged and otherwise ignored). ``fan_out`` (blocking, called in a worker thread; a
        failure is logged, the sweeper's hints still come) tells the other worker processes that more events are
        due: called when this pump has no room left. ``resolve_host``: the blocking DNS lookup + SSRF check (tests
        pass a slow one)."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.engine = engine
        self.config = config
        self.capacity = capacity
        self._observe = observe
        self._fan_out = fan_out
        self._http = HttpClient(connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s)
        self._db = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="webhook-db")
        self._dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="webhook-dns")
        self._endpoints = Endpoints(
            Resolver(
                self._dns,
                allow_private=config.allow_private,
                timeout_s=config.connect_timeout_s,
                lookup=resolve_host,
            )
        )
        self._running = 0
        self._busy: dict[UUID, int] = {}
        """Deliveries in flight per broker."""
        self._finished: list[Attempt] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._wake.set()  # a pump starts by claiming whatever is due already (left by a worker that died, say)
        self._slot_freed = asyncio.Event()
        self._to_record = asyncio.Event()
        self._stopping = asyncio.Event()
        """Set when the pump stops: the claimer ends, a lingering recorder records at once."""
        self._changed = asyncio.Event()
        self._claiming = False
        self._recording = False
        self._hinting = False
        self._timers: set[float] = set()
        self._last_fan_out = -math.inf

    def wake(self) -> None:
        """Events may be due: claim them (from the pump's loop; see :class:`PumpThread` for other threads)."""
        self._wake.set()
        if self._running >= self.capacity:
            # No room: the hint that woke this pump was taken from the other workers, which may have room now.
            self._hint_others()

    @property
    def drain_s(self) -> float:
        """The longest :meth:`run` takes to return once ``stop`` is set: the claim in progress (given the connect
        timeout), the deliveries in flight (connect + read timeouts), then recording them (half a lease, after
        which their events are being claimed again anyway)."""
        return drain_s(self.config)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, then finish what is in flight and record it (at most :attr:`drain_s`).
        Raises :class:`PumpDiedError` if the claimer or the recorder ends before that. Run a pump once."""
        claimer = asyncio.create_task(self._claim_loop(), name="claimer")
        recorder = asyncio.create_task(self._record_loop(), name="recorder")
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({stopped, claimer, recorder}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            await self._drain(claimer, recorder)
        for part in (claimer, recorder):
            if part in done:  # they only end once _drain cancels them: ending before is a bug
                error = None if part.cancelled() else part.exception()
                log.error("the webhook pump's %s died; stopping the pump", part.get_name(), exc_info=error)
                raise PumpDiedError(f"the webhook pump's {part.get_name()} died") from error

    async def _drain(self, claimer: asyncio.Task[None], recorder: asyncio.Task[None]) -> None:
        """Stop claiming; let deliveries in flight end and record them, unless the recorder is dead (then they
        cannot be recorded: their events are due again when their leases end). Bounded by :attr:`drain_s`."""
        self._stopping.set()
        self._wake.set()
        self._slot_freed.set()
        config = self.config
        try:
            await asyncio.wait({claimer}, timeout=config.connect_timeout_s)
            if not recorder.done():
                if self._tasks:
                    await asyncio.wait(self._tasks, timeout=config.connect_timeout_s + config.read_timeout_s)
                recorded = asyncio.create_task(self._recorded())
                await asyncio.wait(
                    {recorded, recorder}, timeout=config.lease_s / 2, return_when=asyncio.FIRST_COMPLETED
                )
                recorded.cancel()
        finally:
            for task in (claimer, recorder, *self._tasks):
                task.cancel()
            await asyncio.gather(claimer, recorder, return_exceptions=True)  # ended, so run() can inspect them
            self._http.close()
            self._db.shutdown(wait=False)
            self._dns.shutdown(wait=False, cancel_futures=True)

    async def idle(self) -> None:
        """Return once nothing is due that this pump may claim, nothing is in flight and everything is recorded."""
        while not self._is_idle():
            self._changed.clear()
            await self._changed.wait()

    # --------------------------------------------------------------------------------------------- claimer

    def _is_idle(self) -> bool:
        return not (self._wake.is_set() or self._claiming or self._running or self._finished or self._recording)

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
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
        while not self._stopping.is_set():
            # Cleared before the room is read: a delivery ending from here on (even during the claim) sets it.
            self._slot_freed.clear()
            room = self.capacity - self._running
            if room < 1:
                # Filled by the last claim: more events may be due that another worker could deliver now (a wake
                # while full does the same, see wake()). Saturated workers pass hints on at most once per
                # FAN_OUT_INTERVAL_S each.
                self._hint_others()
                await self._slot_freed.wait()
                continue
            busy = dict(self._busy)
            limit = min(room, MAX_CLAIM)
            claimed = await self._blocking(
                functools.partial(
                    store.claim,
                    self.engine,
                    limit=limit,
                    lease_s=self.config.lease_s,
                    per_broker=self.config.max_in_flight,
                    busy=busy,
                )
            )
            for event_id in claimed.skipped:
                self._report(DeliveryResult(event_id, Outcome.SKIPPED))
            self._start(claimed.claims)
            if len(claimed.claims) + len(claimed.skipped) < limit:
                # Fewer than asked for. If the claim held nothing back, nothing else was due then, and an event
                # committed since hints again (the hint was cleared before this wake-up): claiming once more only to
                # find nothing cost a transaction per hint.
                if not self._held_back(claimed.claims, busy):
                    return
                if not claimed.claims and not claimed.skipped:
                    # Due events of brokers at their cap: claim when one of their deliveries ends, or at once when
                    # a hint says more is due (another broker's events must not wait for a hanging receiver).
                    await _any_set(self._slot_freed, self._wake)
                    self._wake.clear()

    def _held_back(self, claims: list[Claim], busy: dict[UUID, int]) -> bool:
        """A claim made with ``busy`` in flight per broker may have held due events back: some broker had no room
        (its events were not even looked at) or got as many of ``claims`` as it had room for. Room is judged as the
        claim saw it, not by the deliveries in flight now: one that ended during the claim freed a slot the claim
        did not use, and no later hint need come for the events it held back."""
        got = Counter(claim.broker_id for claim in claims)
        return any(got[broker] >= self.config.max_in_flight - busy.get(broker, 0) for broker in {*busy, *got})

    def _hint_others(self) -> None:
        """Tell the other workers that events are due (at most one hint per FAN_OUT_INTERVAL_S, one at a time)."""
        now = time.monotonic()
        if self._fan_out is None or self._hinting or now - self._last_fan_out < FAN_OUT_INTERVAL_S:
            return
        self._last_fan_out = now
        self._hinting = True
        self._track(asyncio.create_task(self._send_hint(self._fan_out)))

    async def _send_hint(self, fan_out: Callable[[], None]) -> None:
        try:
            await self._blocking(fan_out)
        except Exception:  # Redis down: the other workers start later, on the next hint or the sweeper's
            log.warning("could not hint the other webhook workers", exc_info=True)
        finally:
            self._hinting = False

    async def _blocking(self, call: Callable[[], _T]) -> _T:
        """Run ``call`` (a database call or a hint) on the pump's own threads: never behind DNS lookups."""
        return await asyncio.get_running_loop().run_in_executor(self._db, call)

    # ------------------------------------------------------------------------------------------ deliveries

    def _start(self, claims: Iterable[Claim]) -> None:
        for claim in claims:
            self._running += 1
            self._busy[claim.broker_id] = self._busy.get(claim.broker_id, 0) + 1
            self._track(asyncio.create_task(self._deliver(claim)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, claim: Claim) -> None:
        try:
            finished = await attempt(self._http, self._endpoints, claim, self.config)
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
            await self._linger()
            self._to_record.clear()
            batch, self._finished = _first_of_each_event(self._finished)
            if not batch:
                continue
            self._recording = True
            try:
                for finished, outcome in await self._record(batch):
                    try:
                        self._reported(finished, outcome)
                    except Exception:  # a bug in reporting loses one report, never the recorder
                        log.exception("reporting webhook event %s failed", finished.claim.event_id)
            finally:
                self._recording = False
                self._changed.set()
            if self._finished:
                self._to_record.set()

    async def _linger(self) -> None:
        """Give the attempts ending in the next ``record_linger_s`` a place in this record (cut short by a stop)."""
        linger = self.config.record_linger_s
        if linger <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger):
                await self._stopping.wait()

    async def _record(
        self, batch: list[Attempt], deadline: float | None = None, *, last_resort: bool = False
    ) -> list[tuple[Attempt, Outcome]]:
        """Record ``batch``, retrying while its leases last (half a lease: after that the events are being
        claimed again anyway, ``deadline``); returns the attempts recorded, as recorded, each with the outcome the
        record gave it (:func:`store.record`: ``superseded`` for a failure its fence set aside). Those given up on
        are due again when their leases end.

        A batch whose data cannot be stored as it is (:func:`store.is_refused`: no retry changes that) is recorded
        one attempt at a time instead, within the same deadline, so that one attempt's row never holds back the
        others'; and one such attempt is recorded with its texts replaced (:func:`store.with_texts_replaced`), so
        that its event still runs its schedule and counts for its broker: left unrecorded, it would be sent again
        every lease, forever, and never fail. Only an attempt refused even so (``last_resort``: its event was
        deleted since its claim, say) is given up at once."""
        if deadline is None:
            deadline = time.monotonic() + self.config.lease_s / 2
        pause = RECORD_BACKOFF_S[0]
        while True:
            try:
                outcomes = await self._blocking(
                    functools.partial(store.record, self.engine, batch, disable_after=self.config.disable_after)
                )
                return list(zip(batch, outcomes, strict=True))
            except Exception as exc:
                refused = store.is_refused(exc)
                if refused and len(batch) > 1:
                    log.error(
                        "the database refused a record of %d webhook attempts; recording them one by one",
                        len(batch),
                        exc_info=True,
                    )
                    return [recorded for one in batch for recorded in await self._record([one], deadline)]
                if refused and not last_resort:
                    (one,) = batch
                    # repr: the texts as they were, whatever they hold, on one line of the log
                    log.error(
                        "the database refused the record of webhook event %s attempt %d; recording it with its texts "
                        "replaced (error=%r, excerpt=%r)",
                        one.claim.event_id,
                        one.claim.attempt,
                        one.error,
                        one.excerpt,
                        exc_info=True,
                    )
                    return await self._record([store.with_texts_replaced(one)], deadline, last_resort=True)
                if refused or self._stopping.is_set() or time.monotonic() + pause > deadline:
                    log.error(
                        "could not record %d webhook attempts; their events are sent again when their leases end",
                        len(batch),
                        exc_info=True,
                    )
                    return []
                log.warning("recording %d webhook attempts failed; retrying", len(batch), exc_info=True)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECORD_BACKOFF_S[1])

    async def _recorded(self) -> None:
        while self._finished or self._recording:
            self._changed.clear()
            await self._changed.wait()

    def _reported(self, finished: Attempt, outcome: Outcome) -> None:
        """Report ``finished`` as the record's ``outcome`` (log line, observer) and time the retry it scheduled."""
        claim = finished.claim
        # A superseded retry scheduled nothing: its event is due when the redeliver or the newer attempt says.
        retry_in_s = finished.verdict.retry_in_s if outcome is Outcome.RETRY else None
        if retry_in_s is not None:
            self._arm(retry_in_s)
        if outcome is not Outcome.DELIVERED:
            log.info(
                "delivery event=%s attempt=%d outcome=%s error=%s",
                claim.event_id,
                claim.attempt,
                outcome,
                finished.error,
            )
        self._report(
            DeliveryResult(
                claim.event_id,
                outcome,
                claim.attempt,
                finished.status_code,
                finished.error,
                retry_in_s,
                finished.latency_ms / 1000,
            )
        )

    def _report(self, result: DeliveryResult) -> None:
        if self._observe is None:
            return
        try:
            self._observe(result)
        except Exception:  # the observer's bug must not stop claiming or recording (see Pump.__init__)
            log.exception("webhook result observer failed on event %s", result.event_id)

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


def drain_s(config: DeliveryConfig) -> float:
    """:attr:`Pump.drain_s` of a pump with ``config``: the claim in progress, the deliveries in flight, recording."""
    return config.connect_timeout_s + (config.connect_timeout_s + config.read_timeout_s) + config.lease_s / 2


class PumpThread:
    """Runs a :class:`Pump` on an event loop of its own in a daemon thread; ``wake`` and ``stop`` may be called
    from any thread (the dramatiq actor threads). If the pump dies (:class:`PumpDiedError`, or any other
    exception out of :meth:`Pump.run`), ``on_crash`` is called with the exception in the pump's thread, after
    its loop closed; without one, the exception ends the thread (and is printed by ``threading.excepthook``)."""

    STOP_MARGIN_S = 5.0
    """Added to the pump's :attr:`Pump.drain_s` by :meth:`stop`: closing the loop and the last statement's commit."""

    def __init__(self, pump: Pump, on_crash: Callable[[BaseException], None] | None = None) -> None:
        self.pump = pump
        self._on_crash = on_crash
        self._loop = uvloop.new_event_loop()  # the api's loop too: its callbacks, timers and sockets in C
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="webhook-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        if self._thread.is_alive():  # after stop() the loop is closed; a pump that starts claims anyway
            with contextlib.suppress(RuntimeError):  # the loop closed since (stopped or died): nothing to wake
                self._loop.call_soon_threadsafe(self.pump.wake)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop claiming, let deliveries in flight finish and be recorded. Waits at most ``timeout_s``, by
        default as long as that can take (:attr:`Pump.drain_s` + ``STOP_MARGIN_S``): a shorter wait lets the
        process exit with attempts made but not recorded, whose events are then sent again a lease later."""
        if timeout_s is None:
            timeout_s = self.pump.drain_s + self.STOP_MARGIN_S
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed since: the pump already ended
                return
            self._thread.join(timeout_s)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self.pump.run(self._stop))
        except BaseException as exc:
            if self._on_crash is None:
                raise
            self._loop.close()  # first: on_crash may end the process
            self._on_crash(exc)
        finally:
            self._loop.close()  # idempotent
