"""``ops.compare``'s arithmetic: the figures it reads from an ``exchange bench --json`` report, and the medians and
ratios it prints."""

from __future__ import annotations

from typing import Any

from ops.compare import figures, summary


def _report(orders_per_s: float, post_p50: float | None, cpu: dict[str, float], orders: int) -> dict[str, Any]:
    return {
        "accepted_orders_per_s": orders_per_s,
        "endpoints": {"POST /orders": {"p50_ms": post_p50, "p99_ms": 2 * (post_p50 or 0)}},
        "order_to_fill": {"p50_ms": None},
        "server_stats": {
            "accepted_orders": orders,
            "cpu_s": cpu,
            "cpu_ms_per_order": round(1000 * sum(cpu.values()) / orders, 2),
        },
    }


def test_figures_reads_rates_latencies_and_cpu_per_order_by_process_kind() -> None:
    got = figures(_report(500.0, 10.0, {"api": 2.0, "matcher": 1.0}, orders=1000))
    assert got["orders/s"] == 500.0
    assert got["POST p50 ms"] == 10.0
    assert got["POST p99 ms"] == 20.0
    assert got["order->fill p50 ms"] == 0.0  # no fill timed: None in the report
    assert got["fill->webhook p50 ms"] == 0.0  # no receiver: no such section in the report
    assert got["CPU ms/order"] == 3.0
    assert got["  api ms/order"] == 2.0
    assert got["  matcher ms/order"] == 1.0


def test_figures_shows_postgres_shared_processes_apart_from_the_cpu_per_order() -> None:
    report = _report(500.0, 10.0, {"api": 2.0, "postgres": 1.0}, orders=1000)
    report["server_stats"]["shared_cpu_s"] = {"postgres-shared": 0.5}

    got = figures(report)

    assert got["  (postgres-shared ms/order)"] == 0.5
    assert got["CPU ms/order"] == 3.0


def test_figures_reads_the_server_counts_the_order_stages_and_the_webhooks_when_the_report_has_them() -> None:
    report = _report(500.0, 10.0, {"api": 2.0}, orders=1000)
    report["fill_to_webhook"] = {"p50_ms": 12.5, "p99_ms": 40.0}
    report["server_stats"] |= {"pg_transactions_per_order": 1.75, "redis_calls_per_order": 15.1}
    report["order_stages"] = {"to_accept": {"p50_ms": 9.7}, "accept_to_match": {"p50_ms": 16.4}}

    got = figures(report)

    assert (got["PG transactions/order"], got["Redis commands/order"]) == (1.75, 15.1)
    assert (got["stage to_accept p50 ms"], got["stage accept_to_match p50 ms"]) == (9.7, 16.4)
    assert "stage match_to_answer p50 ms" not in got
    assert got["fill->webhook p50 ms"] == 12.5
    assert "PG transactions/order" not in figures(_report(500.0, 10.0, {"api": 2.0}, orders=1000))


def test_figures_reads_the_run_queue_wait_and_the_times_on_a_cpu_when_the_kernel_kept_them() -> None:
    report = _report(500.0, 10.0, {"api": 2.0}, orders=1000)
    report["server_stats"] |= {"run_queue_wait_s": {"api": 0.5, "postgres": 0.25}, "run_queue_wait_ms_per_order": 0.75}
    report["server_stats"] |= {"times_on_cpu": {"api": 9000}, "times_on_cpu_per_order": 9.0}

    got = figures(report)

    assert got["CPU wait ms/order"] == 0.75
    assert got["put on a CPU /order"] == 9.0
    assert (got["  api wait ms/order"], got["  postgres wait ms/order"]) == (0.5, 0.25)
    report["server_stats"] |= {"run_queue_wait_s": None, "run_queue_wait_ms_per_order": None}
    report["server_stats"] |= {"times_on_cpu": None, "times_on_cpu_per_order": None}
    assert not any("wait" in name or "CPU /order" in name for name in figures(report))


def test_summary_prints_each_sides_median_and_the_ratio_of_the_medians() -> None:
    base = [figures(_report(r, 10.0, {"api": 1.0}, orders=1000)) for r in (400.0, 500.0, 900.0)]
    new = [figures(_report(r, 8.0, {"api": 0.9}, orders=1000)) for r in (450.0, 600.0, 550.0)]
    lines = summary({"base": base, "new": new})
    assert lines[0].startswith("median of 3 runs")
    rates = next(line for line in lines if line.startswith("orders/s")).split()
    assert rates[1:4] == ["500.000", "550.000", "1.100"]
    post = next(line for line in lines if line.startswith("POST p50 ms")).split()
    assert post[3:6] == ["10.000", "8.000", "0.800"]


def test_summary_counts_the_pairs_where_the_new_side_was_lower_and_higher() -> None:
    base = [
        figures(_report(r, p50, {"api": 1.0}, orders=1000)) for r, p50 in ((400.0, 10.0), (500.0, 10.0), (900.0, 7.0))
    ]
    new = [figures(_report(r, p50, {"api": 1.0}, orders=1000)) for r, p50 in ((450.0, 8.0), (600.0, 9.0), (550.0, 7.0))]
    lines = summary({"base": base, "new": new})
    assert lines[0].split()[-1] == "lower:higher"
    assert next(line for line in lines if line.startswith("orders/s")).split()[-1] == "1:2"
    assert next(line for line in lines if line.startswith("POST p50 ms")).split()[-1] == "2:0"  # one pair equal
    assert next(line for line in lines if line.startswith("  api ms/order")).split()[-1] == "0:0"


def test_figures_reads_the_machine_of_the_run_when_the_report_has_it() -> None:
    report = _report(500.0, 10.0, {"api": 2.0}, orders=1000)
    assert not any(name.startswith("machine") for name in figures(report))
    report["machine"] = {"cpus": 2, "wakeup_round_trip_us": 42.9, "chunk_ms": 18.1}
    got = figures(report)
    assert got["machine wake-up us"] == 42.9
    assert got["machine chunk ms"] == 18.1
