"""compose.yaml cannot be run here (no Docker): check that it agrees with the code instead.

Every exchange service runs a real ``exchange`` subcommand with options that subcommand accepts, sets only
variables the settings class reads, waits for its dependencies' health, and ports line up (the api's bind port
is the published one and the one its healthcheck probes; workers' metrics port is exposed and probed), and every
image it pulls is pinned to a release (pgbouncer's to an exact one, by digest).
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from exchange.cli import build_parser
from exchange.config import Settings
from exchange.db.engines import DEAD_PEER_OPTIONS

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
PGBOUNCER_INI = REPO / "ops" / "pgbouncer.ini"
EXCHANGE_IMAGE = "exchange:latest"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def exchange_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == EXCHANGE_IMAGE}


def test_compose_declares_every_process_kind(compose: dict[str, Any]) -> None:
    commands = {svc["command"][0] for svc in exchange_services(compose).values()}
    assert {"migrate", "api", "matcher", "webhooks", "sweeper"} <= commands
    assert {"postgres", "pgbouncer", "redis"} <= set(compose["services"])


def test_every_exchange_command_parses_with_the_real_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name, svc in exchange_services(compose).items():
        try:
            args = parser.parse_args(svc["command"])
        except SystemExit:
            pytest.fail(f"service {name}: {svc['command']} is not a valid exchange command")
        assert args.command == svc["command"][0]


def test_environment_names_are_settings_variables(compose: dict[str, Any]) -> None:
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    for name, svc in exchange_services(compose).items():
        unknown = {k for k in svc.get("environment", {}) if k.startswith("EXCHANGE_")} - known
        assert not unknown, f"service {name} sets variables no setting reads: {unknown}"


def test_environment_values_are_valid_settings(compose: dict[str, Any]) -> None:
    for svc in exchange_services(compose).values():
        env = {k: str(v) for k, v in svc["environment"].items()}
        env["EXCHANGE_ADMIN_API_KEY"] = "adm"  # compose interpolates it from the operator's environment
        Settings.from_env(env)


def test_matchers_cover_every_partition_exactly_once(compose: dict[str, Any]) -> None:
    from exchange.messaging.partitions import parse_partitions

    covered: list[int] = []
    for svc in exchange_services(compose).values():
        if svc["command"][0] == "matcher":
            partitions = int(svc["environment"]["EXCHANGE_PARTITIONS"])
            covered += parse_partitions(svc["command"][svc["command"].index("--partitions") + 1], partitions)
    assert sorted(covered) == list(range(partitions))


def test_api_bind_publish_and_healthcheck_ports_agree(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    bind_port = api["command"][api["command"].index("--bind") + 1].rsplit(":", 1)[1]
    published = {p.rsplit(":", 1)[1] for p in api["ports"]}
    assert published == {bind_port}
    assert f"127.0.0.1:{bind_port}/health/ready" in " ".join(api["healthcheck"]["test"])


def test_workers_expose_and_probe_their_metrics_port(compose: dict[str, Any]) -> None:
    for name, svc in exchange_services(compose).items():
        if svc["command"][0] not in {"matcher", "webhooks", "sweeper"}:
            continue
        port = str(svc["environment"]["EXCHANGE_METRICS_PORT"])
        assert svc["environment"]["EXCHANGE_METRICS_BIND"] == "0.0.0.0", name
        assert port in [str(p) for p in svc["expose"]], name
        assert f"127.0.0.1:{port}/metrics" in " ".join(svc["healthcheck"]["test"]), name


def test_pooled_url_points_at_pgbouncer_listen_port(compose: dict[str, Any]) -> None:
    pgbouncer_port = compose["services"]["pgbouncer"]["environment"]["LISTEN_PORT"]
    for svc in exchange_services(compose).values():
        pooled = svc["environment"]["EXCHANGE_POOLED_DATABASE_URL"]
        assert re.search(rf"@pgbouncer:{pgbouncer_port}/", pooled)
        assert "@postgres:5432/" in svc["environment"]["EXCHANGE_DATABASE_URL"]


def test_services_wait_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dependency, rule in svc.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            if dependency == "migrate":
                assert condition == "service_completed_successfully"
            else:
                assert condition == "service_healthy", f"{name} -> {dependency}"
                assert "healthcheck" in services[dependency], dependency
    for name, svc in exchange_services(compose).items():
        if svc["command"][0] != "migrate":
            assert "migrate" in svc["depends_on"], name


def test_redis_persists_with_append_only_file(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def test_every_long_running_service_is_restarted_after_a_crash(compose: dict[str, Any]) -> None:
    """As ``exchange dev`` restarts every child it runs, pgbouncer included (tests/e2e/test_faults.py kills or
    restarts each)."""
    for name, svc in compose["services"].items():
        if svc.get("command") != ["migrate"]:
            assert svc.get("restart") in {"unless-stopped", "always"}, name


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}\Z")


def image_tag(reference: str) -> str | None:
    """The tag of an image reference (``[registry[:port]/]path[:tag][@digest]``), None when it has none."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]  # a registry's ":port" comes before a "/", a tag after the last one
    return last.split(":", 1)[1] if ":" in last else None


def is_pinned(reference: str) -> bool:
    """The image names what it runs: a digest, or a tag that names a version. No tag (``latest``) and ``latest``
    itself, or any tag without a version number (``alpine``, ``stable``), move to whatever the registry holds when a
    host pulls: two hosts, or one host before and after a pull, would run different software from one file."""
    if DIGEST.search(reference):
        return True
    tag = image_tag(reference)
    return tag is not None and tag != "latest" and any(c.isdigit() for c in tag)


@pytest.mark.parametrize(
    ("reference", "pinned"),
    [
        ("edoburu/pgbouncer:latest", False),
        ("edoburu/pgbouncer", False),
        ("registry.example:5000/pgbouncer", False),
        ("redis:alpine", False),
        ("postgres:16", True),
        ("edoburu/pgbouncer:v1.25.2-p0", True),
        ("registry.example:5000/pgbouncer:v1.25.2-p0", True),
        ("edoburu/pgbouncer@sha256:" + "0" * 64, True),
    ],
)
def test_an_image_without_a_version_tag_or_a_digest_is_unpinned(reference: str, pinned: bool) -> None:
    assert is_pinned(reference) is pinned


def test_every_image_compose_pulls_is_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" not in svc:  # the exchange's own image is built from this checkout
            assert is_pinned(svc["image"]), f"service {name}: image {svc['image']} is not pinned"


def test_pgbouncer_image_is_an_exact_release_by_digest(compose: dict[str, Any]) -> None:
    """pgbouncer's behaviour under the faults (``server_login_retry``, ``query_wait_timeout``, prepared statements in
    transaction pooling) changes between releases: compose runs exactly one, the tag saying which to a reader and
    the digest making sure of it."""
    image = compose["services"]["pgbouncer"]["image"]
    assert re.fullmatch(r"edoburu/pgbouncer:v\d+\.\d+\.\d+-p\d+@sha256:[0-9a-f]{64}", image), image


def pgbouncer_settings() -> configparser.SectionProxy:
    ini = configparser.ConfigParser(inline_comment_prefixes=None, comment_prefixes=(";", "#"))
    ini.read_string(PGBOUNCER_INI.read_text())
    return ini["pgbouncer"]


def _compose_pgbouncer_has_the_setting_of_ops_pgbouncer_ini(compose: dict[str, Any], setting: str) -> None:
    assert str(compose["services"]["pgbouncer"]["environment"][setting.upper()]) == pgbouncer_settings()[setting]


@pytest.mark.parametrize("setting", ["pool_mode", "server_login_retry", "query_wait_timeout", "max_client_conn"])
def test_compose_pgbouncer_has_the_fault_tested_settings_of_ops_pgbouncer_ini(
    compose: dict[str, Any], setting: str
) -> None:
    _compose_pgbouncer_has_the_setting_of_ops_pgbouncer_ini(compose, setting)


@pytest.mark.parametrize(
    "setting", ["tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout"]
)
def test_compose_pgbouncer_bounds_a_silent_peer_as_ops_pgbouncer_ini_does(
    compose: dict[str, Any], setting: str
) -> None:
    _compose_pgbouncer_has_the_setting_of_ops_pgbouncer_ini(compose, setting)


@pytest.mark.parametrize(
    ("setting", "option"),
    [
        ("tcp_user_timeout", "tcp_user_timeout"), ("tcp_keepidle", "keepalives_idle"),
        ("tcp_keepintvl", "keepalives_interval"), ("tcp_keepcnt", "keepalives_count"),
    ],
)  # fmt: skip
def test_ops_pgbouncer_ini_bounds_a_silent_peer_with_the_exchange_s_dead_peer_options(
    setting: str, option: str
) -> None:
    assert int(pgbouncer_settings()[setting]) == DEAD_PEER_OPTIONS[option]
