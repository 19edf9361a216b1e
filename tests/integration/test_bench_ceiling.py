"""``exchange bench --ceiling``: pgbench against the test PostgreSQL server, durable commits read back."""

from __future__ import annotations

from ops.bench.ceiling import pgbench_binary, run_pgbench, server_of
from tests.conftest import skip_or_fail


def test_the_ceiling_reports_its_server_and_the_synchronous_commit_its_sessions_got(postgres_admin_url: str) -> None:
    if pgbench_binary() is None:
        skip_or_fail("pgbench is not installed")

    out = run_pgbench(postgres_admin_url, 1, 1)

    assert out.get("error") is None, out
    assert out["server"] == server_of(postgres_admin_url) != ""
    assert out["synchronous_commit"] == "on"  # read back from a session opened with pgbench's own options
    assert out["pgbench_tps"] > 0
