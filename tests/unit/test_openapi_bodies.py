"""The published OpenAPI schema (``/schema/openapi.json``) documents the JSON body of every operation whose handler
reads one itself (:mod:`exchange.api.bodies`), as the msgspec Struct it decodes, and is a valid OpenAPI 3.1
document. The app is built, never started: serving the schema needs no database."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import jsonschema_rs
import msgspec
import pytest
import schemathesis
from litestar import Litestar, post
from litestar.routes import HTTPRoute
from litestar.testing import TestClient

from exchange.api.app import create_app
from exchange.api.bodies import JsonBody, publish_request_bodies
from exchange.api.errors import error_responses
from exchange.config import Settings
from exchange.orders.accept import normalize_symbol
from exchange.orders.errors import InvalidOrderError

REF_TEMPLATE = "#/components/schemas/{name}"
JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"
KNOWN_BODIES = {
    ("POST", "/orders"),
    ("PATCH", "/orders/{order_id}"),
    ("POST", "/register"),
    ("PUT", "/webhooks/endpoint"),
}


@pytest.fixture(scope="module")
def app() -> Litestar:
    return create_app(Settings.from_env({}))


@pytest.fixture(scope="module")
def served(app: Litestar) -> dict[str, Any]:
    response = TestClient(app).get("/schema/openapi.json")  # what brokers' generators download
    assert response.status_code == 200, response.text
    schema: dict[str, Any] = response.json()
    return schema


def _is_request_struct(value: object) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__struct_config__.forbid_unknown_fields  # the request Structs; responses do not forbid
    )


def _bodies_read(fn: Any) -> tuple[bool, set[type]]:
    """Whether a handler reads the request body (calls ``….body()`` or ``decode_body``, or names a
    :class:`JsonBody`) and the request Structs its code names (directly, or through a ``JsonBody``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    reads = False
    structs: set[type] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "body":
            reads = True
        if not isinstance(node, ast.Name):
            continue
        value = fn.__globals__.get(node.id)
        if node.id == "decode_body":
            reads = True
        elif isinstance(value, JsonBody):
            reads = True
            structs.add(value.type)
        elif _is_request_struct(value):
            structs.add(value)
    return reads, structs


def _handlers(app: Litestar) -> list[tuple[str, str, Any]]:
    return [
        (method, route.path_format, handler.fn)
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for method, (handler, _) in route.route_handler_map.items()
        if handler.resolve_include_in_schema()
    ]


def test_every_handler_that_reads_a_body_documents_the_struct_it_decodes(app: Litestar, served: dict[str, Any]) -> None:
    with_bodies = set()
    for method, path, fn in _handlers(app):
        operation = served["paths"][path][method.lower()]
        reads, structs = _bodies_read(fn)
        if not reads:
            assert "requestBody" not in operation, (method, path)
            continue
        assert len(structs) == 1, (method, path, structs)  # a body read as exactly one request Struct
        (struct,) = structs
        refs, components = msgspec.json.schema_components([struct], ref_template=REF_TEMPLATE)
        assert operation.get("requestBody") == {
            "required": True,
            "content": {"application/json": {"schema": refs[0]}},
        }, (method, path)
        for name, component in components.items():  # msgspec's schema, constraints and all, under its name
            assert served["components"]["schemas"].get(name) == component, (method, path, name)
        with_bodies.add((method, path))
    assert with_bodies >= KNOWN_BODIES  # the introspection found the handlers that read bodies


def test_the_published_schema_is_a_valid_openapi_3_1_document(served: dict[str, Any]) -> None:
    assert served["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(served).validate()  # the OpenAPI 3.1 meta-schema; raises with the path
    for name, component in served["components"]["schemas"].items():
        try:
            jsonschema_rs.meta.validate({"$schema": JSON_SCHEMA_2020_12, **component})
        except jsonschema_rs.ValidationError as exc:
            pytest.fail(f"component {name}: {exc}")


def test_a_body_named_like_a_component_of_the_schema_is_refused_at_startup() -> None:
    class ErrorOut(msgspec.Struct, forbid_unknown_fields=True):  # not exchange.api.errors.ErrorOut
        code: str

    body = JsonBody(ErrorOut)

    @post("/x", responses=error_responses(), operation_class=body.operation_class)
    async def handler() -> None:
        raise AssertionError("not called")

    openapi = Litestar([handler]).openapi_schema
    assert openapi.components.schemas is not None
    assert "ErrorOut" in openapi.components.schemas  # exchange.api.errors.ErrorOut, of the error responses
    with pytest.raises(RuntimeError, match="clash"):
        publish_request_bodies(openapi)


def test_every_schema_of_the_document_compiles_with_json_schema_regexes(served: dict[str, Any]) -> None:
    # JSON Schema's "pattern" is an ECMA-262 regex: Python-only syntax (\A, \Z) is refused (or, in a browser without
    # the u flag, matches the letters A and Z), so a generated client would refuse the bodies the api accepts.
    names = sorted(served["components"]["schemas"])
    document = {
        "$schema": JSON_SCHEMA_2020_12,
        "components": served["components"],
        "anyOf": [{"$ref": REF_TEMPLATE.format(name=name)} for name in names],
    }
    try:
        jsonschema_rs.validator_for(document)
    except jsonschema_rs.ValidationError as exc:
        pytest.fail(str(exc))


def test_the_portable_symbol_pattern_still_refuses_a_final_newline_in_python() -> None:
    # "$" alone would let "ABC\n" through in Python; the published pattern's lookahead keeps the old \Z meaning.
    assert normalize_symbol("brk.b") == "BRK.B"
    with pytest.raises(InvalidOrderError):
        normalize_symbol("ABC\n")
