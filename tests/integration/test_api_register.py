"""POST /register: admin-only, key shown once and stored as its SHA-256 only."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import Engine

from tests.integration.api_helpers import ADMIN_KEY, count, register

pytest_plugins = ["tests.integration.api_fixtures"]


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_register_returns_the_key_once_and_stores_only_its_sha256(
    api_client: TestClient[Any], api_engine: Engine
) -> None:
    response = api_client.post(
        "/register", json={"name": "Alpha", "webhook_url": "https://hooks.example/x"}, headers=admin()
    )
    assert response.status_code == 201
    body = response.json()
    assert body["api_key"].startswith("exk_")
    assert body["webhook_secret"].startswith("whsec_")
    assert body["name"] == "Alpha"
    assert body["webhook_url"] == "https://hooks.example/x"
    stored = count(
        api_engine,
        "SELECT count(*) FROM brokers WHERE id = :id AND api_key_hash = :h",
        id=body["broker_id"],
        h=hashlib.sha256(body["api_key"].encode()).hexdigest(),
    )
    assert stored == 1
    plain = count(api_engine, "SELECT count(*) FROM brokers WHERE api_key_hash = :k", k=body["api_key"])
    assert plain == 0
    # The new key works for broker endpoints.
    balance = api_client.get("/balance", headers={"Authorization": f"Bearer {body['api_key']}"})
    assert balance.json() == {"broker_id": body["broker_id"], "broker_name": "Alpha", "balance": 0}


@pytest.mark.parametrize("headers", [{}, admin("wrong"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}])
def test_register_without_the_admin_key_is_401(api_client: TestClient[Any], headers: dict[str, str]) -> None:
    response = api_client.post("/register", json={"name": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_broker_key_is_not_an_admin_key(api_client: TestClient[Any]) -> None:
    broker = register(api_client)
    response = api_client.post("/register", json={"name": "x"}, headers=broker.headers)
    assert response.status_code == 401


def test_admin_endpoints_are_503_when_no_admin_key_is_configured(
    client_factory: Callable[..., TestClient[Any]],
) -> None:
    client = client_factory(admin_api_key="")
    response = client.post("/register", json={"name": "x"}, headers=admin())
    assert response.status_code == 503
    assert response.json()["code"] == "admin_disabled"
    assert client.get("/debug/trade-count", headers=admin()).status_code == 503


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "not a url", "http://", "/relative"])
def test_register_rejects_a_non_http_webhook_url(api_client: TestClient[Any], api_engine: Engine, url: str) -> None:
    name = f"bad-hook-{url}"[:100]
    response = api_client.post("/register", json={"name": name, "webhook_url": url}, headers=admin())
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_webhook_url"
    assert count(api_engine, "SELECT count(*) FROM brokers WHERE name = :n", n=name) == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "malformed_json"),
        (b'{"name": ""}', 422, "validation_error"),
        (b'{"name": "' + b"x" * 101 + b'"}', 422, "validation_error"),
        (b'{"name": "ok", "extra": 1}', 422, "validation_error"),
        (b'{"name": 5}', 422, "validation_error"),
        (b'{"name": "nul\\u0000byte"}', 422, "validation_error"),
        (b'{"name": "ok", "webhook_url": "http://x/\\u0000"}', 422, "validation_error"),
    ],
)
def test_register_validates_its_body(api_client: TestClient[Any], body: bytes, status: int, code: str) -> None:
    response = api_client.post("/register", content=body, headers=admin())
    assert response.status_code == status
    assert response.json()["code"] == code
