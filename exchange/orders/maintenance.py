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
    "brokers",
)
"""Every table emptied by a reset: those holding exchange data but ``symbols`` (whose rows a reset keeps, see
:func:`reset_all_data`) and ``alembic_version``."""

_RESET = (
    f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY;"  # noqa: S608  # table names are constants
    " UPDATE symbols SET book_version = book_version + 1, last_price = NULL, last_trade_at = NULL"
)


async def reset_all_data(pool: AsyncPool) -> None:
    """Empty every data table (``TRUNCATE … RESTART IDENTITY``) and clear every symbol's price, in one transaction.
    The symbols' rows stay, with their book versions bumped: a matcher holding a book from before the reset must
    rebuild it, and would not if a recreated row counted its versions from 0 again up to the one it cached (it
    would match against orders that are gone). The command sequence is not reset: sequence numbers only need to
    grow."""
    async with single_statement(pool) as conn:
        await conn.execute(_RESET)
