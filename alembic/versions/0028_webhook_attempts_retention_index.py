"""The webhook attempts by when they were made, for the sweeper's retention: ``ix_webhook_attempts_attempted_at``.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07

Hand-written and frozen (see 0001). ``webhook_attempts`` grew without bound (one row per delivery attempt). The
sweeper now deletes those older than ``EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS``, a bounded batch per sweep,
oldest first (``exchange.sweeper.AttemptsRetention``). No index fitted: ``(broker_id, attempted_at DESC)`` keeps
each broker's apart (PostgreSQL 15 has no skip scan), and the failed attempts' partial index holds only those.
Without this one a batch of 5,000 out of 5 million attempts was a sequential scan and a sort of the 2 million old
ones, 1.0 s; through it, 17-21 ms. One entry more per attempt recorded (by ``webhook_record``, at the index's right
end: attempts are recorded about when they are made).

Locks: ``CREATE INDEX`` keeps ``webhook_attempts`` from being written while it builds, so the webhook workers'
records wait: 4-5 s for 5 million attempts (a private PostgreSQL 15 on 2 cores). A build longer than the lease
(``EXCHANGE_WEBHOOK_LEASE_MS``) lets the events whose records wait be claimed and sent again (at least once allows
it). ``CONCURRENTLY`` cannot run inside the one transaction ``env.py`` upgrades in, so on a big table build it by
hand first, ``CREATE INDEX CONCURRENTLY ix_webhook_attempts_attempted_at ON webhook_attempts (attempted_at)`` (it
must end valid), and the upgrade keeps it (``IF NOT EXISTS``); else upgrade in a quiet moment, as for 0021.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS ix_webhook_attempts_attempted_at ON webhook_attempts (attempted_at)")


def downgrade() -> None:
    op.execute("DROP INDEX ix_webhook_attempts_attempted_at")
