"""``matcher_pending`` plans its read once a command exists; the per-broker claim locks each event by a whole key.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

Two more plans kept per server connection (until the table is analysed again) that read whole tables or histories
once made on empty or near-empty tables, of the kind 0022 and 0023 removed.

``matcher_pending`` (0010) joins each pending command to its order by ``o.id = c.order_id``. Planned while
``orders`` had no page at all and its statistics said empty (a fresh database analysed, its matcher's first call
before any order), a probe of ``pk_orders`` cost what reading it whole does, and the plan kept was a nested loop
whose inner side read ``pk_orders`` whole, unparameterised, with the id as a join filter: once per command. Measured
on a database analysed empty, then 200,000 orders with unprocessed place commands added on another connection:
8.9 s per call of 3 symbols x 50 commands (15.3 million buffers; 101,451 orders read per command). A table with a
page is estimated from it (about 30 rows a page): a probe then costs less than any whole read, and that is the plan
made on 1 or 10 orders analysed empty (``tests/integration/test_query_plans.py``). So the function returns no row,
without running its read, while ``commands`` has none at all (``NOT EXISTS (SELECT FROM commands)``: the first
entry of ``pk_commands``); the read is first planned once a command exists, and with it its order (``accept_orders``
writes both in one statement; an expire follows due orders). The answers do not change (no command: none pending).
Commands and orders are never deleted, so once a server connection has seen a command it need not look again: it
records that in a setting of its own, ``exchange.matcher_pending_planned`` (``set_config``, for the session; rolled
back with its transaction, after which the next call looks again), and checks only that setting from then on, a
plain expression with no statement to run. Measured in a PL/pgSQL loop of 20,000 one-symbol calls (server side, 6
alternating rounds, 20,000 orders, 2,000 pending): 21.8 us per call before, 22.4 us with the setting (1.03x), 29.7
us looking for a command on every call (1.36x). ``DISCARD ALL`` forgets both the setting and the plans.

The per-broker path of ``webhook_claim`` (0019, 0022) locks each candidate by ``e.id = c.id AND e.broker_id =
c.broker_id`` (0022). Planned while the outbox held one pending event for each of 200 brokers (analysed or not),
the plan kept read ``uq_webhook_events_broker_id_sequence`` by its broker alone and filtered by id: the broker's
whole history, delivered events included, per lock (500-1,000 rows a lock at 100,000-200,000 events; the primary
key and ``uq_webhook_events_broker_id_id`` both cost the same on those statistics). Each candidate now carries its
``sequence`` and the lock names all three columns: every index on ``webhook_events`` that the lock can use (the
primary key, ``(broker_id, id)``, ``(broker_id, sequence)``) then finds the row by a unique key of its own; the
partial indexes cannot serve it (their predicates name the status, which the lock does not). Nothing else changes.

(The ``pending_brokers`` skip scan was kept as the pending index's range in every plan tried: empty analysed, 1
event per broker analysed or not, 10-500 brokers; see the report of this revision's branch.)

Downgrading restores 0010's ``matcher_pending`` and 0022's ``webhook_claim`` exactly.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Inserted before matcher_pending's RETURN QUERY: no plan of the read is made (or kept) on an orders table with no
# page, where the planner cannot tell a probe of the primary key from a read of it whole.
PENDING_GATE = """    IF current_setting('exchange.matcher_pending_planned', true) IS DISTINCT FROM 'on' THEN
        IF NOT EXISTS (SELECT FROM commands) THEN
            RETURN;  -- no command: none pending (the read below is planned once one exists: see alembic 0024)
        END IF;
        PERFORM set_config('exchange.matcher_pending_planned', 'on', false);  -- this server connection's
    END IF;
"""
RETURN_QUERY = "    RETURN QUERY\n"

# (0022's text, this revision's): each candidate's sequence, carried to its lock.
CLAIM_CHANGES = [
    ("            SELECT c.id, g.broker_id, c.next_attempt_at\n",
     "            SELECT c.id, g.broker_id, c.sequence, c.next_attempt_at\n"),
    ("                SELECT e.id, e.next_attempt_at FROM webhook_events AS e\n",
     "                SELECT e.id, e.sequence, e.next_attempt_at FROM webhook_events AS e\n"),
    ("                WHERE e.id = c.id AND e.broker_id = c.broker_id\n",
     "                WHERE e.id = c.id AND e.broker_id = c.broker_id AND e.sequence = c.sequence\n"),
]  # fmt: skip


def _matcher_pending_0010() -> str:
    """0010's ``matcher_pending`` as ``CREATE OR REPLACE`` (no later revision changed it)."""
    text = str(context.script.get_revision("0010").module.MATCHER_PENDING)
    if text.count("CREATE FUNCTION") != 1:
        raise RuntimeError(f"{revision} expected exactly one CREATE FUNCTION in 0010's matcher_pending")
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _webhook_claim_0022() -> str:
    """0022's ``webhook_claim`` (``CREATE OR REPLACE``), as 0022 builds it (0023 did not change it)."""
    m = context.script.get_revision("0022").module
    return str(m._changed(m._webhook_claim_0019()))


def _changed(function: str, changes: list[tuple[str, str]], name: str) -> str:
    for old, new in changes:
        if function.count(old) != 1:  # a silent no-op replace would leave the previous text in place
            raise RuntimeError(f"{revision} expected exactly one {old!r} in {name}")
        function = function.replace(old, new)
    return function


def upgrade() -> None:
    op.execute(_changed(_matcher_pending_0010(), [(RETURN_QUERY, PENDING_GATE + RETURN_QUERY)], "matcher_pending"))
    op.execute(_changed(_webhook_claim_0022(), CLAIM_CHANGES, "0022's webhook_claim"))


def downgrade() -> None:
    op.execute(_webhook_claim_0022())
    op.execute(_matcher_pending_0010())
