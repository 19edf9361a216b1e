"""Webhook delivery: a ``skipped`` event status (broker without a webhook URL, or endpoint disabled).

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-23

Hand-written and frozen (see 0001). ``skipped`` means "not sent and never will be unless the broker asks for a
redelivery"; the event stays in the broker's durable log (``GET /events``) either way. In-flight leases need no
column: the deliverer pushes ``next_attempt_at`` forward when it claims an event (see exchange/webhooks/delivery.py).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_webhook_events_status"


def upgrade() -> None:
    op.drop_constraint(op.f(CONSTRAINT), "webhook_events", type_="check")
    op.create_check_constraint(
        op.f(CONSTRAINT), "webhook_events", "status IN ('pending', 'delivered', 'failed', 'skipped')"
    )


def downgrade() -> None:
    # Skipped events were never sent: back to failed, the closest status the old schema knows.
    op.execute("UPDATE webhook_events SET status = 'failed' WHERE status = 'skipped'")
    op.drop_constraint(op.f(CONSTRAINT), "webhook_events", type_="check")
    op.create_check_constraint(op.f(CONSTRAINT), "webhook_events", "status IN ('pending', 'delivered', 'failed')")
