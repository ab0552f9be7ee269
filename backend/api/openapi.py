"""The OpenAPI document: what FastAPI generates from the routes, completed where it cannot see.

- Operation ids are the route functions' names, so that links can name them.
- Every operation can answer 500, and those that use a database connection 503 and 504
  (``documented`` says what each means).
- Every response carries X-Request-ID, and every operation takes one.
- FastAPI documents a 422 for any route with parameters; only routes that list 422 can answer it
  (a conversation id that is not a UUID is a 404, never a 422).

``backend/tests/api/test_openapi.py`` runs a schema-based fuzzer against the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from backend.api.deps import get_connection
from backend.api.errors import DATABASE_FAULTS, documented

REQUEST_ID = "X-Request-ID"
_REQUEST_ID_PARAMETER = {
    "name": REQUEST_ID,
    "in": "header",
    "required": False,
    "description": "An id for this request, of your choosing: echoed in the response's X-Request-ID when "
    "it is valid, else replaced by a generated one. It is in every log line of the request.",
    "schema": {"type": "string"},
}
_REQUEST_ID_HEADER = {
    "required": True,
    "description": "This request's id: the request's own X-Request-ID when valid, else a generated one. "
    "A 500's message names it.",
    "schema": {"type": "string"},
}


def operation_id(route: APIRoute) -> str:
    return route.name


def link(operation: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to another operation, its parameters taken from this request or response."""
    return {"operationId": operation, "parameters": parameters}


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first use)."""
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for route, operation in _operations(app, document):
            _complete(route, operation)
        # FastAPI's own 422 shape: no response refers to it any more (each 422 left is an ErrorBody).
        for name in ("HTTPValidationError", "ValidationError"):
            document["components"]["schemas"].pop(name)
        app.openapi_schema = document
    return app.openapi_schema


def _operations(app: FastAPI, document: dict[str, Any]) -> Iterator[tuple[RouteContext, dict[str, Any]]]:
    """Each route with its operation in the document; routes of included routers as included."""
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                yield route, document["paths"][route.path_format][method.lower()]


def _complete(route: RouteContext, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation["responses"]
    if "422" in responses and 422 not in route.responses:
        del responses["422"]
    statuses = [500]
    if _uses_database(route.dependant):
        statuses += sorted({code for code, _, _, _ in DATABASE_FAULTS.values()})
    for code, response in documented(*statuses).items():
        responses.setdefault(str(code), _as_openapi(response))
    for response in responses.values():
        response.setdefault("headers", {})[REQUEST_ID] = _REQUEST_ID_HEADER
    operation.setdefault("parameters", []).append(_REQUEST_ID_PARAMETER)


def _uses_database(dependant: Dependant) -> bool:
    return any(sub.call is get_connection or _uses_database(sub) for sub in dependant.dependencies)


def _as_openapi(response: dict[str, Any]) -> dict[str, Any]:
    """A ``documented`` entry as the document writes it (its model is ErrorBody, in the components)."""
    entry = {key: value for key, value in response.items() if key != "model"}
    entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return entry
