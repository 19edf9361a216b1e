"""Alembic environment of the exchange.

Where the database URL comes from, first match wins:

1. ``alembic -x url=postgresql://…`` on the command line;
2. ``sqlalchemy.url`` set programmatically on the Config (what :mod:`exchange.db.migrate` does);
3. :class:`exchange.config.Settings` — ``EXCHANGE_DATABASE_URL`` (the *direct* URL, never pgbouncer's:
   migrations take a session-level view of the database).

Plain libpq URLs are accepted and given the psycopg driver. All pending migrations run in ONE transaction
(PostgreSQL has transactional DDL): a failed upgrade leaves the schema exactly as it was. The transaction first
takes an advisory lock, so processes that start together and all run ``exchange migrate`` apply each
migration once, one after the other, instead of racing.
"""

from __future__ import annotations

import logging.config

from alembic import context
from sqlalchemy import create_engine, pool, text

from exchange.config import Settings
from exchange.db.tables import metadata
from exchange.db.urls import sqlalchemy_url

MIGRATION_LOCK_KEY = 0x65786368_6D696772  # "exchmigr": an arbitrary constant shared by every migrator

config = context.config
target_metadata = metadata

# The alembic command line configures logging from alembic.ini; programmatic callers (exchange migrate, tests)
# keep their own logging and say so with configure_logger=False.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        url = Settings.from_env().database_url
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the DDL instead of running it."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                transactional_ddl=True,
                transaction_per_migration=False,
            )
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
