"""The per-broker claim reads each broker's due events from the pending index, never the broker's history.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

0019's per-broker path of ``webhook_claim`` (taken while a broker is at this worker's cap) named each eligible
broker's due events as a range of row values, ``(broker_id, next_attempt_at) >= (g.broker_id, '-infinity')`` and
``<= (g.broker_id, statement_timestamp())``, so that only the pending index ``(broker_id, next_attempt_at) WHERE
status = 'pending'`` could serve it. It was not so: the planner derives ``broker_id >= … AND broker_id <= …`` from
the row comparisons, which ``uq_webhook_events_broker_id_sequence`` (leading ``broker_id``) serves, and it estimates
a row comparison by its first column only, so the pending index's range looked as wide as a third of the index.
``ops.bench_db`` found every plan, in 10 of 10 rounds at both its sizes, reading each eligible broker's events
through the unique index, filtering them by status and due time and sorting them: the broker's whole history,
delivered events included (~1,005 rows per broker per claim at 200 brokers; 101,002 for a broker with 101,000
delivered events and 2 due: 43 ms a claim instead of 2-3).

Now each broker's reading is ``status = 'pending' AND broker_id >= g.broker_id AND broker_id <= g.broker_id AND
next_attempt_at <= statement_timestamp() ORDER BY broker_id, next_attempt_at LIMIT k``. The pending index serves all
three bounds as index conditions and returns the rows in that order, so its scan stops after ``k`` rows; the unique
index serves the broker's range alone (then it must read, filter and sort the broker's whole history), and the
due-time index (``next_attempt_at`` alone, same predicate) the due time alone (then it must read and sort every due
event of every broker). The broker is named as a range, not an equality, on purpose: ``broker_id = g.broker_id``
makes the broker a constant of the sort, which leaves ``ORDER BY next_attempt_at``, an order the due-time index
also gives, and walked with a ``LIMIT`` through the due-time index and filtered by broker, a plan reads the due
events of every broker before this one: ``ops.bench_db`` found that plan in a run at its small size with the equality
(2,190 rows a loop, all of a hanging broker's backlog). Both range bounds are plain comparisons, which the planner
estimates as a range of one column (its row comparisons it had estimated by their first column alone, a third of
the index each). The function's ``plan_cache_mode = force_generic_plan`` keeps one generic plan per server
connection, in which the broker is a parameter whatever the sample; the plan was checked on an empty analysed
outbox that then grew to 300,000 events, on ``ops.bench_db``'s datasets (10 fresh ANALYZE samples) and on a broker
with 101,000 delivered events.

The lock of each candidate (``due``'s ``WHERE e.id = c.id LIMIT 1 FOR UPDATE SKIP LOCKED``) names its broker too,
``e.id = c.id AND e.broker_id = c.broker_id`` (``candidates`` carries it): then the primary key and 0021's
``uq_webhook_events_broker_id_id`` (broker_id, id) both find the row by a unique key. By its id alone, a plan made
on an empty analysed outbox (where every path costs the same) took the latter, which its broker leads, and read
the whole index per lock: 35,000 buffers and 240-270 ms for a claim of 32 once 300,000 events were there; 8.5 ms
now. Nothing else changes: the caps per broker, oldest due first, ``SKIP LOCKED``, the generation, the lease, and
the oldest-due path taken while no broker is at its cap.

Downgrading restores 0019's claim exactly.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (0019's text, this revision's): the per-broker reading inside ``candidates``, its broker carried to the lock.
CHANGES = [
    (
        """                WHERE e.status = 'pending'
                  AND (e.broker_id, e.next_attempt_at) >= (g.broker_id, '-infinity'::timestamptz)
                  AND (e.broker_id, e.next_attempt_at) <= (g.broker_id, statement_timestamp())
                ORDER BY e.broker_id, e.next_attempt_at
""",
        """                WHERE e.status = 'pending'
                  AND e.broker_id >= g.broker_id AND e.broker_id <= g.broker_id
                  AND e.next_attempt_at <= statement_timestamp()
                ORDER BY e.broker_id, e.next_attempt_at
""",
    ),
    ("            SELECT c.id, c.next_attempt_at\n", "            SELECT c.id, g.broker_id, c.next_attempt_at\n"),
    ("                WHERE e.id = c.id\n", "                WHERE e.id = c.id AND e.broker_id = c.broker_id\n"),
]


def _webhook_claim_0019() -> str:
    """0019's ``webhook_claim`` (``CREATE OR REPLACE``), as 0019 builds it (0020 and 0021 did not change it)."""
    m = context.script.get_revision("0019").module
    return str(m._two_paths(m._changed(m._webhook_claim_0017(), m.CLAIM_CHANGES[1:], "0017's webhook_claim")))


def _changed(function: str) -> str:
    for old, new in CHANGES:
        if function.count(old) != 1:  # a silent no-op replace would leave 0019's reading in place
            raise RuntimeError(f"{revision} expected exactly one {old!r} in 0019's webhook_claim")
        function = function.replace(old, new)
    return function


def upgrade() -> None:
    op.execute(_changed(_webhook_claim_0019()))


def downgrade() -> None:
    op.execute(_webhook_claim_0019())
