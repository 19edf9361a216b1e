"""Conversions between the two spellings of a PostgreSQL URL.

Operators configure plain libpq URLs (``postgresql://user@host:5432/db``, or ``postgres://…`` as Heroku-style
tools write them): they work unchanged with ``psql``, ``pg_dump`` and psycopg. SQLAlchemy needs the driver in
the scheme (``postgresql+psycopg://…``). Invariants:

* :func:`sqlalchemy_url` always yields a URL SQLAlchemy resolves to a PostgreSQL dialect; an explicit driver
  (``postgresql+asyncpg://``) is kept as written, and everything after the scheme is never touched.
* :func:`libpq_url` is its inverse for the scheme only: ``libpq_url(sqlalchemy_url(u)) == u`` for a
  ``postgresql://`` URL ``u``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

DRIVER = "psycopg"
"""psycopg 3: sync and async from one driver."""

_PLAIN_SCHEMES = ("postgresql", "postgres")


def _split(url: str) -> tuple[str, str]:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL (no '://'): {url!r}")
    return scheme.lower(), rest


def sqlalchemy_url(url: str) -> str:
    """``postgresql://…`` or ``postgres://…`` → ``postgresql+psycopg://…``; ``postgresql+<driver>://…`` as is."""
    scheme, rest = _split(url)
    if scheme in _PLAIN_SCHEMES:
        return f"postgresql+{DRIVER}://{rest}"
    if scheme.startswith("postgresql+"):
        return url
    raise ValueError(f"not a PostgreSQL URL: scheme {scheme!r}")


def libpq_url(url: str) -> str:
    """``postgresql+<driver>://…`` → ``postgresql://…`` (for psycopg.connect, psql, pg_dump)."""
    scheme, rest = _split(url)
    if scheme in _PLAIN_SCHEMES or scheme.startswith("postgresql+"):
        return f"postgresql://{rest}"
    raise ValueError(f"not a PostgreSQL URL: scheme {scheme!r}")


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead; everything else (query, e.g. ``?host=<socket dir>``) is kept."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()
