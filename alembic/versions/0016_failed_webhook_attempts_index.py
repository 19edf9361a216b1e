"""The failed webhook attempts, newest first, for the ops page's "Recent errors".

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07

Hand-written and frozen (see 0001). The ops page listed the events with an error sorted by their next attempt: an
event deep in its retry schedule (a receiver down for hours, next attempt up to 10 h ahead) came first, its "when"
in the future, and an endpoint that had only just begun failing (next attempt in seconds) was not listed at all,
for about a day, until its events were exhausted. The list is now the latest failed attempts by when they were
made. A partial index holds only the failed ones: a delivery writes nothing more.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_webhook_attempts_failed_attempted_at ON webhook_attempts (attempted_at DESC)"
        " WHERE error IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_webhook_attempts_failed_attempted_at")
