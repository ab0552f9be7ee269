"""Requests whose every part passes, answered without FastAPI's per-request dependency solving.

FastAPI solves each route's dependencies anew for every request: it walks the dependency tree,
inspects each callable, builds cache keys, reads every parameter source, and collects errors. On an
append that was a sixth of the request's time, more than its validation. A ``FastPathRoute`` whose
parameters are all of the kinds this module knows (the dependencies of ``backend.api.deps``, the
Idempotency-Key header, a JSON body, the Request and a Response) reads them directly, and when a
request passes every check the route's dependencies make, calls the endpoint itself. At the first
part that does not pass, or that it is not sure of, nothing has been done yet: the request goes to
FastAPI's own handler, which answers it as it always did, error wording and order included. So
the rules stay where they are (FastAPI's, the dependencies', the schemas'); what this path skips is
only the machinery, for requests that meet them.

The answer is what FastAPI sends for the endpoint's return value: the response model's JSON
(``dump_json`` by alias, as FastAPI's own fast path writes it) with the route's status code, then
the headers the endpoint set. The return value is not validated again against the response model:
the endpoints return instances of it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter

from backend.api import deps
from backend.conversations.keys import Caller


class _Declined(Exception):
    """This request is not one the fast path is sure to answer as FastAPI would."""


# A dependency's solver: its value for the request, or _Declined; never a side effect.
Solver = Callable[[Request], Any]


def _api_key(request: Request) -> Caller:
    # How HTTPBearer reads the header (fastapi.security.http): "<scheme> <credentials>", any case;
    # no credentials are None to it.
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    given = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    caller = deps.identify(deps.app_settings(request), given)
    if isinstance(caller, str):
        raise _Declined()
    return caller


def _conversation_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["conversation_id"])
    except (KeyError, ValueError):
        raise _Declined() from None


_SOLVERS: dict[Callable[..., Any], Solver] = {
    deps.require_api_key: _api_key,
    deps.parse_conversation_id: _conversation_id,
}
_IDEMPOTENCY_KEY = re.compile(deps.IDEMPOTENCY_KEY_PATTERN)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise _Declined()
    return key


class _Plan:
    """How to read one route's parameters directly."""

    def __init__(self, route: APIRoute) -> None:
        dependant = route.dependant
        self.endpoint: Callable[..., Awaitable[Any]] = route.endpoint
        self.status_code = route.status_code
        self.solvers: list[tuple[str | None, Solver]] = [
            (sub.name, _SOLVERS[cast(Callable[..., Any], sub.call)]) for sub in _solved(dependant)
        ]
        self.connection: str | None = next(
            (sub.name for sub in dependant.dependencies if sub.call is deps.get_connection), None
        )
        self.idempotency_key = dependant.header_params[0].name if dependant.header_params else None
        self.body_name: str | None = None
        self.body_model: type[BaseModel] | None = None
        if dependant.body_params:
            self.body_name = dependant.body_params[0].name
            self.body_model = cast(type[BaseModel], dependant.body_params[0].field_info.annotation)
        self.request_name = dependant.request_param_name
        self.response_name = dependant.response_param_name
        self.answer = TypeAdapter(route.response_model)

    async def solve(self, request: Request) -> dict[str, Any]:
        """The endpoint's arguments but the connection, or _Declined; in FastAPI's order (the body first)."""
        values: dict[str, Any] = {}
        if self.body_model is not None:
            # A declared length at most KRAKEN_MAX_BODY_BYTES (BodySizeLimit refused a longer one):
            # the body cannot trip the limit as it is read, whose error FastAPI words itself.
            if not request.headers.get("content-length", "").isdigit():
                raise _Declined()
            if request.headers.get("content-type", "").lower() != "application/json":
                raise _Declined()
            try:
                raw = await request.body()  # kept on the request: FastAPI's handler reads it from there
                values[self.body_name or ""] = self.body_model.model_validate(json.loads(raw))
            except Exception:
                raise _Declined() from None
        for name, solver in self.solvers:
            value = solver(request)
            if name is not None:
                values[name] = value
        if self.idempotency_key is not None:
            values[self.idempotency_key] = _idempotency_key(request)
        if self.request_name is not None:
            values[self.request_name] = request
        return values

    async def answer_with(self, request: Request, values: dict[str, Any]) -> Response:
        if self.connection is not None:
            values[self.connection] = await deps.get_connection(request)
        # FastAPI's sub-response: what the endpoint sets on its Response goes onto the answer.
        sub = Response()
        del sub.headers["content-length"]
        sub.status_code = None  # type: ignore[assignment]
        if self.response_name is not None:
            values[self.response_name] = sub
        returned = await self.endpoint(**values)
        if isinstance(returned, Response):
            return returned
        content = self.answer.dump_json(returned, by_alias=True)
        status_code = sub.status_code or self.status_code or 200
        response = Response(content, status_code=status_code, media_type="application/json")
        response.headers.raw.extend(sub.headers.raw)
        return response


def _solved(dependant: Dependant) -> list[Dependant]:
    """The sub-dependencies a solver reads directly (the connection is taken last, apart)."""
    return [sub for sub in dependant.dependencies if sub.call is not deps.get_connection]


def plan_for(route: APIRoute) -> _Plan | None:
    """The route's plan, or None when a parameter is of a kind this module does not read."""
    dependant = route.dependant
    known = all(sub.call in _SOLVERS or sub.call is deps.get_connection for sub in dependant.dependencies)
    simple = not (
        dependant.path_params
        or dependant.query_params
        or dependant.cookie_params
        or len(dependant.header_params) > 1
        or len(dependant.body_params) > 1
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or dependant.http_connection_param_name
        or dependant.websocket_param_name
    )
    header_known = all(param.alias == "Idempotency-Key" for param in dependant.header_params)
    body_known = all(
        isinstance(param.field_info.annotation, type) and issubclass(param.field_info.annotation, BaseModel)
        for param in dependant.body_params
    )
    model = route.response_model
    answers_a_model = isinstance(model, type) and issubclass(model, BaseModel)
    if known and simple and header_known and body_known and answers_a_model:
        return _Plan(route)
    return None


class FastPathRoute(APIRoute):
    """An APIRoute that answers requests passing every check itself (see the module's docstring).

    Its router is included without dependencies of its own (those would be FastAPI's to solve).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        plan = plan_for(self)
        if plan is None:
            return standard

        async def handle(request: Request) -> Response:
            if not request.app.dependency_overrides:
                try:
                    values = await plan.solve(request)
                except _Declined:
                    pass
                else:
                    return await plan.answer_with(request, values)
            return await standard(request)

        return handle
