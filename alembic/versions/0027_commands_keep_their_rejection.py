"""A command the matcher rejected keeps its reject reason: ``commands.rejected_reason``.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

A command that changed nothing was only marked processed: an amend the engine refused (a new quantity not above
the shares already filled, an order past its ``valid_until``, an order that closed before the amend reached it)
looked applied to the request waiting for it, which answered 200 with the order unchanged, so a broker could not
tell a refused amend from an accepted one. The matcher now writes the engine's reject reason (``not_amendable``,
``unknown_order``, …, or ``unprocessable`` for a command it quarantined) on the command's row, in the transaction
that marks it processed, and the api answers the amend from it (``exchange.api.services.amend``).

Adding a nullable column without a default changes only the catalog (no rewrite of ``commands``); no index: the
column is read with its row, by sequence number. Upgrade the database before the matchers (``exchange migrate``,
which ``exchange dev`` and compose's ``migrate`` run first): a matcher of this version writes the column.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE commands ADD COLUMN rejected_reason text")


def downgrade() -> None:
    op.execute("ALTER TABLE commands DROP COLUMN rejected_reason")
