"""Settings: one class read from the environment plus an optional dotenv file; bad values stop the process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exchange.cli import main
from exchange.config import Settings, SettingsError, load_environ
from exchange.webhooks.delivery import DeliveryConfig


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert settings.partitions == 1
    assert settings.slow_request_ms == 500
    assert settings.log_format == "json"
    assert settings.metrics_port == 0


def test_webhook_attempts_are_kept_a_week_unless_set_and_0_keeps_them_forever() -> None:
    assert Settings.from_env({}).webhook_attempts_retention_hours == 168
    assert Settings.from_env({"EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS": "0"}).webhook_attempts_retention_hours == 0


def test_dotenv_file_supplies_values(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("EXCHANGE_PARTITIONS=3\nEXCHANGE_SLOW_REQUEST_MS=750\n")
    settings = Settings.from_env({}, env_file=env_file)
    assert (settings.partitions, settings.slow_request_ms) == (3, 750)


def test_environment_wins_over_dotenv_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("EXCHANGE_PARTITIONS=3\n")
    assert Settings.from_env({"EXCHANGE_PARTITIONS": "5"}, env_file=env_file).partitions == 5


def test_dotenv_in_current_directory_is_read_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("EXCHANGE_LOG_FORMAT=text\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXCHANGE_LOG_FORMAT", raising=False)
    monkeypatch.delenv("EXCHANGE_ENV_FILE", raising=False)
    assert Settings.from_env().log_format == "text"
    assert load_environ()["EXCHANGE_LOG_FORMAT"] == "text"


def test_explicit_environ_ignores_dotenv_in_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("EXCHANGE_PARTITIONS=3\n")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).partitions == 1


def test_named_env_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="EXCHANGE_ENV_FILE"):
        Settings.from_env({}, env_file=tmp_path / "missing.env")


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("EXCHANGE_PARTITIONS", "zero", "must be an integer"),
        ("EXCHANGE_PARTITIONS", "0", "must be >= 1"),
        ("EXCHANGE_SLOW_REQUEST_MS", "-1", "must be >= 0"),
        ("EXCHANGE_METRICS_PORT", "70000", "must be <= 65535"),
        ("EXCHANGE_LOG_FORMAT", "xml", "must be one of json, text"),
        ("EXCHANGE_LOG_LEVEL", "loud", "must be one of"),
        ("EXCHANGE_REDIS_URL", "http://x", "scheme redis"),
        ("EXCHANGE_DEBUG_ENDPOINTS", "maybe", "must be one of"),
        ("EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS", "-1", "must be >= 0"),
    ],
)
def test_invalid_value_is_refused_naming_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "environ",
    [
        {"EXCHANGE_WEBHOOK_READ_TIMEOUT_MS": "120000"},  # slow receivers, the default 60-s lease left as it was
        {"EXCHANGE_WEBHOOK_LEASE_MS": "16050"},  # exactly the default attempt: 2 x 3 s + 10 s + 50 ms
    ],
)
def test_a_webhook_lease_that_can_end_during_its_attempt_is_refused(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="EXCHANGE_WEBHOOK_LEASE_MS must exceed the longest delivery attempt"):
        Settings.from_env(environ)


def test_a_webhook_lease_longer_than_its_attempt_is_accepted() -> None:
    environ = {"EXCHANGE_WEBHOOK_READ_TIMEOUT_MS": "120000", "EXCHANGE_WEBHOOK_LEASE_MS": "180000"}
    assert Settings.from_env(environ).webhook_lease_ms == 180_000


def test_cli_exits_2_with_a_clear_message_on_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXCHANGE_PARTITIONS", "lots")
    assert main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "EXCHANGE_PARTITIONS must be an integer" in err


def test_every_setting_is_documented_in_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f.metadata["env"] for f in dataclasses.fields(Settings) if f"`{f.metadata['env']}`" not in readme]
    assert missing == []


def test_the_webhook_record_linger_reaches_the_delivery_config_in_seconds() -> None:
    assert DeliveryConfig.from_settings(Settings.from_env({})).record_linger_s == 0.05
    linger = {"EXCHANGE_WEBHOOK_RECORD_LINGER_MS": "0"}
    assert DeliveryConfig.from_settings(Settings.from_env(linger)).record_linger_s == 0
