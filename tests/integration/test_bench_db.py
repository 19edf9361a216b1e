"""``ops.bench_db`` at its small sizes, on the test server: every scenario of the database audit runs, and each
plan reads the index its migration added. No timing assertions (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exchange.db import migrate
from ops import bench_db

SCENARIOS = [
    "cancel_all",
    "write_cancels",
    "cancel_behind_cancel_all",
    "replay_original",
    "sweeper_expiries",
    "webhook_claim_hanging_receiver",
    "webhook_claim_long_history",
    "sweeper_overdue_hint",
    "sweeper_overdue_no_hint",
    "sweeper_overdue_none_overdue",
    "list_orders_open",
    "list_orders_pending",
    "webhooks_endpoint",
    "admin_webhooks_failing",
    "kept_pending_from_empty",
    "kept_claim_from_first_events",
]


def _run(admin_url: str, out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    code = bench_db.main(["--sizes", "small", "--json", str(out), "--database-url", admin_url, *args])
    return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def small(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """One run of the tool at its small sizes: its exit status and its JSON report."""
    return _run(postgres_admin_url, tmp_path_factory.mktemp("bench_db") / "small.json")


def _failed(scenario: dict[str, Any]) -> set[str]:
    return {name for name, ok in scenario["checks"].items() if not ok}


def test_every_scenario_runs_and_its_plan_reads_the_index_its_migration_added(
    small: tuple[int, dict[str, Any]],
) -> None:
    code, report = small
    assert report["revision"] == migrate.head()
    assert [s["name"] for s in report["scenarios"]] == SCENARIOS
    for scenario in report["scenarios"]:
        name = scenario["name"]
        assert scenario["runs"] >= 2, name
        assert 0 < scenario["median_ms"] <= scenario["max_ms"], name
        assert scenario["plans"], name
        assert scenario["checks"], name
        assert all(f"reads {index}" in " ".join(scenario["checks"]) for index in scenario["indexes"]), name
        assert not _failed(scenario), (name, _failed(scenario), scenario["plans"][-1])
    assert code == (0 if report["plans_ok"] else 1)


def test_the_other_brokers_cancel_waits_behind_a_cancel_all_holding_its_lock(
    small: tuple[int, dict[str, Any]],
) -> None:
    # The lone order's cancel bucket is one of the cancel-all's: what is timed is a real wait, never a free pass.
    [behind] = [s for s in small[1]["scenarios"] if s["name"] == "cancel_behind_cancel_all"]
    assert behind["extra"]["shares_a_bucket"]
    assert len(behind["extra"]["cancel_all_ms"]) == behind["runs"]
    # Sent once a chunk held the lone order's bucket lock (a chunk may end between the watch and the send: at least
    # one run must have caught it).
    assert any(behind["extra"]["sent_while_held"])


def test_the_cancel_all_is_timed_as_its_read_and_every_chunk(small: tuple[int, dict[str, Any]]) -> None:
    [cancel_all] = [s for s in small[1]["scenarios"] if s["name"] == "cancel_all"]
    assert cancel_all["extra"]["chunks"] == -(-1_000 // bench_db.accept.CANCEL_ALL_CHUNK)
    assert len(cancel_all["extra"]["read_ms"]) == cancel_all["runs"]
    reads_and_totals = zip(cancel_all["extra"]["read_ms"], cancel_all["times_ms"], strict=True)
    assert all(0 < read < total for read, total in reads_and_totals)


def test_the_claims_plan_reads_each_brokers_due_events_as_a_range_of_the_pending_index(
    small: tuple[int, dict[str, Any]],
) -> None:
    # 0019's reading went through uq_webhook_events_broker_id_sequence: every event of the broker, delivered ones
    # included, per claim (alembic 0022).
    claims = [s for s in small[1]["scenarios"] if s["name"].startswith("webhook_claim_")]
    assert len(claims) == 2
    for claim in claims:
        assert not _failed(claim), (claim["name"], claim["plans"][-1])
        assert claim["extra"]["most_rows_read"] <= 4 * bench_db.CLAIM_LIMIT, claim["name"]


def test_the_checks_fail_on_a_schema_without_the_indexes_0019_added(postgres_admin_url: str, tmp_path: Path) -> None:
    # At 0018 the listing and the endpoint's counts have no partial index to read: their checks must say so (and
    # the tool exit 1), or a check that passes proves nothing.
    code, report = _run(
        postgres_admin_url, tmp_path / "0018.json", "--revision", "0018", "--only", "listing", "endpoints"
    )
    assert report["revision"] == "0018"
    failed = {s["name"]: _failed(s) for s in report["scenarios"]}
    missing = {
        "list_orders_open": {"reads ix_orders_broker_live_created"},
        "list_orders_pending": {"reads ix_orders_broker_live_created"},
        "webhooks_endpoint": {f"reads {bench_db.CLAIM_INDEX}", "reads ix_webhook_events_failed_broker"},
        "admin_webhooks_failing": {"reads ix_webhook_events_failed_broker", "reads ix_webhook_events_retrying_broker"},
    }
    assert set(failed) == set(missing)
    assert all(missing[name] <= failed[name] for name in missing), failed
    assert code == 1


def test_the_claims_checks_fail_on_0021s_per_broker_reading(postgres_admin_url: str, tmp_path: Path) -> None:
    # 0021's claim (0019's reading) read the long-history broker's every event through
    # uq_webhook_events_broker_id_sequence: the checks must say so, or their passing at head proves nothing.
    code, report = _run(postgres_admin_url, tmp_path / "0021.json", "--revision", "0021", "--only", "claim")
    assert report["revision"] == "0021"
    [long_history] = [s for s in report["scenarios"] if s["name"] == "webhook_claim_long_history"]
    assert long_history["extra"]["most_rows_read"] > 4 * bench_db.CLAIM_LIMIT
    assert f"reads {bench_db.CLAIM_INDEX}" in _failed(long_history)
    assert code == 1


def test_the_kept_plans_checks_fail_on_0023s_matcher_pending_and_claim_lock(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    # At 0023 matcher_pending's read, first planned before any command, read pk_orders whole per command, and the
    # per-broker claim planned on 200 brokers' first events locked each event through its broker's history (alembic
    # 0024): the checks must say so, or their passing at head proves nothing.
    code, report = _run(postgres_admin_url, tmp_path / "0023.json", "--revision", "0023", "--only", "kept_plans")
    assert report["revision"] == "0023"
    failed = {s["name"]: _failed(s) for s in report["scenarios"]}
    assert failed == {
        "kept_pending_from_empty": {"reads pk_orders", "reads each command's order alone"},
        "kept_claim_from_first_events": {f"no scan reads more than {4 * bench_db.CLAIM_LIMIT} rows a loop"},
    }
    assert code == 1
