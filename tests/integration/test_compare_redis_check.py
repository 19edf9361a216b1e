"""``ops.compare`` refuses a Redis database that another program uses (a leftover exchange would take the run's
messages), and empties it when it has it to itself."""

from __future__ import annotations

import pytest
import redis

from ops.compare import flush_unshared_redis
from tests.integration.redis_support import claimed_database


def test_a_redis_database_with_another_client_connected_is_refused_and_left_as_it_is() -> None:
    with claimed_database() as url:
        other = redis.Redis.from_url(url)
        other.set("left-by-another-exchange", b"1")  # connects, and keeps its connection open on that database
        try:
            with pytest.raises(RuntimeError, match="other client"):
                flush_unshared_redis(url)
            assert other.get("left-by-another-exchange") == b"1"
        finally:
            other.close()


def test_a_redis_database_nobody_else_uses_is_flushed() -> None:
    with claimed_database() as url:
        writer = redis.Redis.from_url(url)
        writer.set("from-an-earlier-run", b"1")
        writer.close()  # gone before the check, as a stopped exchange is

        flush_unshared_redis(url)

        reader = redis.Redis.from_url(url)
        try:
            assert reader.dbsize() == 0
        finally:
            reader.close()
