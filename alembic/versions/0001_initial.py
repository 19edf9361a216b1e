"""Initial schema: brokers, symbols, orders, the command log, trades, positions and the webhook outbox.

Revision ID: 0001
Revises:
Create Date: 2025-11-22

Hand-written and frozen: everything is spelled out (names, enum values) instead of imported from
exchange.db.tables or exchange.engine, so this file creates the same schema forever. Names are wrapped in
op.f() ("final"): the naming convention of the current metadata must never rewrite them. The current model lives in
exchange/db/tables.py; tests/integration/test_migrations.py checks the two agree.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")
TIMESTAMPTZ = TIMESTAMP(timezone=True)


def _id() -> sa.Column:
    return sa.Column("id", UUID(as_uuid=True), server_default=sa.text("gen_random_uuid()"), nullable=False)


def upgrade() -> None:
    op.execute("CREATE SEQUENCE command_seq")

    op.create_table(
        "brokers",
        _id(),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("api_key_hash", sa.Text(), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("webhook_secret_previous", sa.Text(), nullable=True),
        sa.Column("webhook_secret_previous_expires_at", TIMESTAMPTZ, nullable=True),
        sa.Column("webhook_enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("webhook_disabled_reason", sa.Text(), nullable=True),
        sa.Column("webhook_consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("balance", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("event_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_brokers")),
        sa.UniqueConstraint("api_key_hash", name=op.f("uq_brokers_api_key_hash")),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 100", name=op.f("ck_brokers_name_length")),
        sa.CheckConstraint("api_key_hash ~ '^[0-9a-f]{64}$'", name=op.f("ck_brokers_api_key_hash_sha256_hex")),
        sa.CheckConstraint("webhook_secret ~ '^whsec_.+'", name=op.f("ck_brokers_webhook_secret_format")),
        sa.CheckConstraint(
            "webhook_secret_previous IS NULL OR webhook_secret_previous ~ '^whsec_.+'",
            name=op.f("ck_brokers_webhook_secret_previous_format"),
        ),
        sa.CheckConstraint(
            "(webhook_secret_previous IS NULL) = (webhook_secret_previous_expires_at IS NULL)",
            name=op.f("ck_brokers_webhook_secret_previous_expiry"),
        ),
        sa.CheckConstraint("webhook_consecutive_failures >= 0", name=op.f("ck_brokers_webhook_failures_non_negative")),
        sa.CheckConstraint("event_seq >= 0", name=op.f("ck_brokers_event_seq_non_negative")),
    )

    op.create_table(
        "symbols",
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("book_version", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_price", sa.BigInteger(), nullable=True),
        sa.Column("last_trade_at", TIMESTAMPTZ, nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("symbol", name=op.f("pk_symbols")),
        sa.CheckConstraint(
            "char_length(symbol) BETWEEN 1 AND 10 AND symbol = upper(symbol)", name=op.f("ck_symbols_symbol_format")
        ),
        sa.CheckConstraint("book_version >= 0", name=op.f("ck_symbols_book_version_non_negative")),
        sa.CheckConstraint("last_price > 0", name=op.f("ck_symbols_last_price_positive")),
    )

    op.create_table(
        "orders",
        _id(),
        sa.Column("broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("client_order_id", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("document_number", sa.Text(), nullable=False),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("side", sa.Text(), nullable=False),
        sa.Column("order_type", sa.Text(), nullable=False),
        sa.Column("time_in_force", sa.Text(), nullable=False),
        sa.Column("stp", sa.Text(), server_default=sa.text("'none'"), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=True),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.Column("valid_until", TIMESTAMPTZ, nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.Column("updated_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.ForeignKeyConstraint(["broker_id"], ["brokers.id"], name=op.f("fk_orders_broker_id_brokers")),
        sa.UniqueConstraint("broker_id", "client_order_id", name=op.f("uq_orders_broker_id_client_order_id")),
        sa.UniqueConstraint("broker_id", "idempotency_key", name=op.f("uq_orders_broker_id_idempotency_key")),
        sa.CheckConstraint(
            "char_length(client_order_id) BETWEEN 1 AND 255", name=op.f("ck_orders_client_order_id_length")
        ),
        sa.CheckConstraint(
            "char_length(idempotency_key) BETWEEN 1 AND 255", name=op.f("ck_orders_idempotency_key_length")
        ),
        sa.CheckConstraint(
            "char_length(document_number) BETWEEN 1 AND 20", name=op.f("ck_orders_document_number_length")
        ),
        sa.CheckConstraint(
            "char_length(symbol) BETWEEN 1 AND 10 AND symbol = upper(symbol)", name=op.f("ck_orders_symbol_format")
        ),
        sa.CheckConstraint("side IN ('bid', 'ask')", name=op.f("ck_orders_side")),
        sa.CheckConstraint("order_type IN ('limit', 'market')", name=op.f("ck_orders_order_type")),
        sa.CheckConstraint("time_in_force IN ('gtc', 'gtd', 'ioc', 'fok')", name=op.f("ck_orders_time_in_force")),
        sa.CheckConstraint(
            "stp IN ('none', 'cancel_newest', 'cancel_oldest', 'cancel_both', 'decrement')",
            name=op.f("ck_orders_stp"),
        ),
        sa.CheckConstraint("status IN ('pending', 'open', 'closed')", name=op.f("ck_orders_status")),
        sa.CheckConstraint(
            "close_reason IN ('filled', 'cancelled', 'expired', 'unfilled', 'self_trade_prevented', 'rejected')",
            name=op.f("ck_orders_close_reason"),
        ),
        sa.CheckConstraint("price > 0", name=op.f("ck_orders_price_positive")),
        sa.CheckConstraint(
            "(order_type = 'limit' AND price IS NOT NULL) OR (order_type = 'market' AND price IS NULL)",
            name=op.f("ck_orders_price_matches_order_type"),
        ),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_orders_quantity_positive")),
        sa.CheckConstraint(
            "remaining >= 0 AND remaining <= quantity", name=op.f("ck_orders_remaining_within_quantity")
        ),
        sa.CheckConstraint(
            "(status = 'closed') = (close_reason IS NOT NULL)", name=op.f("ck_orders_closed_has_reason")
        ),
        sa.CheckConstraint(
            "status <> 'open' OR (remaining > 0 AND priority IS NOT NULL)", name=op.f("ck_orders_open_is_restable")
        ),
        sa.CheckConstraint(
            "close_reason IS DISTINCT FROM 'filled' OR remaining = 0", name=op.f("ck_orders_filled_has_no_remaining")
        ),
    )
    op.create_index(
        op.f("ix_orders_open_book"),
        "orders",
        ["symbol", "side", "price", "priority"],
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_index(op.f("ix_orders_broker_created"), "orders", ["broker_id", sa.text("created_at DESC"), "id"])
    op.create_index(
        op.f("ix_orders_open_valid_until"),
        "orders",
        ["valid_until"],
        postgresql_where=sa.text("status = 'open' AND valid_until IS NOT NULL"),
    )

    op.create_table(
        "commands",
        sa.Column("seq", sa.BigInteger(), server_default=sa.text("nextval('command_seq')"), nullable=False),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("order_id", UUID(as_uuid=True), nullable=True),
        sa.Column("payload", JSONB(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.Column("processed_at", TIMESTAMPTZ, nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_commands")),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("fk_commands_order_id_orders")),
        sa.CheckConstraint("kind IN ('place', 'cancel', 'amend', 'expire')", name=op.f("ck_commands_kind")),
        sa.CheckConstraint("kind = 'expire' OR order_id IS NOT NULL", name=op.f("ck_commands_order_id_required")),
        sa.CheckConstraint("kind <> 'amend' OR payload IS NOT NULL", name=op.f("ck_commands_amend_has_payload")),
    )
    op.create_index(
        op.f("ix_commands_unprocessed_symbol_seq"),
        "commands",
        ["symbol", "seq"],
        postgresql_where=sa.text("processed_at IS NULL"),
    )
    op.create_index(
        op.f("ix_commands_unprocessed_created_at"),
        "commands",
        ["created_at"],
        postgresql_where=sa.text("processed_at IS NULL"),
    )

    op.create_table(
        "trades",
        _id(),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("buy_order_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sell_order_id", UUID(as_uuid=True), nullable=False),
        sa.Column("buy_broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sell_broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("maker_order_id", UUID(as_uuid=True), nullable=False),
        sa.Column("taker_side", sa.Text(), nullable=False),
        sa.Column("command_seq", sa.BigInteger(), nullable=False),
        sa.Column("match_no", sa.Integer(), nullable=False),
        sa.Column("executed_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trades")),
        sa.ForeignKeyConstraint(["buy_order_id"], ["orders.id"], name=op.f("fk_trades_buy_order_id_orders")),
        sa.ForeignKeyConstraint(["sell_order_id"], ["orders.id"], name=op.f("fk_trades_sell_order_id_orders")),
        sa.ForeignKeyConstraint(["buy_broker_id"], ["brokers.id"], name=op.f("fk_trades_buy_broker_id_brokers")),
        sa.ForeignKeyConstraint(["sell_broker_id"], ["brokers.id"], name=op.f("fk_trades_sell_broker_id_brokers")),
        sa.UniqueConstraint("command_seq", "match_no", name=op.f("uq_trades_command_seq_match_no")),
        sa.CheckConstraint("price > 0", name=op.f("ck_trades_price_positive")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_trades_quantity_positive")),
        sa.CheckConstraint("match_no >= 0", name=op.f("ck_trades_match_no_non_negative")),
        sa.CheckConstraint("taker_side IN ('bid', 'ask')", name=op.f("ck_trades_taker_side")),
        sa.CheckConstraint("buy_order_id <> sell_order_id", name=op.f("ck_trades_distinct_orders")),
        sa.CheckConstraint("maker_order_id IN (buy_order_id, sell_order_id)", name=op.f("ck_trades_maker_is_a_side")),
    )
    op.create_index(op.f("ix_trades_symbol_executed_at"), "trades", ["symbol", sa.text("executed_at DESC")])
    op.create_index(op.f("ix_trades_buy_order_id"), "trades", ["buy_order_id"])
    op.create_index(op.f("ix_trades_sell_order_id"), "trades", ["sell_order_id"])

    op.create_table(
        "positions",
        sa.Column("broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("symbol", sa.Text(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("broker_id", "symbol", name=op.f("pk_positions")),
        sa.ForeignKeyConstraint(["broker_id"], ["brokers.id"], name=op.f("fk_positions_broker_id_brokers")),
    )

    op.create_table(
        "webhook_events",
        _id(),
        sa.Column("broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("order_id", UUID(as_uuid=True), nullable=True),
        sa.Column("trade_id", UUID(as_uuid=True), nullable=True),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.Column("delivered_at", TIMESTAMPTZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.ForeignKeyConstraint(["broker_id"], ["brokers.id"], name=op.f("fk_webhook_events_broker_id_brokers")),
        sa.UniqueConstraint("broker_id", "sequence", name=op.f("uq_webhook_events_broker_id_sequence")),
        sa.CheckConstraint("sequence > 0", name=op.f("ck_webhook_events_sequence_positive")),
        sa.CheckConstraint("char_length(type) BETWEEN 1 AND 100", name=op.f("ck_webhook_events_type_length")),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f("ck_webhook_events_status")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_events_attempts_non_negative")),
        sa.CheckConstraint(
            "(status = 'delivered') = (delivered_at IS NOT NULL)", name=op.f("ck_webhook_events_delivered_has_time")
        ),
    )
    op.create_index(
        op.f("ix_webhook_events_pending_next_attempt_at"),
        "webhook_events",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )

    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("event_id", UUID(as_uuid=True), nullable=False),
        sa.Column("broker_id", UUID(as_uuid=True), nullable=False),
        sa.Column("attempted_at", TIMESTAMPTZ, server_default=NOW, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_excerpt", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_events.id"],
            name=op.f("fk_webhook_attempts_event_id_webhook_events"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("status_code BETWEEN 100 AND 599", name=op.f("ck_webhook_attempts_status_code_range")),
        sa.CheckConstraint("latency_ms >= 0", name=op.f("ck_webhook_attempts_latency_non_negative")),
    )
    op.create_index(
        op.f("ix_webhook_attempts_broker_attempted_at"), "webhook_attempts", ["broker_id", sa.text("attempted_at DESC")]
    )
    op.create_index(op.f("ix_webhook_attempts_event_id"), "webhook_attempts", ["event_id"])


def downgrade() -> None:
    # Reverse dependency order; dropping a table drops its indexes and constraints with it.
    for table in (
        "webhook_attempts",
        "webhook_events",
        "positions",
        "trades",
        "commands",
        "orders",
        "symbols",
        "brokers",
    ):
        op.drop_table(table)
    op.execute("DROP SEQUENCE command_seq")
