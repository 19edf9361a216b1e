"""``webhook_record`` returns the events whose failed attempt it set aside: the worker reports them ``superseded``.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07

Hand-written and frozen (see 0001). Since 0017 a failed attempt (``retry``, ``gone``, ``exhausted``) schedules its
event's retry or fails it only while the event is still pending in the attempt's ``attempts`` and ``generation``:
a redeliver since the claim (new generation), a newer claim after the lease ran out (new attempts), or another
attempt that already ended the event decides what happens to it next. The record knew which attempts its fence
set aside; the worker did not, and reported such an attempt as ``failed`` (or as a ``retry`` it never scheduled)
in its log line and its metrics. Now ``webhook_record`` returns those events' ids (each event is at most once in a
batch): every batch row whose kind is not ``delivered`` and which neither the retry nor the failure update
changed. A delivery is not fenced (a 2xx answer delivered the event), so it is never returned. The statement is
0017's otherwise: the brokers' update moves into a CTE (a data-modifying CTE runs to completion whether or not it
is read) and the statement's result is that set.

A function's result type cannot be replaced (``void`` -> ``SETOF uuid``), so it is dropped and created again, in the
migration's transaction (a record running meanwhile sees the old function until the commit). A worker older than
this revision calls it as ``SELECT webhook_record(...)`` and ignores the rows; a worker of this revision needs it
(upgrade the database first, as always). Downgrading restores 0017's function.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RECORD_SIGNATURE = "webhook_record(jsonb, integer)"

# (0017's text, this revision's).
CHANGES = [
    ("RETURNS void\n", "RETURNS SETOF uuid\n"),
    ("BEGIN\n        WITH async_commit", "BEGIN\n        RETURN QUERY WITH async_commit"),
    (
        "AND e.attempts = o.attempt AND e.generation = COALESCE(o.generation, e.generation)\n        ),\n"
        "        failed AS (",
        "AND e.attempts = o.attempt AND e.generation = COALESCE(o.generation, e.generation)\n"
        "            RETURNING e.id\n        ),\n        failed AS (",
    ),
    ("        )\n        UPDATE brokers AS b\n", "        ),\n        judged AS (\n        UPDATE brokers AS b\n"),
    (
        "OR (t.gone AND b.webhook_enabled));\nEND",
        "OR (t.gone AND b.webhook_enabled))\n        )\n"
        "        -- The failed attempts the fence set aside: their events are the redeliver's or a newer attempt's.\n"
        "        SELECT o.id FROM o\n"
        "        WHERE o.kind <> 'delivered'\n"
        "          AND NOT EXISTS (SELECT FROM retried AS r WHERE r.id = o.id)\n"
        "          AND NOT EXISTS (SELECT FROM failed AS f WHERE f.id = o.id);\nEND",
    ),
]


def _webhook_record_0017() -> str:
    """0017's ``webhook_record``: 0008's text with 0015's and 0017's changes, as 0017's upgrade builds it."""
    function = str(context.script.get_revision("0008").module.WEBHOOK_RECORD)
    function = _changed(function, list(context.script.get_revision("0015").module.CHANGES), "0008's webhook_record")
    return _changed(function, list(context.script.get_revision("0017").module.RECORD_CHANGES), "0015's webhook_record")


def _changed(function: str, changes: list[tuple[str, str]], name: str) -> str:
    for old, new in changes:
        if function.count(old) != 1:  # a silent no-op replace would leave the previous rule in place
            raise RuntimeError(f"0020 expected exactly one {old!r} in {name}")
        function = function.replace(old, new)
    return function


def upgrade() -> None:
    op.execute(f"DROP FUNCTION {RECORD_SIGNATURE}")
    op.execute(_changed(_webhook_record_0017(), CHANGES, "0017's webhook_record"))


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {RECORD_SIGNATURE}")
    op.execute(_webhook_record_0017())
