"""The OpenAPI document is complete: every route is in it with a summary and a description, its success responses
say what they return, signed routes say so, and every schema it refers to exists. An undocumented route fails here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from marketplace.app import create_app
from marketplace.settings import Settings
from tests.marketplace.chainless import chainless_runtime

# Routes that the marketplace signs for (EIP-712 envelope), by (method, path).
SIGNED = {("POST", "/providers/register"), ("POST", "/providers/heartbeat"), ("POST", "/work/next"), ("PUT", "/blobs"),
          ("POST", "/units/{unit_id}/result"), ("POST", "/verifiers/register"), ("POST", "/verify/next"),
          ("POST", "/verify/verdict"), ("POST", "/verify/heartbeat"), ("POST", "/jobs"), ("POST", "/reveals/next"), ("POST", "/reveals")}


@pytest.fixture()
def app(tmp_path: Path) -> FastAPI:
    settings = Settings(data_dir=tmp_path)
    return create_app(chainless_runtime(settings, chain_id=31337))


def undocumented(app: FastAPI, schema: dict[str, Any]) -> list[str]:
    """Every way a route of ``app`` falls short in ``schema``, as 'METHOD /path: what'."""
    problems = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue  # /openapi.json, /docs, /redoc themselves
        for method in sorted(route.methods):
            where = f"{method} {route.path_format}"
            op = schema["paths"].get(route.path_format, {}).get(method.lower())
            if not route.include_in_schema or op is None:
                problems.append(f"{where}: not in the OpenAPI document")
                continue
            if not (op.get("description") or "").strip():
                problems.append(f"{where}: no description (give the route a docstring)")
            if not op.get("summary") or route.summary is None:
                problems.append(f"{where}: no summary= on the route")
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            if not ok:
                problems.append(f"{where}: no success response documented")
            for code, r in ok.items():
                for media, content in r.get("content", {}).items():
                    if not content.get("schema"):
                        problems.append(f"{where}: {code} {media} has an empty schema")
    return problems


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_route_is_documented(app: FastAPI) -> None:
    schema = TestClient(app).get("/openapi.json").json()
    assert undocumented(app, schema) == []
    n_routes = sum(len(r.methods) for r in app.routes if isinstance(r, APIRoute))
    assert sum(len(ops) for ops in schema["paths"].values()) == n_routes


def test_an_undocumented_route_is_caught(app: FastAPI) -> None:
    @app.get("/added-later")
    def added_later() -> dict[str, str]:
        return {}

    app.openapi_schema = None
    assert undocumented(app, app.openapi()) == ["GET /added-later: no description (give the route a docstring)",
                                                "GET /added-later: no summary= on the route"]


def test_references_resolve_and_bodies_are_described(app: FastAPI) -> None:
    schema = app.openapi()
    components = schema["components"]["schemas"]
    missing = {r for r in refs(schema) if r.removeprefix("#/components/schemas/") not in components}
    assert missing == set()
    for path, method, model in [("/providers/register", "post", "ProviderRegister"), ("/jobs", "post", "JobSubmit"),
                                ("/jobs/quote", "post", "JobSpec"), ("/auth/login", "post", "LoginIn"),
                                ("/reveals", "post", "RevealSubmit"), ("/verifiers/register", "post", "VerifierRegister")]:
        body = schema["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    assert "application/octet-stream" in schema["paths"]["/blobs"]["put"]["requestBody"]["content"]


def test_signed_and_bearer_routes_declare_their_auth(app: FastAPI) -> None:
    schema = app.openapi()
    signed = {(m.upper(), p) for p, ops in schema["paths"].items() for m, op in ops.items()
              if op.get("security") == [{"GridMintRequest": []}]}
    assert signed == SIGNED
    for path in ("/auth/me", "/customers/me/jobs"):
        assert schema["paths"][path]["get"]["security"] == [{"HTTPBearer": []}]
        assert "401" in schema["paths"][path]["get"]["responses"]
    for method, path in SIGNED:
        assert {"401", "409", "413"} <= set(schema["paths"][path][method.lower()]["responses"])
