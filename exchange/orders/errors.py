"""Domain errors raised by :mod:`exchange.orders`; :mod:`exchange.api.errors` maps each to an HTTP answer.

Each error carries a stable machine-readable ``code`` (part of the public contract) and a human message.
"""

from __future__ import annotations

from typing import Any


class OrderServiceError(Exception):
    """Base class. ``code`` is stable; ``details`` is optional JSON-able context."""

    code = "order_error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidOrderError(OrderServiceError):
    """Well-formed input that breaks a business rule (past ``valid_until``, inconsistent time in force, …)."""

    code = "validation_error"


class ValidUntilPassedError(InvalidOrderError):
    """A ``valid_until`` that is not in the future: refused for a new order, but a retry of an order accepted
    before its deadline is answered with that order (:func:`exchange.orders.accept.find_original`)."""


class InvalidWebhookUrlError(OrderServiceError):
    code = "invalid_webhook_url"


class OrderNotFoundError(OrderServiceError):
    """No such order *for this broker*: another broker's order is indistinguishable from a missing one."""

    code = "order_not_found"

    def __init__(self, message: str = "order not found", details: Any = None) -> None:
        super().__init__(message, details)


class OrderClosedError(OrderServiceError):
    """The order is closed: it can no longer be amended."""

    code = "order_closed"


class AmendRejectedError(OrderServiceError):
    """The matcher refused the amend (``details.reason``: the engine's reject reason); the order is unchanged."""

    code = "amend_rejected"


class IdempotencyKeyReusedError(OrderServiceError):
    """A ``client_order_id``/``Idempotency-Key`` the broker already used, sent with a different order: answering
    with the original order would tell the client its new order was accepted."""

    code = "idempotency_key_reused"


class NoTradesError(OrderServiceError):
    code = "no_trades"


class InvalidCursorError(OrderServiceError):
    code = "validation_error"
