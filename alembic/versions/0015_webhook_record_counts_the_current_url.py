"""``webhook_record`` judges a broker's endpoint by the attempts made to its current URL only.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

Hand-written and frozen (see 0001). A broker's endpoint is disabled after a 410 Gone or after
``EXCHANGE_WEBHOOK_DISABLE_AFTER`` consecutive failed events, and a delivery resets that count. Until now every
recorded attempt counted, whatever URL it was sent to: an attempt to the old URL still in flight (or not yet
recorded) when the broker set a new one with ``PUT /webhooks/endpoint``, which enables the endpoint and resets the
count, disabled the new endpoint if the old one answered 410, counted toward its failures, or reset them. Now the
tally is made per (broker, URL) and only the rows whose URL is the broker's ``webhook_url`` reach the broker; the
lock and the update re-check that under the row lock. The event itself still ends by its own attempts. The rest of
the function is 0008's, read from that revision.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (0008's text, this revision's).
CHANGES = [
    (
        "last_ok AS (SELECT broker_id, max(ord) AS ord FROM o WHERE kind = 'delivered' GROUP BY broker_id),",
        "last_ok AS (SELECT broker_id, url, max(ord) AS ord FROM o WHERE kind = 'delivered' GROUP BY broker_id, url),",
    ),
    ("SELECT o.broker_id,\n                   bool_or(", "SELECT o.broker_id, o.url,\n                   bool_or("),
    (
        "FROM o LEFT JOIN last_ok AS l ON l.broker_id = o.broker_id LEFT JOIN",
        "FROM o LEFT JOIN last_ok AS l ON l.broker_id = o.broker_id AND l.url = o.url LEFT JOIN",
    ),
    ("GROUP BY o.broker_id\n        ),", "GROUP BY o.broker_id, o.url\n        ),"),
    (
        "SELECT b.id FROM brokers AS b JOIN tally AS t ON t.broker_id = b.id\n",
        "SELECT b.id FROM brokers AS b JOIN tally AS t ON t.broker_id = b.id AND t.url = b.webhook_url\n",
    ),
    (
        "WHERE b.id = t.broker_id AND b.id = ANY(ARRAY(SELECT id FROM locked))",
        "WHERE b.id = t.broker_id AND t.url = b.webhook_url AND b.id = ANY(ARRAY(SELECT id FROM locked))",
    ),
]


def _webhook_record_0008() -> str:
    return str(context.script.get_revision("0008").module.WEBHOOK_RECORD)


def upgrade() -> None:
    function = _webhook_record_0008()
    for old, new in CHANGES:
        if function.count(old) != 1:  # a silent no-op replace would leave 0008's rule in place
            raise RuntimeError(f"0015 expected exactly one {old!r} in 0008's webhook_record")
        function = function.replace(old, new)
    op.execute(function)


def downgrade() -> None:
    op.execute(_webhook_record_0008())
