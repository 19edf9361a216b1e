"""Errors of the webhook endpoints; :mod:`exchange.api.errors` maps them to HTTP answers (codes are stable)."""

from __future__ import annotations

from typing import Any

from exchange.orders.errors import OrderServiceError


class WebhookEventNotFoundError(OrderServiceError):
    """No such event *for this broker* (another broker's event looks the same): 404 ``event_not_found``."""

    code = "event_not_found"

    def __init__(self, message: str = "event not found", details: Any = None) -> None:
        super().__init__(message, details)


class WebhookEndpointUnavailableError(OrderServiceError):
    """Redelivery asked while the broker has no webhook URL or its endpoint is disabled: 409."""

    code = "webhook_endpoint_unavailable"
