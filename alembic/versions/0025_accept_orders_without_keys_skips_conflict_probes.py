"""``accept_orders`` inserts a group whose orders carry no client order id or idempotency key without ``ON CONFLICT``.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07

Hand-written and frozen (see 0001).

0011's insert is ``INSERT … ON CONFLICT DO NOTHING`` with no conflict target, so every unique index of ``orders``
is an arbiter: before each row PostgreSQL probes ``pk_orders``, ``uq_orders_symbol_id`` and
``uq_orders_symbol_broker_id_id`` (0021's keys) for a conflicting row (the two partial key indexes are skipped when
the row's key is NULL), inserts the row speculatively, inserts its index entries (each unique one checked again)
and then confirms the insertion with a WAL record of its own. Only the broker's ``client_order_id`` /
``idempotency_key`` can make a conflict the caller expects (``exchange.orders.accept``: a duplicate resolves to the
original order); an order carrying neither can only conflict on its uuid4 id, which the caller already treats as a
failure (``RuntimeError``), never as a duplicate. So a group none of whose orders carries a key is inserted by the
same statement without ``ON CONFLICT``: no arbiter probes, no speculative insertion. A uuid collision then fails
the statement with the primary key's unique violation (class 23: the caller retries the group one order per
transaction, and only that order fails, as before). A group with a key anywhere runs 0011's statement unchanged.
The test is a PL/pgSQL expression on the two arrays (no query is planned for it).

Measured at ``exchange bench --scale 50`` on a private PostgreSQL 15 (``pg_stat_statements.track = all``, perf): the
arbiter probes (``ExecCheckIndexConstraints``) were 1.5-1.8 % of PostgreSQL's CPU; the index scans of 0021's two
keys on ``orders`` (``uq_orders_symbol_broker_id_id``: one per accepted order, no other reader) go away.

Downgrading restores 0011's ``accept_orders`` exactly.
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RETURN_QUERY = "    RETURN QUERY\n"
ON_CONFLICT = "            ON CONFLICT DO NOTHING\n"
FUNCTION_END = "END\n$fn$"

# The arrays hold one entry per order; with no key in either, no row of the group can be a duplicate the caller
# resolves (array_remove of NULL from an all-NULL array leaves '{}').
WITHOUT_KEYS = (
    "    IF array_remove(p_client_order_ids, NULL) = '{}' AND array_remove(p_idempotency_keys, NULL) = '{}' THEN\n"
    "        -- No order carries a key: nothing to resolve as a duplicate, so no ON CONFLICT (no arbiter probes of\n"
    "        -- every unique index of orders, no speculative insertion: alembic 0025). A uuid collision fails.\n"
)
KEYED = "    END IF;\n    -- Some order carries a client order id or an idempotency key: a duplicate is skipped, read back.\n"


def _accept_orders_0011() -> str:
    """0011's ``accept_orders`` as ``CREATE OR REPLACE`` (no later revision changed it)."""
    text = str(context.script.get_revision("0011").module.ACCEPT_ORDERS)
    if text.count("CREATE FUNCTION") != 1:
        raise RuntimeError("0025 expected exactly one CREATE FUNCTION in 0011's accept_orders")
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _accept_orders_0025() -> str:
    function = _accept_orders_0011()
    for part in (RETURN_QUERY, ON_CONFLICT, FUNCTION_END):
        if function.count(part) != 1:  # a silent no-op replace would leave 0011's statement alone
            raise RuntimeError(f"0025 expected exactly one {part.strip()!r} in 0011's accept_orders")
    start = function.index(RETURN_QUERY)
    end = function.index(FUNCTION_END)
    statement = function[start:end]
    plain = statement.replace(ON_CONFLICT, "")
    indented = "".join(f"    {line}" if line.strip() else line for line in plain.splitlines(keepends=True))
    return function[:start] + WITHOUT_KEYS + indented + "        RETURN;\n" + KEYED + statement + function[end:]


def upgrade() -> None:
    op.execute(_accept_orders_0025())


def downgrade() -> None:
    op.execute(_accept_orders_0011())
