"""The OpenAPI schema documents the error responses the api sends (``exchange.api.errors``): every 4xx/5xx of
every operation is ``ErrorOut`` (``{code, message, details?}``), never Litestar's own ``{status_code, detail}``,
and what any caller can meet (a bad key, the database down) is documented wherever it can happen. The fuzz test
checks the statuses it can provoke; these check the schema itself, including statuses a fuzzer cannot provoke."""

from __future__ import annotations

import re
from typing import Any

from litestar.testing import TestClient

from exchange.api.errors import ERRORS

pytest_plugins = ["tests.integration.api_fixtures"]

ERROR_BODY = {"$ref": "#/components/schemas/ErrorOut"}
UNAUTHENTICATED = {("get", "/health"), ("get", "/health/live"), ("get", "/health/ready"), ("get", "/metrics")}


def _operations(api_client: TestClient[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    schema = api_client.get("/schema/openapi.json").json()
    return [(method, path, op) for path, item in schema["paths"].items() for method, op in item.items()]


def test_every_documented_error_response_is_the_error_body_the_api_sends(api_client: TestClient[Any]) -> None:
    seen = 0
    for method, path, op in _operations(api_client):
        for status, response in op["responses"].items():
            if int(status) < 400 or (method, path, status) == ("get", "/health/ready", "503"):  # ready: ReadyOut
                continue
            assert response["content"]["application/json"]["schema"] == ERROR_BODY, (method, path, status)
            codes = re.findall(r"`(\w+)`:", response["description"])
            assert codes, (method, path, status)
            assert {ERRORS[code].status for code in codes} == {int(status)}, (method, path, status)
            seen += 1
    assert seen > 50  # the loop saw the operations


def test_every_operation_behind_a_key_documents_401_and_503(api_client: TestClient[Any]) -> None:
    for method, path, op in _operations(api_client):
        if (method, path) in UNAUTHENTICATED:
            continue
        assert {"401", "503"} <= set(op["responses"]), (method, path)


def test_the_cancel_documents_its_204_and_the_ops_login_its_303(api_client: TestClient[Any]) -> None:
    operations = {(method, path): op for method, path, op in _operations(api_client)}
    assert "204" in operations[("post", "/orders/{order_id}/cancel")]["responses"]
    assert "303" in operations[("get", "/ops/login")]["responses"]


def test_an_unknown_path_under_the_schema_is_a_json_404(api_client: TestClient[Any]) -> None:
    # Litestar's schema router answers a path no documentation site serves with an HTML page of its own.
    response = api_client.get("/schema/no-such-page")
    assert (response.status_code, response.json()["code"]) == (404, "not_found"), response.text


def test_the_schema_and_its_documentation_page_are_still_served(api_client: TestClient[Any]) -> None:
    assert api_client.get("/schema/openapi.json").json()["info"]["title"] == "exchange"
    page = api_client.get("/schema")
    assert (page.status_code, page.headers["content-type"].split(";")[0]) == (200, "text/html")
