"""The cancels' lock bucket of an order id is one SQL function, ``cancel_bucket(uuid)``, that every reader calls.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

``write_cancels`` (0014) locks ``(3084, bucket)`` for each of its orders' buckets, ``bucket`` being
``hashtext(CAST(id AS text)) & 255``; the cancel-all (``exchange.orders.accept``) groups an order's ids by the same
bucket so that a chunk of ids needs few locks, and the benchmarks and tests find orders sharing a bucket by it. The
expression was written out in each of them, and a change to one alone would leave the cancel-all's chunks spanning
every bucket, or a test looking at the wrong lock, with nothing failing. Now it is written once:
``cancel_bucket(uuid)`` is a one-expression SQL function, ``IMMUTABLE``, which the planner inlines wherever it is
called (the plans are those of the expression itself: no function call per id), and ``write_cancels`` is 0023's
text with the expression replaced by a call of it.

Downgrading restores 0023's ``write_cancels`` exactly and drops the function.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# LANGUAGE sql with a single SELECT of an immutable expression and no SET clause: inlined by the planner (a
# SQL-standard ``RETURN`` body would need PostgreSQL 14, which the embedded server has, but the classic body is
# inlined on every supported version alike). Not STRICT: a NULL id has no bucket, which the expression says anyway.
CANCEL_BUCKET = """CREATE FUNCTION cancel_bucket(p_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $fn$ SELECT hashtext(CAST(p_id AS text)) & 255 $fn$"""

FORMULA = "hashtext(CAST(i AS text)) & 255"


def _write_cancels_0023() -> str:
    """0023's ``write_cancels`` (0018's, gated; no later revision changed it)."""
    gated = context.script.get_revision("0023").module
    return str(gated._gated(gated._write_cancels_0018(), "0018's write_cancels"))


def _write_cancels_0026() -> str:
    function = _write_cancels_0023()
    if function.count(FORMULA) != 1:  # a silent no-op replace would keep a second copy of the formula
        raise RuntimeError(f"0026 expected exactly one {FORMULA!r} in 0023's write_cancels")
    return function.replace(FORMULA, "cancel_bucket(i)")


def upgrade() -> None:
    op.execute(CANCEL_BUCKET)
    op.execute(_write_cancels_0026())


def downgrade() -> None:
    op.execute(_write_cancels_0023())
    op.execute("DROP FUNCTION cancel_bucket(uuid)")
