"""The migrations build exactly the schema exchange/db/tables.py describes, and can be undone and redone."""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from exchange.db import migrate
from exchange.db.tables import metadata
from exchange.db.urls import sqlalchemy_url
from tests.conftest import DatabaseFactory

SCRIPTS = Path(sysconfig.get_path("scripts"))
REPO = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO / "alembic" / "alembic.ini"
ALEMBIC_VERSION = "alembic_version"


def _run(*argv: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXCHANGE_DATABASE_URL": database_url}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)


def _schema(url: str) -> tuple[set[str], set[str], set[str]]:
    """(tables, sequences, indexes) in the public schema, excluding alembic's bookkeeping."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            tables = set(insp.get_table_names()) - {ALEMBIC_VERSION}
            sequences = set(insp.get_sequence_names())
            indexes = set(
                conn.scalars(
                    text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename <> :v"),
                    {"v": ALEMBIC_VERSION},
                )
            )
    finally:
        engine.dispose()
    return tables, sequences, indexes


def _metadata_sequences() -> set[str]:
    return set(metadata._sequences)  # the public API offers no list of a MetaData's sequences


def _metadata_index_names() -> set[str]:
    return {str(ix.name) for table in metadata.tables.values() for ix in table.indexes}


# ---------------------------------------------------------------------------------------- upgrade / downgrade


def test_upgrade_on_empty_database_creates_every_table(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url)

    tables, _, _ = _schema(fresh_database_url)
    assert tables == set(metadata.tables)


def test_upgrade_creates_the_command_sequence(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url)

    _, sequences, _ = _schema(fresh_database_url)
    assert _metadata_sequences() <= sequences
    assert "command_seq" in sequences


def test_upgrade_records_the_head_revision(fresh_database_url: str) -> None:
    assert migrate.current(fresh_database_url) is None

    assert migrate.upgrade(fresh_database_url) == migrate.head()
    assert migrate.current(fresh_database_url) == migrate.head()


def test_upgrade_twice_is_a_no_op(migrated_database_url: str) -> None:
    assert migrate.upgrade(migrated_database_url) == migrate.head()


def test_downgrade_to_base_removes_every_table_sequence_and_index(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url)

    assert migrate.downgrade(fresh_database_url, "base") is None

    assert _schema(fresh_database_url) == (set(), set(), set())


def test_upgrade_after_downgrade_recreates_the_schema(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url)
    migrate.downgrade(fresh_database_url, "base")

    migrate.upgrade(fresh_database_url)

    tables, sequences, indexes = _schema(fresh_database_url)
    assert tables == set(metadata.tables)
    assert _metadata_sequences() <= sequences
    assert _metadata_index_names() <= indexes


# ------------------------------------------------------------------------------------------ command lines


def test_exchange_migrate_command_upgrades_a_plain_libpq_url(fresh_database_url: str) -> None:
    assert fresh_database_url.startswith("postgresql://")

    result = _run(str(SCRIPTS / "exchange"), "migrate", database_url=fresh_database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == migrate.head()
    assert migrate.current(fresh_database_url) == migrate.head()


def test_exchange_migrate_downgrade_prints_base(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url)

    result = _run(str(SCRIPTS / "exchange"), "migrate", "--downgrade", "base", database_url=fresh_database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "base"
    assert _schema(fresh_database_url)[0] == set()


def test_exchange_migrate_reports_an_unreachable_database_without_traceback() -> None:
    result = _run(
        str(SCRIPTS / "exchange"),
        "migrate",
        "--database-url",
        "postgresql://postgres@127.0.0.1:1/nowhere",
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
    )

    assert result.returncode == 1
    assert "database unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_alembic_command_line_upgrades_and_downgrades_with_env_url(fresh_database_url: str) -> None:
    alembic = str(SCRIPTS / "alembic")

    up = _run(alembic, "-c", str(ALEMBIC_INI), "upgrade", "head", database_url=fresh_database_url)
    assert up.returncode == 0, up.stderr
    assert _schema(fresh_database_url)[0] == set(metadata.tables)

    down = _run(alembic, "-c", str(ALEMBIC_INI), "downgrade", "base", database_url=fresh_database_url)
    assert down.returncode == 0, down.stderr
    assert _schema(fresh_database_url) == (set(), set(), set())


def test_alembic_url_option_wins_over_environment(fresh_database_url: str) -> None:
    result = _run(
        str(SCRIPTS / "alembic"),
        "-c",
        str(ALEMBIC_INI),
        "-x",
        f"url={fresh_database_url}",
        "upgrade",
        "head",
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
    )

    assert result.returncode == 0, result.stderr
    assert migrate.current(fresh_database_url) == migrate.head()


# ------------------------------------------------------------------------- tables.py vs the migrated schema


@pytest.fixture
def migrated_connection(migrated_database_url: str) -> Iterable[Connection]:
    engine = create_engine(sqlalchemy_url(migrated_database_url))
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def test_metadata_matches_the_migrated_schema(migrated_connection: Connection) -> None:
    context = MigrationContext.configure(
        migrated_connection, opts={"compare_type": True, "compare_server_default": True}
    )

    assert compare_metadata(context, metadata) == []


CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, identity_generation
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> 'alembic_version'
    """,
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid <> 'alembic_version'::regclass
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef
        FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'alembic_version'
    """,
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by, cycle, cache_size
        FROM pg_sequences WHERE schemaname = 'public'
    """,
}


def _catalog(url: str, aspect: str) -> set[tuple[object, ...]]:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            return {tuple(row) for row in conn.execute(text(CATALOG_QUERIES[aspect]))}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def created_all_database_url(database_factory: DatabaseFactory) -> Iterable[str]:
    """A database built by ``metadata.create_all`` (plus an empty alembic_version, to query alike)."""
    url = database_factory.create()
    engine = create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(text("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
    engine.dispose()
    yield url
    database_factory.drop(url)


@pytest.mark.parametrize("aspect", sorted(CATALOG_QUERIES))
def test_metadata_builds_the_same_catalog_as_the_migrations(
    migrated_database_url: str, created_all_database_url: str, aspect: str
) -> None:
    # PostgreSQL prints both schemas in its own canonical form, so this also compares what autogenerate does
    # not: CHECK expressions, partial-index predicates, index order and sequences.
    assert _catalog(created_all_database_url, aspect) == _catalog(migrated_database_url, aspect)


def _allowed_values(conn: Connection, constraint: str) -> set[str]:
    definition = conn.scalar(
        text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :name"), {"name": constraint}
    )
    assert definition is not None, f"no constraint {constraint}"
    return set(re.findall(r"'([^']*)'::text", definition))


def _enum_checks() -> Iterable[tuple[str, type[StrEnum]]]:
    from exchange.db.tables import CommandKind, OrderStatus, WebhookEventStatus
    from exchange.engine.types import CloseReason, OrderType, Side, StpMode, TimeInForce

    return [
        ("ck_orders_side", Side),
        ("ck_orders_order_type", OrderType),
        ("ck_orders_time_in_force", TimeInForce),
        ("ck_orders_stp", StpMode),
        ("ck_orders_status", OrderStatus),
        ("ck_orders_close_reason", CloseReason),
        ("ck_trades_taker_side", Side),
        ("ck_commands_kind", CommandKind),
        ("ck_webhook_events_status", WebhookEventStatus),
    ]


@pytest.mark.parametrize(("constraint", "enum"), _enum_checks(), ids=lambda v: getattr(v, "__name__", v))
def test_database_check_allows_exactly_the_enum_values(
    migrated_connection: Connection, constraint: str, enum: type[StrEnum]
) -> None:
    # A new engine enum value needs a migration: this fails until the database accepts it too.
    assert _allowed_values(migrated_connection, constraint) == {member.value for member in enum}


def _function_definition(url: str, signature: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)", (signature,)).fetchone()
    assert row is not None
    return str(row[0])


def test_downgrading_0006_restores_0004s_webhook_record_exactly(fresh_database_url: str) -> None:
    migrate.upgrade(fresh_database_url, "0005")
    before = _function_definition(fresh_database_url, "webhook_record(jsonb, integer)")
    migrate.upgrade(fresh_database_url, "0006")
    changed = _function_definition(fresh_database_url, "webhook_record(jsonb, integer)")

    migrate.downgrade(fresh_database_url, "0005")

    assert changed != before
    assert _function_definition(fresh_database_url, "webhook_record(jsonb, integer)") == before


def test_downgrading_0008_restores_0007s_matcher_write_and_webhook_record_exactly(fresh_database_url: str) -> None:
    functions = ("matcher_write(timestamptz, json, uuid[], json, json, json, uuid[], json, bigint[], text[], bigint[])",
                 "webhook_record(jsonb, integer)")  # fmt: skip
    migrate.upgrade(fresh_database_url, "0007")
    before = [_function_definition(fresh_database_url, f) for f in functions]
    migrate.upgrade(fresh_database_url, "0008")
    changed = [_function_definition(fresh_database_url, f) for f in functions]

    migrate.downgrade(fresh_database_url, "0007")

    assert all(c != b for c, b in zip(changed, before, strict=True))
    assert [_function_definition(fresh_database_url, f) for f in functions] == before


def test_downgrading_0009_restores_0008s_orders_indexes_constraints_storage_and_book_levels(
    fresh_database_url: str,
) -> None:
    def schema() -> tuple[object, ...]:
        storage = _catalog(fresh_database_url, "indexes"), _catalog(fresh_database_url, "constraints")
        engine = create_engine(sqlalchemy_url(fresh_database_url))
        try:
            with engine.connect() as conn:
                options = conn.scalar(text("SELECT reloptions FROM pg_class WHERE oid = 'orders'::regclass"))
        finally:
            engine.dispose()
        return (*storage, options, _function_definition(fresh_database_url, "book_levels(text, integer)"))

    migrate.upgrade(fresh_database_url, "0008")
    before = schema()
    migrate.upgrade(fresh_database_url, "0009")
    changed = schema()

    migrate.downgrade(fresh_database_url, "0008")

    assert all(c != b for c, b in zip(changed, before, strict=True))
    assert schema() == before


def _assert_downgrade_restores(url: str, previous: str, revision: str, *aspects: Callable[[], object]) -> None:
    """Upgrading ``previous`` -> ``revision`` changes every one of ``aspects``; downgrading back restores them all."""

    def schema() -> tuple[object, ...]:
        return tuple(aspect() for aspect in aspects)

    migrate.upgrade(url, previous)
    before = schema()
    migrate.upgrade(url, revision)
    changed = schema()

    migrate.downgrade(url, previous)

    assert all(c != b for c, b in zip(changed, before, strict=True))
    assert schema() == before


CLAIM = "webhook_claim(uuid[], integer[], uuid[], integer, integer, float8)"
RECORD = "webhook_record(jsonb, integer)"
WRITE_CANCELS = "write_cancels(uuid[], uuid[])"


def test_downgrading_0017_restores_0016s_webhook_functions_and_events_columns_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url,
        "0016",
        "0017",
        lambda: _function_definition(url, CLAIM),
        lambda: _function_definition(url, RECORD),
        lambda: _catalog(url, "columns"),
    )


def test_downgrading_0018_restores_0017s_write_cancels_and_commands_indexes_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url, "0017", "0018", lambda: _function_definition(url, WRITE_CANCELS), lambda: _catalog(url, "indexes")
    )


def test_downgrading_0019_restores_0018s_webhook_claim_and_indexes_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url, "0018", "0019", lambda: _function_definition(url, CLAIM), lambda: _catalog(url, "indexes")
    )


def test_downgrading_0020_restores_0019s_webhook_record_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(url, "0019", "0020", lambda: _function_definition(url, RECORD))


def test_downgrading_0021_restores_0020s_constraints_and_indexes_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url, "0020", "0021", lambda: _catalog(url, "constraints"), lambda: _catalog(url, "indexes")
    )


def test_downgrading_0022_restores_0021s_webhook_claim_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(url, "0021", "0022", lambda: _function_definition(url, CLAIM))


def test_downgrading_0023_restores_0022s_order_views_and_write_cancels_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url,
        "0022",
        "0023",
        lambda: _function_definition(url, "order_views(uuid[], uuid[])"),
        lambda: _function_definition(url, WRITE_CANCELS),
    )


def test_downgrading_0024_restores_0023s_matcher_pending_and_webhook_claim_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(
        url,
        "0023",
        "0024",
        lambda: _function_definition(url, "matcher_pending(text[], integer)"),
        lambda: _function_definition(url, CLAIM),
    )


def test_downgrading_0025_restores_0024s_accept_orders_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    accept_orders = (
        "accept_orders(uuid[], uuid[], text[], text[], text[], text[], text[], text[], text[], text[], bigint[],"
        " bigint[], timestamptz[])"
    )
    _assert_downgrade_restores(url, "0024", "0025", lambda: _function_definition(url, accept_orders))


def test_downgrading_0029_restores_0028s_constraints_exactly(fresh_database_url: str) -> None:
    url = fresh_database_url
    _assert_downgrade_restores(url, "0028", "0029", lambda: _catalog(url, "constraints"))
