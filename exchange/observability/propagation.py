"""Carry the request id across dramatiq messages (metadata only: a message never carries order data).

:class:`RequestIdMiddleware` is added to the broker by :func:`exchange.messaging.broker.make_broker`, so it runs in
every process:

* on enqueue, a message without a ``request_id`` option gets the current one (the api's request, or the message
  being processed when a matcher enqueues webhook deliveries after its commit);
* while a message is processed, its ``request_id`` is the current request id, so the worker's log lines carry it.

Wake-ups are coalesced, so a matcher transaction may hold commands of several requests: the first transaction of a
message's hold carries the id of the request whose message started it; later ones of the same hold (symbols woken
meanwhile) carry none (``workers/matching.py`` clears it), never another request's. Every ``matched`` line lists
``order_ids`` so logs also join exactly on the order. The webhook hints the matcher enqueues carry the id too, but
the pump claims events from Postgres in batches, so delivery lines carry none (they name the event).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from exchange.observability.context import current_request_id, request_id_var

REQUEST_ID_OPTION = "request_id"


class RequestIdMiddleware(Middleware):
    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        request_id = current_request_id()
        if request_id and REQUEST_ID_OPTION not in message.options:
            message.options[REQUEST_ID_OPTION] = request_id

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        request_id_var.set(message.options.get(REQUEST_ID_OPTION))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        request_id_var.set(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        request_id_var.set(None)
