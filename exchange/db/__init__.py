"""Persistence: the PostgreSQL schema (:mod:`.tables`), URL spelling (:mod:`.urls`) and migrations
(:mod:`.migrate`). PostgreSQL is the only source of truth; see DESIGN.md §3 and §6."""

from exchange.db.tables import CommandKind, OrderStatus, WebhookEventStatus, metadata
from exchange.db.urls import libpq_url, sqlalchemy_url

__all__ = [
    "CommandKind",
    "OrderStatus",
    "WebhookEventStatus",
    "libpq_url",
    "metadata",
    "sqlalchemy_url",
]
