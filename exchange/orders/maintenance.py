"""Operator/debug actions on the whole database (admin endpoints only)."""

from __future__ import annotations

from exchange.db.engines import AsyncPool, single_statement

DATA_TABLES = (
    "webhook_attempts",
    "webhook_events",
    "trades",
    "positions",
    "commands",
    "orders",
    "symbols",
    "brokers",
)
"""Every table holding exchange data (not ``alembic_version``)."""


async def reset_all_data(pool: AsyncPool) -> None:
    """Empty every data table in one statement (``TRUNCATE … RESTART IDENTITY``). The command sequence is not
    reset: sequence numbers only need to grow."""
    async with single_statement(pool) as conn:
        await conn.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
