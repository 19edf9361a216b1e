"""Webhook delivery worker (run with ``exchange webhooks``): the actor ``deliver`` on queue ``webhooks`` plus,
in every worker process, one :class:`~exchange.webhooks.pump.Pump` on its own event loop.

A ``deliver`` message is only a hint that events are due (:mod:`exchange.webhooks.queue`): the actor makes the
process hold the hint key (later hints ring it instead of sending messages) and wakes the pump, which claims due
events in batches from Postgres, POSTs them concurrently and records the outcomes in batches. ``--threads`` is the
number of deliveries in flight per process (the dramatiq threads themselves only take hints). Retries are timed
in-process; retries too far out, events of a worker that died and hints that were lost are covered by the sweeper,
which hints about overdue events. dramatiq's own
retries are off: an actor that fails (Redis down) loses nothing but a hint.

If the pump dies (its claimer or recorder ended: a bug), the process exits with ``EXIT_PUMP_DIED``: a process
that takes hints but neither claims nor records would look alive while delivering nothing. dramatiq's main
process then stops the other worker processes and exits with that code, and the supervisor (compose:
``restart: unless-stopped``) starts the worker again.

On shutdown the pump stops claiming and waits for the deliveries in flight and their recording, as long as that
can take (:attr:`~exchange.webhooks.pump.Pump.drain_s`: connect timeout + connect and read timeouts + half a
lease, 46 s with the defaults, plus a margin): stopping sooner would leave attempts made but not recorded, which
are sent again a lease later. A supervisor's kill grace period shorter than that cuts this short.
"""

from __future__ import annotations

import logging
import os

import dramatiq

from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.messaging.broker import SettledHeap, make_broker
from exchange.messaging.names import process_namespace
from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.observability import metrics
from exchange.observability.logs import configure_logging
from exchange.webhooks.delivery import DeliveryConfig
from exchange.webhooks.pump import Pump, PumpThread, count_in_metrics
from exchange.webhooks.queue import DELIVER_ACTOR, HintHolder, send_fan_out

log = logging.getLogger("exchange.webhooks")

settings = Settings.from_env()
configure_logging("webhooks", level=settings.log_level, fmt=settings.log_format, replace=True)
metrics.start_worker_metrics_server("webhooks", settings.metrics_port, settings.metrics_bind)
broker = make_broker(
    settings.redis_url, settings.partitions, process_namespace(settings.redis_namespace, settings.pooled_database_url)
)
broker.add_middleware(SettledHeap())
# The pump claims and records one statement at a time each (on threads of its own), plus a spare.
_engine = pooled_engine(settings.pooled_database_url, pool_size=3, max_overflow=2)
_config = DeliveryConfig.from_settings(settings)
_pump: PumpThread | None = None
EXIT_PUMP_DIED = 70
"""The worker process's exit status when its pump died (EX_SOFTWARE: an internal error)."""


def _fan_out() -> None:
    send_fan_out(broker)  # a failure is the pump's to log


def _wake_pump() -> None:
    if _pump is not None:
        _pump.wake()


_hints = HintHolder(broker, _wake_pump)
"""This process's hold on the hint key; its thread starts with the pump."""


def _pump_died(error: BaseException) -> None:
    """Called in the pump's thread once it died (already logged by the pump): end the process, loudly."""
    log.critical("webhook pump died (%r); exiting with status %d to be restarted", error, EXIT_PUMP_DIED)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_PUMP_DIED)  # not sys.exit: it would only end the pump's thread


class _PumpLifecycle(dramatiq.Middleware):
    """Starts the process's pump once dramatiq knows its thread count, and drains it on shutdown."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        global _pump
        capacity = worker.worker_threads
        pump = Pump(_engine, _config, capacity=capacity, observe=count_in_metrics, fan_out=_fan_out)
        _pump = PumpThread(pump, on_crash=_pump_died)
        _pump.start()
        _hints.start()
        log.info(
            "webhook pump started: %d deliveries in flight at most, %d per broker", capacity, _config.max_in_flight
        )

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        _hints.stop()  # first: the next hint then goes to a worker that is not stopping
        if _pump is not None:
            _pump.stop()  # waits as long as recording the deliveries in flight can take (module docstring)


broker.add_middleware(_PumpLifecycle())


@dramatiq.actor(actor_name=DELIVER_ACTOR, queue_name=WEBHOOK_QUEUE, max_retries=0)
def deliver(*legacy_event_ids: str) -> None:
    """Events are due: hold the hint key (hints sent meanwhile ring this process: :class:`HintHolder`) and wake
    this process's pump (a hint taken before the pump started is not needed: a pump starts by claiming whatever is
    due). Messages of the previous version carried one event id; the pump claims whatever is due, so ids are not
    needed."""
    _hints.hold()
    _wake_pump()
