"""Orders: ``placed_price`` and ``placed_quantity``, the price and quantity the order was placed with.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Hand-written and frozen (see 0001). ``price`` and ``quantity`` change after an amend or a self-trade-prevention
decrement, so an idempotent retry of the original request (same ``client_order_id``/``Idempotency-Key``, same
fields) must be compared with what was placed, not with what the order is now. Rows written before this revision
(and rows written by tools that bypass the api) keep NULL: readers fall back to ``price``/``quantity``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("placed_price", sa.BigInteger(), nullable=True))
    op.add_column("orders", sa.Column("placed_quantity", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("orders", "placed_quantity")
    op.drop_column("orders", "placed_price")
