"""Orders may close ``match_limit_reached``: ``ck_orders_close_reason`` allows it.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07

Hand-written and frozen (see 0001). A taker matches at most ``MAX_TAKER_MATCHES`` resting orders in one command
(``exchange.engine.types``); a GTC/GTD limit order that reaches the cap while its price still crosses the book
closes its remainder with the new reason instead of resting crossed (``CloseReason.MATCH_LIMIT``).

Locks: re-adding the check reads every order under the table's ACCESS EXCLUSIVE lock (writes wait for it; the
old values all pass): well under a second per million orders. The downgrade turns the new reason into
``cancelled`` (the webhook event those orders produced was ``order.cancelled``), then restores 0001's check.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "'filled', 'cancelled', 'expired', 'unfilled', 'self_trade_prevented', 'rejected'"
_NEW = "'filled', 'cancelled', 'expired', 'unfilled', 'self_trade_prevented', 'match_limit_reached', 'rejected'"


def _check(values: str) -> None:
    op.execute("ALTER TABLE orders DROP CONSTRAINT ck_orders_close_reason")
    op.execute(f"ALTER TABLE orders ADD CONSTRAINT ck_orders_close_reason CHECK (close_reason IN ({values}))")


def upgrade() -> None:
    _check(_NEW)


def downgrade() -> None:
    op.execute("UPDATE orders SET close_reason = 'cancelled' WHERE close_reason = 'match_limit_reached'")
    _check(_OLD)
