"""The OpenAPI description and the Flask routes stay in step; every route declares its roles."""

from __future__ import annotations

import re

from leuk_fhir.service.auth import PUBLIC, roles_of


def _documented_paths(client) -> dict[str, set[str]]:
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    return {path: set(ops) for path, ops in spec["paths"].items()}


def _flask_routes(app) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        routes.setdefault(path, set()).update(methods)
    return routes


def test_every_route_is_documented_and_every_documented_path_is_a_route(make_app) -> None:
    app = make_app()
    documented = _documented_paths(app.test_client())
    assert _flask_routes(app) == documented


def test_required_paths_are_there(make_app) -> None:
    documented = _documented_paths(make_app().test_client())
    for path, method in [
        ("/v1/analyses", "post"), ("/v1/analyses", "get"), ("/v1/analyses/{analysis_id}", "get"),
        ("/v1/analyses/{analysis_id}/sign-off", "post"), ("/v1/deliveries", "get"),
        ("/v1/deliveries/{delivery_id}/retry", "post"), ("/dicomweb/studies", "post"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/openapi.json", "get"),
    ]:
        assert method in documented[path], (method, path)


def test_every_view_declares_who_may_call_it(make_app) -> None:
    app = make_app()
    public = set()
    for endpoint, view in app.view_functions.items():
        roles = roles_of(view)
        assert roles, f"{endpoint} declares no roles"
        if PUBLIC in roles:
            public.add(endpoint)
    assert public == {"ops.healthz", "ops.readyz", "ops.metrics", "ops.openapi",
                      "page.index", "page.static_file", "api.get_model"}


def test_public_operations_are_marked_without_security(make_app) -> None:
    spec = make_app().test_client().get("/openapi.json").get_json()
    open_paths = {p for p, ops in spec["paths"].items()
                  if "get" in ops and ops["get"].get("security") == []}
    assert open_paths == {"/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/{filename}",
                          "/v1/model"}
