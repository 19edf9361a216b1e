"""The api's group insert of cancel commands takes the orders' advisory locks itself: one statement, one round trip.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06

Hand-written and frozen (see 0001). Cancel writers are serialised per order by transaction-scoped advisory locks,
taken in ascending order (no cycle between two groups) on one of 256 buckets of the order id's hash under the
two-integer key space 3084 (0x0C0C), apart from the books' one-bigint keys: a group (or a cancel-all of thousands
of orders) holds at most 256 entries of PostgreSQL's shared lock table, and two orders in one bucket only make their
cancels wait for each other. Until now the api took them with a statement of its own, then called
``write_cancels`` (0012), inside an explicit transaction: BEGIN, the locks, the insert, COMMIT, four round trips per
group. Taken in the function instead, a group is one autocommit statement.
``VOLATILE`` under READ COMMITTED: the insert's statement takes its own snapshot after every lock is granted, so it
sees the commands (and closed statuses) that a concurrent cancel committed meanwhile, as the separate statement did.
The rest of the function is 0012's, read from that revision.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Put first in 0012's function body (the rest of it is 0012's, read from its frozen revision).
LOCKS = """    -- The buckets in ascending order: the sorted subquery's rows reach the lock calls in that order.
    PERFORM pg_advisory_xact_lock(3084, k.bucket)
    FROM (SELECT DISTINCT hashtext(CAST(i AS text)) & 255 AS bucket FROM unnest(p_ids) AS i ORDER BY 1) AS k;
"""


def _write_cancels_0012() -> str:
    """0012's ``CREATE FUNCTION write_cancels`` as ``CREATE OR REPLACE``, from that (frozen) revision's module."""
    text = str(context.script.get_revision("0012").module.WRITE_CANCELS)
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def upgrade() -> None:
    head, begin, body = _write_cancels_0012().partition("\nBEGIN\n")
    if not begin:
        raise RuntimeError("0012's write_cancels has no BEGIN line")
    op.execute(head + begin + LOCKS + body)


def downgrade() -> None:
    op.execute(_write_cancels_0012())
