"""A redeliver fences off the attempts in flight before it: ``webhook_events.generation``.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

Hand-written and frozen (see 0001). ``POST /webhooks/events/{id}/redeliver`` makes an event pending and due now,
whatever its state, including while an attempt of it is in flight (claimed under its lease). That attempt's record
was fenced by ``attempts`` alone, which a redeliver leaves as it is: when the attempt failed as the last of the
schedule, the record marked the event ``failed`` (the redelivery the broker asked for never came), and a retry
moved it back one backoff into the future (the redelivery waited hours). Now every redeliver bumps the event's
``generation`` (``exchange.webhooks.queries.redeliver``), ``webhook_claim`` returns it with each claimed event, and
``webhook_record`` moves an event to ``failed`` or schedules its retry only while its generation is still the one
the attempt was claimed in. A delivery is not fenced by it: a 2xx answer delivered the event. The attempt is
logged and judges the broker's endpoint (its consecutive failures count only the events the record failed) as
before. A batch without generations (a worker older than this revision, during an upgrade) is fenced by
``attempts`` only, as it was.

``webhook_claim`` returns one more column (last, so that workers reading its columns by name keep working): a
function's result type cannot be replaced, so it is dropped and created again, in the migration's transaction.
``webhook_record`` is 0015's (0008's text with 0015's changes) with the fence added. The column is added with a
constant default: no table rewrite, no scan. Downgrading restores 0004's claim, 0015's record, and drops the column.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM_SIGNATURE = "webhook_claim(uuid[], integer[], uuid[], integer, integer, float8)"

# (0004's text, this revision's).
CLAIM_CHANGES = [
    ("    previous_secret text\n)", "    previous_secret text, generation integer\n)"),
    (
        "RETURNING e.id, e.attempts, e.broker_id, e.payload::text AS body",
        "RETURNING e.id, e.attempts, e.broker_id, e.payload::text AS body, e.generation",
    ),
    (
        "SELECT c.id, c.attempts, c.broker_id, c.body, r.webhook_url, r.webhook_secret, r.previous_secret",
        "SELECT c.id, c.attempts, c.broker_id, c.body, r.webhook_url, r.webhook_secret, r.previous_secret,\n"
        "               c.generation",
    ),
    (
        "SELECT s.id, NULL, NULL, NULL, NULL, NULL, NULL FROM skipped AS s;",
        "SELECT s.id, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM skipped AS s;",
    ),
]

# The fence of a retry and of a failure: the attempt's generation is still the event's. A batch of an older worker
# carries none (NULL): fenced by attempts only, as before this revision.
_FENCE = "e.attempts = o.attempt AND e.generation = COALESCE(o.generation, e.generation)"

# (0015's text, this revision's).
RECORD_CHANGES = [
    ("delay float8, reason text)", "delay float8, reason text, generation integer)"),
    (
        "WHERE o.kind = 'retry' AND e.id = o.id AND e.status = v_pending AND e.attempts = o.attempt\n",
        f"WHERE o.kind = 'retry' AND e.id = o.id AND e.status = v_pending\n              AND {_FENCE}\n",
    ),
    (
        "WHERE o.kind IN ('gone', 'exhausted') AND e.id = o.id AND e.status = v_pending AND e.attempts = o.attempt\n",
        f"WHERE o.kind IN ('gone', 'exhausted') AND e.id = o.id AND e.status = v_pending\n              AND {_FENCE}\n",
    ),
]


def _changed(function: str, changes: list[tuple[str, str]], name: str) -> str:
    for old, new in changes:
        if function.count(old) != 1:  # a silent no-op replace would leave the previous rule in place
            raise RuntimeError(f"0017 expected exactly one {old!r} in {name}")
        function = function.replace(old, new)
    return function


def _webhook_claim_0004() -> str:
    return str(context.script.get_revision("0004").module.WEBHOOK_CLAIM)


def _webhook_record_0015() -> str:
    """0015's ``webhook_record``: 0008's text with 0015's changes, as 0015's upgrade builds it."""
    function = str(context.script.get_revision("0008").module.WEBHOOK_RECORD)
    return _changed(function, list(context.script.get_revision("0015").module.CHANGES), "0008's webhook_record")


def upgrade() -> None:
    op.execute("ALTER TABLE webhook_events ADD COLUMN generation integer NOT NULL DEFAULT 0")
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
    op.execute(_changed(_webhook_claim_0004(), CLAIM_CHANGES, "0004's webhook_claim"))
    op.execute(_changed(_webhook_record_0015(), RECORD_CHANGES, "0015's webhook_record"))


def downgrade() -> None:
    op.execute(_webhook_record_0015())
    op.execute(f"DROP FUNCTION {CLAIM_SIGNATURE}")
    op.execute(_webhook_claim_0004())
    op.execute("ALTER TABLE webhook_events DROP COLUMN generation")
