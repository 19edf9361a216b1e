"""Statistics over the workers' and the receiver's raw samples; the JSON document and the printed summary."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ops.bench import model as m
from ops.bench.receiver import ReceiverResult
from ops.bench.runner import TOLERATED, WorkerResult

MAX_LAG_P99_MS = 5.0
KIND_OF = {v: k for k, v in m.KIND_ENDPOINT.items()}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values: list[float]) -> dict[str, Any]:
    s = sorted(values)
    if not s:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "count": len(s),
        "p50_ms": round(percentile(s, 50), 3),
        "p95_ms": round(percentile(s, 95), 3),
        "p99_ms": round(percentile(s, 99), 3),
        "max_ms": round(s[-1], 3),
        "mean_ms": round(sum(s) / len(s), 3),
    }


def _is_error(endpoint: str, status: str) -> bool:
    if not status.isdigit():
        return True
    code = int(status)
    return not (200 <= code < 300 or code in TOLERATED.get(KIND_OF.get(endpoint, -1), ()))


def build_report(
    *,
    mode: str,
    config: dict[str, Any],
    model: m.Model,
    scheduled: dict[str, int],
    duration_s: float,
    results: list[WorkerResult],
    receiver: ReceiverResult | None,
    setup: dict[str, Any],
    fills_made: dict[str, str] | None = None,
    fills_error: str | None = None,
) -> dict[str, Any]:
    """``duration_s``: the scheduled send span; every rate is what was answered without error over it (a late
    answer counts, the time it took shows as ``drain_tail_s``). ``fills_made``: ``event_id -> order_id`` of the
    fills the exchange made in the run (:mod:`ops.bench.fills`), compared with the fill webhooks received;
    ``fills_error``: why they could not be read."""
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    lags: list[float] = []
    fills: list[float] = []
    order_states: dict[str, int] = defaultdict(int)
    skipped: dict[str, int] = defaultdict(int)
    accepted = 0
    peak_connections = 0
    waited = 0
    waited_for_order = 0
    for r in results:
        for ep, values in r.latencies_ms.items():
            latencies[ep].extend(values)
        for ep, counts in r.statuses.items():
            for status, n in counts.items():
                statuses[ep][status] += n
        lags.extend(r.lags_ms)
        fills.extend(r.order_to_fill_ms)
        for state, n in r.order_states.items():
            order_states[state] += n
        for ep, n in r.skipped.items():
            skipped[ep] += n
        accepted += r.orders_accepted
        peak_connections += r.peak_connections
        waited += r.waited_for_connection
        waited_for_order += r.waited_for_order
    # Rates are over the send span: dividing by the time until the last answer would let one straggler (a request
    # answered or given up at the timeout) cut every rate by up to timeout / (duration + timeout). An overloaded
    # server is not credited the offered rate all the same: what it failed or never answered is not counted, and how
    # long the last answers took after the last send is its own figure.
    span = max(duration_s, 1e-9)
    drain_tail_s = max(0.0, max((r.elapsed_s for r in results), default=duration_s) - duration_s)

    endpoints: dict[str, Any] = {}
    errors_by_status: dict[str, int] = defaultdict(int)
    errors_by_endpoint: dict[str, dict[str, int]] = {}
    for ep in sorted(set(statuses) | set(latencies)):
        counts = statuses.get(ep, {})
        sent = sum(counts.values())
        errs = {s: n for s, n in counts.items() if _is_error(ep, s)}
        for s, n in errs.items():
            errors_by_status[s] += n
        if errs:
            errors_by_endpoint[ep] = errs
        n_errors = sum(errs.values())
        endpoints[ep] = {
            **summarize(latencies.get(ep, [])),
            "completed": sent,
            "answered_ok": sent - n_errors,
            "per_s": round((sent - n_errors) / span, 2),
            "errors": n_errors,
            "statuses": dict(sorted(counts.items())),
        }
    total_requests = sum(sum(c.values()) for c in statuses.values())
    errors_total = sum(errors_by_status.values())
    answered_ok = total_requests - errors_total

    lag = summarize(lags)
    valid = True
    reasons: list[str] = []
    if mode == "open_loop":
        if lag["p99_ms"] is not None and lag["p99_ms"] > MAX_LAG_P99_MS:
            valid = False
            reasons.append(f"generator schedule lag p99 {lag['p99_ms']:.2f} ms > {MAX_LAG_P99_MS} ms")
        done = total_requests + sum(skipped.values())
        planned = sum(scheduled.values())
        if planned and done < planned:
            valid = False
            reasons.append(f"only {done} of {planned} scheduled requests completed")
        if skipped:
            # A cancel of an order that failed or was never answered (a cancel of one not answered yet waits for its
            # answer) or a status read for a broker with no answered order is not sent: the load offered was less
            # than the schedule's.
            valid = False
            reasons.append(
                f"{sum(skipped.values())} scheduled requests not sent (their order failed or was never answered): "
                + ", ".join(f"{ep} {n}" for ep, n in sorted(skipped.items()))
            )

    report: dict[str, Any] = {
        "mode": mode,
        "valid": valid,
        "invalid_reasons": reasons,
        "generator_priority": sorted({r.priority for r in results if r.priority}),
        "config": config,
        "model": {
            "scale_percent": model.scale,
            "symbols": len(model.symbols),
            "brokers": model.brokers,
            "orders_per_s": round(model.orders_per_s, 2),
            "cancels_per_s_nominal": round(model.cancels_per_s, 2),
            "reads_per_s": round(model.reads_per_s, 2),
        },
        "duration_s": round(duration_s, 3),
        "drain_tail_s": round(drain_tail_s, 3),
        "accepted_orders": accepted,
        "accepted_orders_per_s": round(accepted / span, 2),
        "requests_per_s": round(answered_ok / span, 2),
        "scheduled": {ep: {"count": n, "per_s": round(n / duration_s, 2)} for ep, n in sorted(scheduled.items())},
        "achieved_per_s": {ep: v["per_s"] for ep, v in endpoints.items()},
        "endpoints": endpoints,
        "errors": {"total": errors_total, "by_status": dict(errors_by_status), "by_endpoint": errors_by_endpoint},
        "schedule_lag": lag if mode == "open_loop" else None,
        "order_to_fill_in_201": {
            **summarize(fills),
            "note": "scheduled send -> 201 response, for orders whose 201 already carried a fill",
        },
        "order_states_in_201": dict(order_states),
        "skipped": dict(skipped),
        "connections": {"peak_open": peak_connections, "requests_that_waited_for_one": waited},
        "cancels_that_waited_for_their_order": waited_for_order,
        "generator_cpu_s": {
            "senders": round(sum(r.cpu_s for r in results), 3),
            **({"receiver": round(receiver.cpu_s, 3)} if receiver is not None else {}),
        },
        "setup": setup,
    }
    if receiver is not None:
        arriving = receiver.last_at - receiver.first_at
        report["webhooks"] = {
            "received": receiver.received,
            "by_event": receiver.by_event,
            "timed": len(receiver.fill_to_webhook_ms),
            "per_s_while_arriving": round(len(receiver.fill_to_webhook_ms) / arriving, 2) if arriving > 0 else None,
            "bad_requests": receiver.bad_requests,
        }
        report["fill_to_webhook"] = {
            **summarize(receiver.fill_to_webhook_ms),
            "note": "body executed_at -> receipt (wall clocks of the same machine)",
        }
        missing_orders: set[str] = set()
        if fills_made is not None:
            missing = {eid: oid for eid, oid in fills_made.items() if eid not in receiver.fill_event_ids}
            missing_orders = set(missing.values())
            report["webhooks"]["fills_made"] = len(fills_made)
            report["webhooks"]["fills_without_webhook"] = len(missing)
            if missing:
                # Their webhooks came after the grace period, or never: fill -> webhook and order -> fill are timed
                # over the ones that came, which leaves the slowest out.
                valid = False
                reasons.append(
                    f"{len(missing)} of {len(fills_made)} fills had no webhook by the end of the grace period"
                )
        elif fills_error is not None:
            # Not checked, and said so (on the webhooks line), rather than INVALID: a peer exposing only the seed's
            # API has no GET /events, and its runs would all be invalid for a check it cannot offer.
            report["webhooks"]["fills_made"] = None
            report["webhooks"]["fills_without_webhook"] = None
            report["webhooks"]["fills_check_error"] = fills_error
        market_orders = [(oid, sent) for r in results for oid, sent in r.market_orders]
        filled = [
            (receiver.first_fill_at[oid] - sent) * 1000.0
            for oid, sent in market_orders
            if oid in receiver.first_fill_at
        ]
        unfilled = [oid for oid, _ in market_orders if oid not in receiver.first_fill_at]
        webhook_missing = sum(1 for oid in unfilled if oid in missing_orders)
        report["order_to_fill"] = {
            **summarize(filled),
            "orders": len(market_orders),
            "not_filled": len(unfilled),
            "not_filled_no_fill": None if fills_made is None else len(unfilled) - webhook_missing,
            "not_filled_webhook_missing": None if fills_made is None else webhook_missing,
            "note": "scheduled send -> the order's first fill (executed_at of its first trade_executed webhook), for "
            "every accepted market order (one never rests: its first fill is its arrival's), whatever its 201 said; "
            "not_filled splits into no_fill (the exchange made none: no liquidity) and webhook_missing (it made one, "
            "its webhook did not come)",
        }
    report["valid"] = valid
    return report


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    valid = "VALID" if report["valid"] else "INVALID: " + "; ".join(report["invalid_reasons"])
    mdl = report["model"]
    lines.append(
        f"exchange bench — {report['mode']} — scale {mdl['scale_percent']}% ({mdl['symbols']} symbols, "
        f"{mdl['brokers']} brokers) — {report['duration_s']:.1f} s (+ {report.get('drain_tail_s', 0.0):.1f} s "
        f"to the last answer) — {valid}"
    )
    lines.append(
        f"accepted orders/s {report['accepted_orders_per_s']:.1f} · requests/s {report['requests_per_s']:.1f} · "
        f"errors {report['errors']['total']} {report['errors']['by_status'] or ''}"
    )
    header = f"{'endpoint':28} {'sched/s':>8} {'done/s':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'err':>6}"
    lines.append(header)
    for ep, v in report["endpoints"].items():
        sched = report["scheduled"].get(ep, {}).get("per_s")
        lines.append(
            f"{ep:28} {_fmt(sched):>8} {_fmt(v['per_s']):>8} {_fmt(v['p50_ms']):>8} {_fmt(v['p95_ms']):>8} "
            f"{_fmt(v['p99_ms']):>8} {_fmt(v['max_ms']):>8} {v['errors']:>6}"
        )
    for name in ("order_to_fill", "order_to_fill_in_201", "fill_to_webhook", "schedule_lag"):
        s = report.get(name)
        if s:
            lines.append(
                f"{name:28} n={s['count']:<8} p50 {_fmt(s['p50_ms'])} · p95 {_fmt(s['p95_ms'])} · "
                f"p99 {_fmt(s['p99_ms'])} · max {_fmt(s['max_ms'])} ms"
            )
    if "machine" in report:
        mc = report["machine"]
        lines.append(
            f"machine: {mc['cpus']} CPUs · wake-up round trip {mc['wakeup_round_trip_us']} µs · "
            f"300,000 additions {mc['chunk_ms']} ms (ops.cpu_steadiness)"
        )
    if report.get("generator_cpu_s"):
        gen = report["generator_cpu_s"]
        parts = " + ".join(f"{kind} {seconds:.2f}" for kind, seconds in gen.items())
        share = sum(gen.values()) / report["duration_s"] if report["duration_s"] else 0.0
        lines.append(
            f"generator CPU: {parts} s for the run's requests and webhooks (warm-up and drain included), "
            f"{share:.2f} of a CPU per second of the run: what the exchange did not get"
        )
    if report.get("generator_priority"):
        lines.append(f"generator priority: {'; '.join(report['generator_priority'])}")
    if "webhooks" in report:
        w = report["webhooks"]
        line = f"webhooks received {w['received']} ({w['by_event']}), timed {w['timed']}"
        if w.get("fills_check_error"):
            line += f"; fills made not read ({w['fills_check_error']})"
        elif w.get("fills_made") is not None:
            line += f"; fills made {w['fills_made']}, without a webhook {w['fills_without_webhook']}"
        lines.append(line)
        otf = report.get("order_to_fill") or {}
        if otf.get("not_filled"):
            lines.append(
                f"market orders without a fill webhook: {otf['not_filled']} (no fill made "
                f"{_fmt(otf.get('not_filled_no_fill'))}, webhook missing {_fmt(otf.get('not_filled_webhook_missing'))})"
            )
    lines.append(f"201 order states: {report['order_states_in_201']} · skipped: {report['skipped'] or '{}'}")
    if report.get("ceiling"):
        c = report["ceiling"]
        if c.get("pgbench_tps"):
            lines.append(
                f"ceiling: pgbench 1-row INSERT on {c.get('server')} {c['pgbench_tps']:.0f} TPS "
                f"({c['clients']} clients, "
                f"{c['duration_s']} s, synchronous_commit={c['synchronous_commit']}, fsync={c.get('fsync')}"
                f"{'' if c.get('durable') else ', NOT DURABLE'}) → accepted orders/s ÷ "
                f"pgbench TPS = {c['ratio']:.3f}"
            )
        else:
            lines.append(f"ceiling: pgbench failed: {c.get('error')}")
    if report.get("server_stats"):
        st = report["server_stats"]
        top = ", ".join(f"{name} {calls}" for name, calls in list(st["redis_calls"].items())[:6])
        cpu = " ".join(f"{kind} {seconds:.2f}" for kind, seconds in st["cpu_s"].items())
        lines.append(
            f"server, per accepted order over {st['window_s']:.0f} s: {st['redis_calls_per_order']} Redis commands "
            f"({st['redis_scripts_per_order']} scripts; {top}), {st['pg_transactions_per_order']} PostgreSQL "
            f"transactions, {st['cpu_ms_per_order']} ms CPU (s in all: {cpu})"
        )
        if st.get("processes") is not None:
            counts = ", ".join(f"{kind} {n}" for kind, n in st["processes"].items()) or "none"
            left = ", ".join(f"{kind} {n}" for kind, n in st.get("processes_left_out", {}).items()) or "none"
            shared = " ".join(f"{kind} {seconds:.2f}" for kind, seconds in st.get("shared_cpu_s", {}).items())
            scope = "the exchange's" if st.get("process_scope") == "exchange" else "every process by name"
            lines.append(
                f"server processes measured ({scope}): {counts}; left out as other work: {left}"
                + (f"; PostgreSQL's shared processes, not in the CPU per order: {shared} s" if shared else "")
            )
        if st.get("run_queue_wait_s") is not None:
            orders = max(1, st["accepted_orders"])
            waits = " ".join(f"{kind} {seconds:.2f}" for kind, seconds in st["run_queue_wait_s"].items())
            runs = " ".join(f"{kind} {count / orders:.1f}" for kind, count in st["times_on_cpu"].items())
            lines.append(
                f"server, waiting for a CPU (run queue), per accepted order: {st['run_queue_wait_ms_per_order']} ms "
                f"(s in all: {waits}); put on a CPU {st['times_on_cpu_per_order']} times ({runs})"
            )
    if report.get("order_stages", {}).get("error"):
        lines.append(f"new order stages: not read ({report['order_stages']['error']})")
    elif report.get("order_stages"):
        from ops.bench.stages import STAGES  # here: stages imports this module's summarize

        st = report["order_stages"]
        parts = " · ".join(f"{name} p50 {_fmt(st[name]['p50_ms'])} / p99 {_fmt(st[name]['p99_ms'])}" for name in STAGES)
        lines.append(
            f"new order stages (n={st['orders']}, answered before the match {st['answered_before_match']}): {parts} ms"
        )
    origin = "scheduled send time" if report["mode"] == "open_loop" else "send time (closed loop)"
    lines.append(f"all latencies in ms, measured from the {origin}")
    return "\n".join(lines)
