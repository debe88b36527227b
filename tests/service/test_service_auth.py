"""Tokens and roles: with require_auth on every non-public endpoint needs the right role;
with it off (the loopback demo) everything is open but a sign-off must name a person."""

from __future__ import annotations

import sqlite3

import pytest

from leuk_fhir.model.synthetic import generate_cell


def png_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(generate_cell("normal", 1)).save(out, format="PNG")
    return out.getvalue()

PUBLIC_PATHS = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/static/app.js", "/v1/model"]


@pytest.fixture
def secured(make_app, settings):
    app = make_app(settings_=settings.replace(service__require_auth=True))
    store = app.extensions["leuk_fhir"].store
    tokens = {role: store.create_token(name=f"{role} one", role=role)[1]
              for role in ("device", "clinician", "admin")}
    return app, tokens


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _submit(client, token: str | None = None):
    headers = _auth(token) if token else {}
    return client.post("/v1/analyses", headers=headers,
                       data={"image": (__import__("io").BytesIO(png_bytes()), "cell.png")})


def test_public_endpoints_need_no_token(secured) -> None:
    app, _ = secured
    client = app.test_client()
    for path in PUBLIC_PATHS:
        assert client.get(path).status_code in (200, 503), path  # readyz: 503 until started


@pytest.mark.parametrize("method,path", [
    ("get", "/v1/analyses"), ("get", "/v1/analyses/an-x"), ("get", "/v1/analyses/an-x/fhir"),
    ("post", "/v1/analyses"), ("post", "/v1/analyses/an-x/sign-off"), ("get", "/v1/deliveries"),
    ("post", "/v1/deliveries/1/retry"), ("post", "/dicomweb/studies"), ("get", "/v1/events"),
    ("get", "/v1/analyses/an-x/image"),
])
def test_protected_endpoints_answer_401_without_a_valid_token(secured, method, path) -> None:
    app, _ = secured
    client = app.test_client()
    for headers in ({}, _auth("lfx_not-a-token"), {"Authorization": "Basic Zm9vOmJhcg=="}):
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.mimetype in ("application/problem+json", "application/fhir+json")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_roles(secured) -> None:
    app, tokens = secured
    client = app.test_client()
    # device submits, cannot read or sign off
    accepted = _submit(client, tokens["device"])
    assert accepted.status_code == 202
    analysis_id = accepted.get_json()["id"]
    assert client.get("/v1/analyses", headers=_auth(tokens["device"])).status_code == 403
    assert client.get(f"/v1/analyses/{analysis_id}", headers=_auth(tokens["device"])).status_code == 403
    denied = client.post(f"/v1/analyses/{analysis_id}/sign-off", headers=_auth(tokens["device"]))
    assert denied.status_code == 403
    assert denied.get_json()["type"].endswith("access-denied")
    # clinician reads and may try to sign off (409: the analysis has not run), cannot submit
    assert _submit(client, tokens["clinician"]).status_code == 403
    listing = client.get("/v1/analyses", headers=_auth(tokens["clinician"]))
    assert listing.status_code == 200
    assert [a["id"] for a in listing.get_json()["analyses"]] == [analysis_id]
    assert client.get(f"/v1/analyses/{analysis_id}", headers=_auth(tokens["clinician"])).status_code == 200
    conflict = client.post(f"/v1/analyses/{analysis_id}/sign-off", headers=_auth(tokens["clinician"]))
    assert conflict.status_code == 409
    assert client.get("/v1/deliveries", headers=_auth(tokens["clinician"])).status_code == 200
    assert client.post("/v1/deliveries/1/retry", headers=_auth(tokens["clinician"])).status_code == 403
    # admin does everything
    assert _submit(client, tokens["admin"]).status_code == 202
    assert client.get("/v1/analyses", headers=_auth(tokens["admin"])).status_code == 200
    assert client.post("/v1/deliveries/1/retry", headers=_auth(tokens["admin"])).status_code == 404
    # the submitter is recorded by token name
    record = app.extensions["leuk_fhir"].store.get_analysis(analysis_id)
    assert record.submitted_by == "device one"


def test_event_stream_accepts_the_token_as_query_parameter(secured) -> None:
    app, tokens = secured
    client = app.test_client()
    assert client.get("/v1/events?access_token=wrong").status_code == 401
    response = client.get(f"/v1/events?access_token={tokens['clinician']}", buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert next(response.response).startswith(b"retry:")
    response.close()
    # query tokens are for GETs only
    assert client.post(f"/v1/analyses?access_token={tokens['device']}").status_code == 401


def test_tokens_are_stored_hashed_and_can_be_revoked(secured) -> None:
    app, tokens = secured
    store = app.extensions["leuk_fhir"].store
    raw = store.path.read_bytes() + b"".join(
        p.read_bytes() for p in store.path.parent.glob("service.sqlite3*"))
    for clear in tokens.values():
        assert clear.encode() not in raw
    with sqlite3.connect(store.path) as db:
        hashes = [r[0] for r in db.execute("SELECT token_sha256 FROM api_tokens")]
    assert all(len(h) == 64 for h in hashes)
    client = app.test_client()
    clinician = next(t for t in store.list_tokens() if t.role == "clinician")
    assert client.get("/v1/analyses", headers=_auth(tokens["clinician"])).status_code == 200
    store.revoke_token(clinician.id)
    assert client.get("/v1/analyses", headers=_auth(tokens["clinician"])).status_code == 401


def test_auth_off_lets_anyone_act_but_sign_off_needs_a_name(make_app) -> None:
    app = make_app()
    client = app.test_client()
    accepted = _submit(client)
    assert accepted.status_code == 202
    analysis_id = accepted.get_json()["id"]
    assert client.get("/v1/analyses").status_code == 200
    missing_name = client.post(f"/v1/analyses/{analysis_id}/sign-off", json={})
    assert missing_name.status_code == 400
    assert "signed_off_by" in missing_name.get_json()["detail"]


def test_rate_limit_answers_429_with_retry_after(make_app, settings) -> None:
    app = make_app(settings_=settings.replace(service__rate_limit_per_minute=5))
    client = app.test_client()
    statuses = [client.get("/v1/analyses").status_code for _ in range(7)]
    assert statuses[:5] == [200] * 5
    assert statuses[5:] == [429, 429]
    limited = client.get("/v1/analyses")
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.get_json()["type"].endswith("rate-limited")
    assert client.get("/healthz").status_code == 200  # health checks are never limited


def test_a_signed_in_clinician_cannot_sign_under_another_name_or_identifier(secured) -> None:
    app, tokens = secured
    client = app.test_client()
    for body in ({"practitioner_identifier": "NPI-9999-dr-house"}, {"signed_off_by": "Dr House"}):
        response = client.post("/v1/analyses/an-x/sign-off", json=body,
                               headers=_auth(tokens["clinician"]))
        assert response.status_code == 400, response.get_json()
        assert "token names who signs" in response.get_json()["detail"]
