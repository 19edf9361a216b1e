"""``order_views`` and ``write_cancels`` plan their lookup of orders by id only once ``orders`` holds a row.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

Both functions look each order up by its id alone (the caller knows the order's broker, never its symbol) in a
generic plan kept per server connection until ``orders`` is analysed again. Made while ``orders`` has no page at all
and its statistics say it is empty (a fresh database analysed, as ``ANALYZE`` leaves it), every path to an order
costs the same, and the planner kept 0021's ``uq_orders_symbol_id`` (symbol, id), which its symbol leads: ``Index
Cond: (id = k.id)`` on a non-leading column, the whole index per order. Measured on a database analysed empty, then
200,000 orders added on another connection: 10 lookups read the index whole, ``write_cancels`` 64.6 ms and
``order_views`` 54.7 ms for 10 orders (about 1-2 ms through the primary key). The symbol cannot be named as 0022
named the broker (neither caller has it), and the two 0021 indexes on ``orders`` must keep the id last: led by it,
they were taken instead of the primary key for every lookup by id (0021). A table with one row has a page, from
which the planner estimates its rows (about 30 per page): a lookup through the primary key then costs less than
reading any index whole, and it is what both functions planned on 10 orders analysed empty (see
``tests/integration/test_query_plans.py``).

So each function returns no row, without running its lookup, while ``orders`` has none (``IF NOT EXISTS (SELECT FROM
orders)``: one index entry read, or none): the lookup is first planned once an order exists. The answers do not
change (with no order, no id names one; ``write_cancels`` still takes its bucket locks first). Orders are never
deleted, so the gate is passed at most once per connection's plan; a ``TRUNCATE`` invalidates the plans anyway.

Downgrading restores 0007's ``order_views`` and 0018's ``write_cancels`` exactly.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Inserted before each function's RETURN QUERY: no plan of the lookup is made (or kept) on an orders table with no
# page, where the planner cannot tell a probe of the primary key from a read of a symbol-led index.
GATE = """    IF NOT EXISTS (SELECT FROM orders) THEN
        RETURN;  -- no order: no id names one (the lookup below is planned once one exists: see alembic 0023)
    END IF;
"""
RETURN_QUERY = "    RETURN QUERY\n"


def _order_views_0007() -> str:
    """0007's ``order_views`` as ``CREATE OR REPLACE`` (no later revision changed it)."""
    text = str(context.script.get_revision("0007").module.ORDER_VIEWS)
    if text.count("CREATE FUNCTION") != 1:
        raise RuntimeError("0023 expected exactly one CREATE FUNCTION in 0007's order_views")
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _write_cancels_0018() -> str:
    """0018's ``write_cancels`` (no later revision changed it)."""
    return str(context.script.get_revision("0018").module.WRITE_CANCELS)


def _gated(function: str, name: str) -> str:
    if function.count(RETURN_QUERY) != 1:  # a silent no-op replace would leave the ungated lookup in place
        raise RuntimeError(f"{revision} expected exactly one RETURN QUERY in {name}")
    return function.replace(RETURN_QUERY, GATE + RETURN_QUERY)


def upgrade() -> None:
    op.execute(_gated(_order_views_0007(), "0007's order_views"))
    op.execute(_gated(_write_cancels_0018(), "0018's write_cancels"))


def downgrade() -> None:
    op.execute(_write_cancels_0018())
    op.execute(_order_views_0007())
