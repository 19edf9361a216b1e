"""Run the alembic migrations from Python (``exchange migrate``, tests, dev tooling).

Same scripts and ``env.py`` as ``alembic -c alembic/alembic.ini …``; the URL given here is handed to ``env.py``
as ``sqlalchemy.url``. Invariants:

* ``url`` must be the *direct* database URL (not pgbouncer's); plain libpq URLs are fine.
* An upgrade or downgrade runs in one transaction: it applies completely or not at all.
* Concurrent callers are serialised by an advisory lock in ``env.py``; each revision is applied once.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
from alembic.command import downgrade as alembic_downgrade
from alembic.command import upgrade as alembic_upgrade
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import create_engine, pool

from exchange.db.urls import libpq_url, sqlalchemy_url, with_database
from exchange.resources import top_level

ALEMBIC_DIR = top_level("alembic")
"""The repository's ``alembic/`` directory, or the wheel's copy of it (:mod:`exchange.resources`)."""


def config(url: str | None = None) -> Config:
    """An alembic Config for ``alembic/alembic.ini``; with ``url``, migrations run against that database."""
    ini = ALEMBIC_DIR / "alembic.ini"
    if not ini.is_file():
        raise FileNotFoundError(f"alembic configuration not found at {ini}")
    cfg = Config(str(ini))
    # env.py must not reconfigure the caller's logging.
    cfg.attributes["configure_logger"] = False
    if url is not None:
        # ConfigParser interpolates '%': escape percent-encoded characters (e.g. in passwords).
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> str | None:
    """Upgrade the database at ``url`` to ``revision``; returns the revision it is at afterwards."""
    alembic_upgrade(config(url), revision)
    return current(url)


def downgrade(url: str, revision: str) -> str | None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops everything); returns the revision
    it is at afterwards (``None`` at base)."""
    alembic_downgrade(config(url), revision)
    return current(url)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at, or ``None`` if it has never been migrated (or is at base)."""
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision in ``alembic/versions``."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {ALEMBIC_DIR / 'versions'}")
    return revision


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` when it does not exist (connecting to ``postgres`` on the same
    server; needs CREATEDB). Returns True when it was created."""
    plain = libpq_url(url)
    name = urlsplit(plain).path.lstrip("/")
    with psycopg.connect(with_database(plain, "postgres"), autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True
