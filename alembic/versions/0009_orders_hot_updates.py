"""The matcher's update of a new order is a HOT update: no new entry in any index of ``orders``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

Hand-written and frozen (see 0001). Every order is inserted ``pending`` by the api and updated by the matcher that
applies it (to ``open`` for the three quarters that rest, or ``closed``). That update was never HOT: ``status`` was
in the predicates of ``ix_orders_open_book`` and ``ix_orders_open_valid_until`` and ``priority`` (NULL until then) in
the book index's key, so each one wrote a new entry into all six indexes of the table (and the new row version
usually on another page). Here:

* both partial indexes take "not closed" (``close_reason IS NULL``) as their predicate, which holds for pending and
  open orders alike; their readers (the book rebuild, ``book_levels``, the sweeper's expiry scan, the ops page) also
  filter on ``status = 'open'`` as before, and name the predicate so that their plans can use the indexes;
* the api writes ``priority`` with the order (its place ``seq``, which is what the matcher sets when it rests),
  so pending → open changes only ``status``, ``remaining`` and ``updated_at``, none of them indexed;
* the table keeps 20 % of each page free (``fillfactor``), since a HOT version must fit on its row's page;
* the broker-scoped unique keys ``client_order_id`` and ``idempotency_key`` become unique indexes over the rows that
  have one (NULL never conflicted): an order sent without them no longer adds two index entries on insert and two
  on each non-HOT update. ``INSERT … ON CONFLICT DO NOTHING`` (no conflict target) arbitrates on them as before.

A maker's partial fill (``remaining`` only) is HOT too. Closing an order (``close_reason`` set) is not.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 80

# book_levels (0007) names the predicate of ix_orders_open_book on both sides, so that its plan can use the index.
BOOK_LEVELS_CHANGE = ("o.status = 'open'", "o.close_reason IS NULL AND o.status = 'open'")


def _book_levels_0007() -> str:
    """0007's ``CREATE FUNCTION book_levels`` as ``CREATE OR REPLACE``, from that (frozen) revision's module."""
    text = str(context.script.get_revision("0007").module.BOOK_LEVELS)
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _book_indexes(*, resting: str) -> None:
    """Rebuild the book and expiry indexes over the orders for which ``resting`` holds."""
    op.execute("DROP INDEX ix_orders_open_book")
    op.execute(f"CREATE INDEX ix_orders_open_book ON orders (symbol, side, price, priority) WHERE {resting}")
    op.execute("DROP INDEX ix_orders_open_valid_until")
    op.execute(
        f"CREATE INDEX ix_orders_open_valid_until ON orders (valid_until) WHERE {resting} AND valid_until IS NOT NULL"
    )


def upgrade() -> None:
    for key in ("client_order_id", "idempotency_key"):
        op.drop_constraint(f"uq_orders_broker_id_{key}", "orders", type_="unique")
        op.execute(
            f"CREATE UNIQUE INDEX uq_orders_broker_id_{key} ON orders (broker_id, {key}) WHERE {key} IS NOT NULL"
        )
    _book_indexes(resting="close_reason IS NULL")
    op.execute(f"ALTER TABLE orders SET (fillfactor = {FILLFACTOR})")
    old, new = BOOK_LEVELS_CHANGE
    book_levels = _book_levels_0007()
    if book_levels.count(old) != 2:  # a silent no-op replace would leave 0007's plan
        raise RuntimeError(f"0009 expected {old!r} twice in 0007's book_levels")
    op.execute(book_levels.replace(old, new))


def downgrade() -> None:
    op.execute(_book_levels_0007())
    op.execute("ALTER TABLE orders RESET (fillfactor)")
    _book_indexes(resting="status = 'open'")
    for key in ("client_order_id", "idempotency_key"):
        op.execute(f"DROP INDEX uq_orders_broker_id_{key}")
        op.create_unique_constraint(f"uq_orders_broker_id_{key}", "orders", ["broker_id", key])
