"""Composite foreign keys tie a trade's orders, a command's order and an attempt's event to the rows that name them.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07

Hand-written and frozen (see 0001). Three cross-row rules no api path breaks today, which the database did not
refuse (the last schema audit):

* a trade's buy and sell orders were tied to ``orders.id`` alone: a trade could name an order of another symbol, or
  a ``buy_broker_id`` / ``sell_broker_id`` other than its order's broker;
* a command (place, cancel, amend) for order X could name symbol S while X is on symbol T: the matcher of S would
  read a command for an order its book does not hold;
* a webhook attempt's ``broker_id`` (denormalised for the broker's delivery log) could differ from its event's.

Each single-column foreign key is replaced by a composite one under the same name, so a violation reports the
constraint it always did: ``fk_trades_buy_order_id_orders`` is ``(buy_order_id, symbol, buy_broker_id)`` →
``orders (id, symbol, broker_id)`` (and the sell side alike), ``fk_commands_order_id_orders`` is ``(order_id,
symbol)`` → ``orders (id, symbol)`` (an expire has no order: NULL, not checked, as before), and
``fk_webhook_attempts_event_id_webhook_events`` is ``(event_id, broker_id)`` → ``webhook_events (id, broker_id)``,
still ``ON DELETE CASCADE``. A composite key implies the single one it replaces (every column is NOT NULL on the
referencing side but ``commands.order_id``), so the old keys would only add a second probe per row. The trades'
``fk_trades_{buy,sell}_broker_id_brokers`` go too: the trade's broker is now its order's broker, which
``fk_orders_broker_id_brokers`` ties to ``brokers``, and a broker referenced by an order cannot be deleted; the
matcher's trade insert thus makes two index probes per trade instead of four.

A foreign key needs a unique index on exactly its referenced columns (in any order): ``uq_orders_symbol_broker_id_id``,
``uq_orders_symbol_id`` and ``uq_webhook_events_broker_id_id`` (no index there has those columns; commands carry no
broker id, so the two on ``orders`` cannot be one without a column added to the command log and back-filled). The
id comes last: led by it, the planner took the new indexes for the lookups by id alone that the primary key serves
(``matcher_write``'s and ``write_cancels``' probes of ``orders``, ``webhook_record``'s of ``webhook_events``: see
``tests/integration/test_query_plans.py``), which would keep three indexes in memory for one job. Led by the
symbol or the broker they can still be taken for such a lookup, as a scan of the whole index, by a plan made while
the table was empty: the webhook claim's lock of each candidate was (alembic 0022 names the broker there). The referencing
side's check names every column, so either index order serves it. None of these columns ever changes: the matcher's
HOT update of an order (pending -> open) stays HOT, and no update takes a key lock; each insert maintains the new
indexes (two for an order, one for an event), as does each update that is not HOT (an order closing, an event
delivered). Measured with ``ops/bench_schema_fk.py --rounds 4`` (PostgreSQL backend CPU, medians,
after / before; measured when this revision was numbered 0020):
``accept_orders`` 1.33 (about 49 -> 61 us per order: ~9 us the two indexes, ~3 us the composite check), the
matcher's fills 1.07 (two key checks per trade instead of four; its order closings and events write the new
indexes), ``write_cancels`` 1.24, ``webhook_record`` 1.15; 1.13 over the whole load.

Locks: an OUTAGE for as long as the upgrade runs. ``ADD CONSTRAINT … UNIQUE`` and ``DROP CONSTRAINT`` take ACCESS
EXCLUSIVE locks, and ``env.py`` runs every pending revision in ONE transaction (all or nothing), which keeps them
until its commit: ``brokers`` (whose trades keys go), ``orders``, ``commands``, ``trades``, ``webhook_events`` and
``webhook_attempts`` can be neither read nor written meanwhile (the final review read them in ``pg_locks``), so
every authenticated request, the matcher and the webhook workers wait. Measured on 100,000 orders (120,000
commands, 40,000 trades, 100,000 events and attempts): 1.0 s in all, 0.55 s of it the index builds and 0.45 s the
keys' checks; about 1 s per 100,000 orders. Shortening it would take steps outside env.py's transaction
(``CREATE UNIQUE INDEX CONCURRENTLY``, keys added ``NOT VALID`` and validated in a later transaction), which the
project's all-or-nothing upgrades rule out; ``ADD … NOT VALID`` then ``VALIDATE`` inside the one transaction
would shorten nothing. README (the processes table's migrations row) says to upgrade past it in a quiet moment.

Downgrading restores 0020's single-column keys (and the trades' broker keys) and drops the three indexes.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, name, definition) of the unique keys the foreign keys below reference.
UNIQUE_KEYS = [
    ("orders", "uq_orders_symbol_broker_id_id", "UNIQUE (symbol, broker_id, id)"),
    ("orders", "uq_orders_symbol_id", "UNIQUE (symbol, id)"),
    ("webhook_events", "uq_webhook_events_broker_id_id", "UNIQUE (broker_id, id)"),
]

# (table, name, this revision's definition, 0020's definition): each key replaced under its own name.
FOREIGN_KEYS = [
    (
        "trades",
        "fk_trades_buy_order_id_orders",
        "FOREIGN KEY (buy_order_id, symbol, buy_broker_id) REFERENCES orders (id, symbol, broker_id)",
        "FOREIGN KEY (buy_order_id) REFERENCES orders (id)",
    ),
    (
        "trades",
        "fk_trades_sell_order_id_orders",
        "FOREIGN KEY (sell_order_id, symbol, sell_broker_id) REFERENCES orders (id, symbol, broker_id)",
        "FOREIGN KEY (sell_order_id) REFERENCES orders (id)",
    ),
    (
        "commands",
        "fk_commands_order_id_orders",
        "FOREIGN KEY (order_id, symbol) REFERENCES orders (id, symbol)",
        "FOREIGN KEY (order_id) REFERENCES orders (id)",
    ),
    (
        "webhook_attempts",
        "fk_webhook_attempts_event_id_webhook_events",
        "FOREIGN KEY (event_id, broker_id) REFERENCES webhook_events (id, broker_id) ON DELETE CASCADE",
        "FOREIGN KEY (event_id) REFERENCES webhook_events (id) ON DELETE CASCADE",
    ),
]

# 0001's keys that the composite ones imply (see the docstring): dropped, restored by the downgrade.
IMPLIED_KEYS = [
    ("trades", "fk_trades_buy_broker_id_brokers", "FOREIGN KEY (buy_broker_id) REFERENCES brokers (id)"),
    ("trades", "fk_trades_sell_broker_id_brokers", "FOREIGN KEY (sell_broker_id) REFERENCES brokers (id)"),
]


def upgrade() -> None:
    for table, name, definition in UNIQUE_KEYS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    for table, name, definition, _ in FOREIGN_KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {definition}")
    for table, name, _ in IMPLIED_KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")


def downgrade() -> None:
    for table, name, definition in IMPLIED_KEYS:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    for table, name, _, definition in FOREIGN_KEYS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {definition}")
    for table, name, _ in reversed(UNIQUE_KEYS):
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
