"""The check after a bounded ``BEGIN`` (:func:`exchange.db.engines._check_began`)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from exchange.db.engines import _check_began


def test_a_connection_not_in_a_transaction_after_begin_raises_an_error_without_sqlstate() -> None:
    # The connection answered something other than what was asked (like psycopg's own "received 2 results" through
    # pgbouncer while PostgreSQL restarted): no SQLSTATE, which the webhook store takes for a lost connection.
    with pytest.raises(psycopg.InternalError) as raised:
        _check_began(TransactionStatus.IDLE)
    assert not raised.value.sqlstate
    _check_began(TransactionStatus.INTRANS)  # the normal case passes
