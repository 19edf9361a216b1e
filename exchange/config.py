"""Process configuration, read once from environment variables.

Every process (api, matcher, sweeper, webhooks, CLI) builds one :class:`Settings` with :meth:`Settings.from_env`
and passes it down; nothing else reads ``os.environ``. Invariants:

* A :class:`Settings` is immutable and always valid: every field has been parsed and range-checked.
* A bad value raises :class:`SettingsError` naming the variable, at start-up rather than at first use.

To add a setting, add one field declared with :func:`_env` (variable name, parser, default). The parsers below
cover strings, URLs, integers with bounds and booleans; write a new one if none fits.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/exchange"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(ValueError):
    """An environment variable holds a value the exchange cannot use; the message names the variable."""


Parser = Callable[[str, str], Any]
"""``parser(variable_name, raw_value) -> value``; raises :class:`SettingsError` mentioning ``variable_name``."""

_SAME_AS = "same_as"
"""Metadata key: when the variable is unset, take the value of this other (earlier) field."""


def _env(variable: str, parse: Parser, default: Any = None, *, same_as: str | None = None, **kw: Any) -> Any:
    """Declare a field read from ``variable``. ``default`` is used when the variable is unset or empty;
    ``same_as`` names an earlier field whose value is the default instead."""
    metadata: dict[str, Any] = {"env": variable, "parse": parse, "default": default}
    if same_as is not None:
        metadata[_SAME_AS] = same_as
    return dataclasses.field(metadata=metadata, **kw)


# ------------------------------------------------------------------------------------------------- parsers


def _text(variable: str, raw: str) -> str:
    return raw


def _optional_text(variable: str, raw: str) -> str | None:
    return raw or None


def _url(*schemes: str) -> Parser:
    """A URL whose scheme is one of ``schemes`` (``postgresql`` also admits ``postgresql+driver``)."""

    def parse(variable: str, raw: str) -> str:
        scheme = urlsplit(raw).scheme.split("+", 1)[0].lower()
        if scheme not in schemes:
            raise SettingsError(f"{variable} must be a URL with scheme {' or '.join(schemes)}, got {redact(raw)!r}")
        return raw

    return parse


def _integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(variable: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{variable} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{variable} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{variable} must be <= {maximum}, got {value}")
        return value

    return parse


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _boolean(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{variable} must be one of {sorted(_TRUE | _FALSE)}, got {raw!r}")


def redact(url: str, *, lone_user_is_secret: bool = False) -> str:
    """The URL without its password, for messages and logs. With ``lone_user_is_secret`` (a webhook URL, whose
    credentials are sent as basic auth: ``https://TOKEN@host`` carries a token as its user name), a user name with
    no password (or an empty one: ``https://TOKEN:@host`` sends the same credentials) is hidden too."""
    parts = urlsplit(url)
    if lone_user_is_secret and parts.username is not None and not parts.password:
        return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _choice(*allowed: str) -> Parser:
    def parse(variable: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{variable} must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _seconds_list(variable: str, raw: str) -> tuple[float, ...]:
    """Comma-separated positive durations in seconds (``5,300,1800``); at most 50 entries."""
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise SettingsError(f"{variable} must be comma-separated seconds, got {raw!r}") from None
    if not values or len(values) > 50 or any(not 0 < v <= 7 * 86_400 for v in values):
        raise SettingsError(f"{variable} must list 1 to 50 durations in (0, 604800] seconds, got {raw!r}")
    return values


_POSTGRES_URL = _url("postgresql", "postgres")


_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _namespace(variable: str, raw: str) -> str:
    """A Redis namespace: 1-64 letters, digits, ``.``, ``_`` or ``-`` (no ``:`` nor glob characters)."""
    value = raw.strip()
    if not _NAMESPACE.fullmatch(value):
        raise SettingsError(f"{variable} must be 1-64 letters, digits, '.', '_' or '-', got {raw!r}")
    return value


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a process needs to know about its environment."""

    database_url: str = _env("EXCHANGE_DATABASE_URL", _POSTGRES_URL, DEFAULT_DATABASE_URL)
    """Direct PostgreSQL connection (libpq URL): migrations and anything session-scoped."""
    pooled_database_url: str = _env("EXCHANGE_POOLED_DATABASE_URL", _POSTGRES_URL, same_as="database_url")
    """Connection for request/transaction work; points at pgbouncer (transaction pooling) in production,
    so only transaction-scoped features may be used through it. Defaults to ``database_url``."""
    redis_url: str = _env("EXCHANGE_REDIS_URL", _url("redis", "rediss", "unix"), DEFAULT_REDIS_URL)
    redis_namespace: str | None = _env("EXCHANGE_REDIS_NAMESPACE", _namespace, None)
    """Prefix of every Redis key and channel of this exchange (:mod:`exchange.messaging.names`). Unset: derived
    from the PostgreSQL database's identity (cluster system identifier + database name), so every process of one
    exchange agrees and two exchanges sharing a Redis database never take each other's work."""
    partitions: int = _env("EXCHANGE_PARTITIONS", _integer(minimum=1, maximum=4096), 1)
    """Number of matching queues ``matching.0 … matching.<partitions-1>``. Every process must agree on it.

    One per matcher process that should work in parallel (``exchange dev`` sets it to its number of matcher
    processes unless it is set). A partition is a stream of matcher transactions, each covering the partition's
    woken books, so more partitions than processes only cut the same work into smaller transactions: on the
    project's 2-core machines one matcher process over 8 partitions used 1.8x the matcher CPU per order of one
    over a single partition, and held two thirds of its closed-loop throughput (ops/MEASURED.md)."""
    matcher_linger_ms: int = _env("EXCHANGE_MATCHER_LINGER_MS", _integer(minimum=0, maximum=200), 50)
    """How long a matcher keeps a partition it drained, waiting for new work on it, before it releases it (0: at
    once). Work woken meanwhile is taken without a message (:class:`exchange.messaging.wakeups.PartitionWakeups`):
    50 answered new orders 0.80x faster at the median than 20 (ops/MEASURED.md). A lingering partition keeps
    its worker thread, so with more partitions than matcher threads it should be lower."""
    admin_api_key: str | None = _env("EXCHANGE_ADMIN_API_KEY", _optional_text, None, repr=False)
    """Bearer key for admin endpoints (``/register``, ``/ops``); admin endpoints are disabled when unset."""
    order_wait_ms: int = _env("EXCHANGE_ORDER_WAIT_MS", _integer(minimum=0, maximum=60_000), 250)
    """How long ``POST /orders`` waits for the matcher's result before answering with status ``pending``."""
    group_commit_concurrency: int = _env("EXCHANGE_GROUP_COMMIT_CONCURRENCY", _integer(minimum=1, maximum=64), 1)
    """Per api process: how many order-accept transactions (and order read-back queries) run at once. Requests
    arriving while all are busy are committed together in the next one (group commit). One is the fastest measured
    (``exchange bench``, ops/MEASURED.md): every request that arrives during a commit joins the next batch, so
    batches grow with the load; an idle exchange still starts each request's batch at once."""
    group_commit_max: int = _env("EXCHANGE_GROUP_COMMIT_MAX", _integer(minimum=1, maximum=10_000), 200)
    """Per api process: the most orders one group-commit transaction (or read-back query) holds."""
    debug_endpoints: bool = _env("EXCHANGE_DEBUG_ENDPOINTS", _boolean, False)
    webhook_allow_private: bool = _env("EXCHANGE_WEBHOOK_ALLOW_PRIVATE", _boolean, False)
    """Allow webhook URLs that resolve to private/loopback addresses (tests and local development only)."""
    webhook_retry_schedule: tuple[float, ...] = _env(
        "EXCHANGE_WEBHOOK_RETRY_SCHEDULE", _seconds_list, (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    )
    """Delay before each retry of a failed delivery (±20 % jitter); after the last one the event is ``failed``.
    The default makes 8 attempts over ≈ 27.6 h (99,305 s; 22-33 h with the jitter)."""
    webhook_connect_timeout_ms: int = _env("EXCHANGE_WEBHOOK_CONNECT_TIMEOUT_MS", _integer(1, 60_000), 3_000)
    webhook_read_timeout_ms: int = _env("EXCHANGE_WEBHOOK_READ_TIMEOUT_MS", _integer(1, 300_000), 10_000)
    """Time to send a delivery and read its whole answer."""
    webhook_lease_ms: int = _env("EXCHANGE_WEBHOOK_LEASE_MS", _integer(1_000, 3_600_000), 60_000)
    """How long a claimed event stays in flight before another worker may try it (a crashed worker's event is
    retried after this). Must exceed the longest attempt (:meth:`longest_webhook_attempt_ms`): checked at start-up."""
    webhook_requeue_after_ms: int = _env("EXCHANGE_WEBHOOK_REQUEUE_AFTER_MS", _integer(100, 3_600_000), 10_000)
    """The sweeper hints the webhook workers about a pending event this long after it became due (lost hint,
    crashed worker)."""
    webhook_disable_after: int = _env("EXCHANGE_WEBHOOK_DISABLE_AFTER", _integer(1, 1_000_000), 5)
    """Consecutive events ending ``failed`` after which the broker's endpoint is disabled."""
    webhook_secret_grace_s: int = _env("EXCHANGE_WEBHOOK_SECRET_GRACE_S", _integer(0, 30 * 86_400), 86_400)
    """After a secret rotation, deliveries are also signed with the previous secret for this long."""
    webhook_max_in_flight: int = _env("EXCHANGE_WEBHOOK_MAX_IN_FLIGHT", _integer(1, 1_000), 4)
    """Concurrent deliveries to one broker per worker process: a slow receiver never takes every slot."""
    webhook_record_linger_ms: int = _env("EXCHANGE_WEBHOOK_RECORD_LINGER_MS", _integer(0, 10_000), 50)
    """How long a worker holds a finished attempt so that the attempts ending meanwhile are recorded with it, in
    one statement (0: record at once). Only the bookkeeping waits: the receiver already has the event, and the
    slot was free when the attempt ended. A worker killed meanwhile sends those events again once their leases
    end (at least once, as for an attempt in flight). At ``--scale 100`` 50 ms took the records from ~115 to ~16
    statements per second and the orders' p50 latency down by a quarter or more (ops/MEASURED.md)."""
    webhook_attempts_retention_hours: int = _env(
        "EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS", _integer(0, 10 * 365 * 24), 7 * 24
    )
    """The sweeper deletes webhook delivery attempts older than this (0: keeps them forever), in bounded batches
    (:class:`exchange.sweeper.AttemptsRetention`). The attempts are a log: no event's state nor endpoint's health is
    read from them."""
    log_level: str = _env("EXCHANGE_LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info")
    log_format: str = _env("EXCHANGE_LOG_FORMAT", _choice("json", "text"), "json")
    """``json``: one JSON object per line (with ``request_id``); ``text`` for reading in a terminal."""
    slow_request_ms: int = _env("EXCHANGE_SLOW_REQUEST_MS", _integer(minimum=0, maximum=600_000), 500)
    """The api logs a warning for every request slower than this (0 disables the warning)."""
    metrics_port: int = _env("EXCHANGE_METRICS_PORT", _integer(minimum=0, maximum=65_535), 0)
    """Port of the Prometheus endpoint of a matcher/webhook worker process (0: none). The api serves ``/metrics``."""
    metrics_bind: str = _env("EXCHANGE_METRICS_BIND", _text, "127.0.0.1")
    """Address the worker metrics endpoint listens on (``0.0.0.0`` in containers)."""

    def __post_init__(self) -> None:
        # A lease that can end while its attempt still runs hands the event to a second attempt: sent twice, and every
        # lease that runs out uses up one attempt of the retry schedule, so a slow receiver's events end failed (and
        # its endpoint disabled) within a few leases instead of the schedule's hours.
        longest = self.longest_webhook_attempt_ms()
        if self.webhook_lease_ms <= longest:
            raise SettingsError(
                f"EXCHANGE_WEBHOOK_LEASE_MS must exceed the longest delivery attempt, {longest} ms (2 x "
                "EXCHANGE_WEBHOOK_CONNECT_TIMEOUT_MS: the name lookup, then the connect; + "
                "EXCHANGE_WEBHOOK_READ_TIMEOUT_MS + EXCHANGE_WEBHOOK_RECORD_LINGER_MS), got "
                f"{self.webhook_lease_ms}"
            )

    def longest_webhook_attempt_ms(self) -> int:
        """From a webhook event's claim to its attempt's record: the host's lookup and the connect (each bounded by
        the connect timeout), sending and reading the answer (the read timeout), then the record's linger."""
        return 2 * self.webhook_connect_timeout_ms + self.webhook_read_timeout_ms + self.webhook_record_linger_ms

    def __repr__(self) -> str:
        # Settings get logged at start-up: never print a password (URLs are redacted) or the admin key.
        shown = []
        for field in dataclasses.fields(self):
            if not field.repr:
                continue
            value = getattr(self, field.name)
            text = repr(redact(value)) if field.name.endswith("_url") else repr(value)
            shown.append(f"{field.name}={text}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = None) -> Self:
        """Build settings from ``environ`` (default: ``os.environ`` over the optional ``.env`` file, see
        :func:`load_environ`). Unset and empty variables take defaults."""
        env = load_environ(environ, env_file=env_file)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            raw = env.get(meta["env"], "")
            if raw != "":
                values[field.name] = meta["parse"](meta["env"], raw)
            elif _SAME_AS in meta:
                values[field.name] = values[meta[_SAME_AS]]
            else:
                values[field.name] = meta["default"]
        return cls(**values)


ENV_FILE_VARIABLE = "EXCHANGE_ENV_FILE"
"""Names the optional dotenv file; default ``.env`` in the current directory."""


def load_environ(environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = None) -> dict[str, str]:
    """The variables the settings are read from: the dotenv file's, overridden by the real environment.

    With ``environ=None`` the real environment is ``os.environ`` and the file is ``env_file``, else
    ``$EXCHANGE_ENV_FILE``, else ``./.env`` (a missing file is fine). With an explicit ``environ`` only an explicit
    ``env_file`` is read, so tests never pick up a developer's ``.env``. The file never overrides a variable that
    is set in the environment, even to an empty value.
    """
    explicit = env_file is not None
    if environ is None:
        environ = os.environ
        explicit = explicit or bool(os.environ.get(ENV_FILE_VARIABLE))
        env_file = env_file or os.environ.get(ENV_FILE_VARIABLE) or ".env"
    merged: dict[str, str] = {}
    if env_file is not None:
        path = Path(env_file)
        if path.is_file():
            from dotenv import dotenv_values

            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
        elif explicit:
            # A named file that is missing is a mistake worth stopping for; only ./.env is optional.
            raise SettingsError(f"{ENV_FILE_VARIABLE}: no such file {str(env_file)!r}")
    merged.update(environ)
    return merged
