"""JSON request bodies that handlers decode themselves, and how the OpenAPI schema documents them.

A handler that takes a body does not declare Litestar's ``data`` parameter (Litestar would decode and validate it,
with errors of its own): it reads the raw body with :func:`exchange.api.schemas.decode_body` (400
``malformed_json``, 422 ``validation_error``). Litestar's generator therefore cannot see the body. A
:class:`JsonBody` is the one declaration of such a body: the handler reads it with :meth:`JsonBody.read` and hands
:attr:`JsonBody.operation_class` to its decorator, so what the schema documents is what the handler decodes.

Invariants of the published schema (``/schema/openapi.json``):

* every such operation has a required ``application/json`` ``requestBody`` whose schema is
  ``#/components/schemas/<Struct name>``;
* that component is msgspec's own JSON Schema of the Struct (the decoder's rules: required fields, ``enum``,
  bounds, patterns, ``additionalProperties: false``), added by :func:`publish_request_bodies`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
from litestar import Request
from litestar.openapi.spec import OpenAPI, OpenAPIMediaType, Operation, PathItem, Reference, RequestBody, Schema

from exchange.api.schemas import decode_body

T = TypeVar("T")

REF_TEMPLATE = "#/components/schemas/{name}"
JSON = "application/json"


class JsonBody(Generic[T]):
    """The JSON body of one operation, decoded as ``type``; see the module's docstring."""

    __slots__ = ("operation_class", "type")

    def __init__(self, type_: type[T]) -> None:
        self.type = type_
        self.operation_class: type[Operation] = type(
            f"{type_.__name__}Operation", (JsonBodyOperation,), {"json_body": self}
        )

    async def read(self, request: Request[Any, Any, Any]) -> T:
        """The request's body decoded as ``type`` (or the :class:`ApiError` of :func:`decode_body`)."""
        return decode_body(await request.body(), self.type)


@dataclass
class JsonBodyOperation(Operation):
    """Litestar's ``operation_class`` of a handler with a :class:`JsonBody`: the operation Litestar builds, plus the
    ``requestBody`` it cannot see. One subclass per body (:attr:`JsonBody.operation_class`)."""

    json_body: ClassVar[JsonBody[Any]]

    def __post_init__(self) -> None:
        ref = REF_TEMPLATE.format(name=self.json_body.type.__name__)
        self.request_body = RequestBody(content={JSON: OpenAPIMediaType(schema=Reference(ref=ref))}, required=True)


@dataclass
class _JsonSchema(Schema):
    """A component given as a JSON Schema document (msgspec's), served as it is: Litestar's :class:`Schema` would
    drop its ``null`` defaults and spell keywords its own way."""

    document: dict[str, Any] = field(default_factory=dict)

    def to_schema(self) -> dict[str, Any]:
        return self.document


def _operations(item: PathItem) -> list[Operation | None]:
    return [item.get, item.put, item.post, item.delete, item.options, item.head, item.patch, item.trace]


def publish_request_bodies(openapi: OpenAPI) -> None:
    """Add the components the :class:`JsonBodyOperation` request bodies of ``openapi`` refer to.

    Litestar sets ``components.schemas`` to the types its generator saw, replacing any given in ``OpenAPIConfig``;
    so this runs on the schema it built (``app.openapi_schema``, which Litestar keeps and serves). A component name
    Litestar already uses for another schema, or a body whose name msgspec disambiguates, is a startup error: the
    ``$ref`` would point at the wrong schema."""
    bodies = [
        op.json_body.type
        for item in (openapi.paths or {}).values()
        for op in _operations(item)
        if isinstance(op, JsonBodyOperation)
    ]
    types = list(dict.fromkeys(bodies))
    refs, documents = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    for type_, ref in zip(types, refs, strict=True):
        if ref != {"$ref": REF_TEMPLATE.format(name=type_.__name__)}:
            raise RuntimeError(f"request body {type_!r}: msgspec names it {ref}, not after the Struct")
    components = openapi.components
    schemas = components.schemas if components.schemas is not None else {}
    if clash := set(schemas) & set(documents):
        raise RuntimeError(f"request body components {sorted(clash)} clash with the schema's own")
    merged: dict[str, Schema] = {**schemas, **{name: _JsonSchema(document=doc) for name, doc in documents.items()}}
    components.schemas = dict(sorted(merged.items()))  # by name, as Litestar orders them
