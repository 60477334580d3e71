"""The API's action routes, generated from the action table (``engine/service/actions.py``):
one route per action, its target from the path, its other params from the JSON body (from the
query of a DELETE), its role from the table's policy key. Each answers 202 with the queued job
once the action's checks pass (``actions.enqueue``); ``/openapi.json`` shows each body model."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import create_model
from pydantic.fields import FieldInfo

from vmkeep.api import pool_routes
from vmkeep.api.base import Api, accepted
from vmkeep.engine.core.trust import LOCAL_ADMIN, Actor
from vmkeep.engine.service import actions
from vmkeep.engine.service import params as P
from vmkeep.engine.service.actions import Action
from vmkeep.names import MAX_JSON_ID

_BODIES: dict[tuple[type[P.Params], tuple[str, ...]], type[P.Params] | None] = {}


def _with_policy_keys(f: FieldInfo) -> FieldInfo:
    """A policy field showing its keys and values in the schema (pool_routes' policy keys;
    backup_config.validate checks them)."""
    return FieldInfo.merge_field_infos(f, json_schema_extra=pool_routes.policy_schema())


def _body_model(a: Action) -> type[P.Params] | None:
    """The params of ``a`` outside its path, as one model (None when there are none); one model
    per params class, so the schema names each once."""
    key = (a.model, tuple(a.path_fields))
    if key not in _BODIES:
        fields = {
            n: (f.annotation, _with_policy_keys(f) if f.annotation == P.Policy else f)
            for n, f in a.model.model_fields.items()
            if n not in key[1]
        }
        name = a.model.__name__.removesuffix("Params") + "Request"
        _BODIES[key] = create_model(name, __base__=P.Params, **fields) if fields else None  # type: ignore[call-overload]
    return _BODIES[key]


def _path_param(a: Action, name: str) -> inspect.Parameter:
    annotation: Any = a.model.model_fields[name].annotation
    if annotation is int:  # a catalog id: a larger one is bad input (422)
        annotation = Annotated[int, PathParam(ge=1, le=MAX_JSON_ID)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)


def _endpoint(api: Api, a: Action) -> Any:
    body = _body_model(a)
    sig = [_path_param(a, f) for f in a.path_fields]
    if a.method == "DELETE" and body is not None:  # each param from the query
        for n, f in body.model_fields.items():  # with the field's bounds (the schema's too)
            query = Query(alias=f.alias)
            sig.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                         annotation=Annotated[f.annotation, query, *f.metadata]))  # fmt: skip
    elif body is not None:
        optional = all(not f.is_required() for f in body.model_fields.values())
        sig.append(
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                default=None if optional else inspect.Parameter.empty,
                annotation=(body | None) if optional else body,
            )
        )
    sig.append(inspect.Parameter("who", inspect.Parameter.KEYWORD_ONLY,
                                 default=api.require(a.policy), annotation=Actor))  # fmt: skip

    def route(**kw: Any) -> JSONResponse:
        who: Actor = kw.pop("who")
        sent = kw.pop("body", None)
        data = dict(kw)
        if sent is not None:
            data |= sent.model_dump(by_alias=True, exclude_unset=True)
        p = actions.parse(a, data)
        cap = None if who is LOCAL_ADMIN else api.config.api.max_queued_per_token
        return accepted(actions.enqueue(api.ctx(), a, p, who, cap))

    route.__signature__ = inspect.Signature(sig, return_annotation=JSONResponse)  # type: ignore[attr-defined]
    route.__name__ = a.kind.replace("-", "_")
    route.__doc__ = a.summary
    return route


def routes(api: Api, app: FastAPI) -> None:
    """Add a route per action of the table to ``app``."""
    for a in actions.ACTIONS.values():
        app.add_api_route(
            a.route,
            _endpoint(api, a),
            methods=[a.method],
            status_code=202,
            name=a.kind,
            summary=a.summary,
            response_class=JSONResponse,
        )
