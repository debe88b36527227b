"""Authentication to the EHR, SMART Backend Services against a real authlib token endpoint."""

from __future__ import annotations

import base64
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from leuk_fhir.delivery import EhrClient, SmartBackendAuth, auth_from_settings
from leuk_fhir.delivery.auth import BasicAuth, BearerAuth, NoAuth
from leuk_fhir.errors import AuthenticationError, ConfigurationError
from leuk_fhir.settings import FhirSettings

from .fhir_testservers import FaultProxy, SmartAuthServer, free_port  # type: ignore[import-not-found]

CLIENT_ID = "leuk-fhir-backend"


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def jwks(key, kid: str) -> dict:
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk = (RSAKey if isinstance(key, rsa.RSAPrivateKey) else ECKey).import_key(pub).as_dict(private=False)
    return {"keys": [{**jwk, "kid": kid}]}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def smart_env(rsa_key, ec_key):
    keys = jwks(rsa_key, "rsa-1")["keys"] + jwks(ec_key, "ec-1")["keys"]
    auth_server = SmartAuthServer(CLIENT_ID, {"keys": keys}).start()
    proxy = FaultProxy(None, token_check=auth_server.check,
                       smart_configuration={"token_endpoint": auth_server.token_url,
                                            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                                            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"]}).start()
    yield auth_server, proxy
    proxy.stop()
    auth_server.stop()


def test_smart_backend_token_discovered_cached_and_accepted(smart_env, rsa_key):
    auth_server, proxy = smart_env
    auth = SmartBackendAuth(client_id=CLIENT_ID, private_key_pem=pem(rsa_key), key_id="rsa-1",
                            scope="system/DiagnosticReport.c", fhir_base_url=proxy.base_url)
    client = EhrClient(proxy.base_url, auth)
    caps = client.capabilities()
    assert caps.fhir_version == "4.0.1"
    assert auth.token_url == auth_server.token_url  # from .well-known/smart-configuration
    client._capabilities = None
    client.capabilities()
    assert auth.tokens_fetched == 1, "the token is cached between requests"
    assertion = auth_server.assertions[0]
    assert assertion["header"]["alg"] == "RS384" and assertion["header"]["kid"] == "rsa-1"
    claims = assertion["claims"]
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == auth_server.token_url
    assert 0 < claims["exp"] - claims["iat"] <= 300 and claims["jti"]
    assert proxy.log.authorizations[-1].startswith("Bearer ")
    assert auth_server.check(proxy.log.authorizations[-1])


def test_401_fetches_a_fresh_token_once(smart_env, ec_key):
    auth_server, proxy = smart_env
    auth = SmartBackendAuth(client_id=CLIENT_ID, private_key_pem=pem(ec_key), key_id="ec-1",
                            scope="system/Observation.c", token_url=auth_server.token_url)
    assert auth.algorithm == "ES384"
    client = EhrClient(proxy.base_url, auth)
    client.capabilities()
    first = proxy.log.authorizations[-1]
    auth_server.revoke_all()  # the EHR forgets the token: next request answers 401
    client._capabilities = None
    client.capabilities()
    assert auth.tokens_fetched == 2
    assert proxy.log.authorizations[-2] == first and proxy.log.authorizations[-1] != first
    assert len(auth_server.seen_jti) == 2, "every assertion has a fresh jti"


def test_token_is_renewed_before_expiry(rsa_key):
    auth_server = SmartAuthServer(CLIENT_ID, jwks(rsa_key, "k"), expires_in=2).start()
    try:
        auth = SmartBackendAuth(client_id=CLIENT_ID, private_key_pem=pem(rsa_key), key_id="k",
                                scope="system/Patient.c", token_url=auth_server.token_url)
        t1 = auth.access_token()
        assert auth.access_token() == t1  # still fresh (renewed 1 s before its 2 s life ends)
        time.sleep(1.2)
        t2 = auth.access_token()
        assert t2 != t1 and auth.tokens_fetched == 2
        assert auth_server.check(f"Bearer {t2}")
    finally:
        auth_server.stop()


def test_unregistered_key_is_refused_with_a_clear_error(smart_env):
    auth_server, proxy = smart_env
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = SmartBackendAuth(client_id=CLIENT_ID, private_key_pem=pem(other), key_id="rsa-1",
                            scope="system/Patient.c", token_url=auth_server.token_url)
    with pytest.raises(AuthenticationError, match="refused client"):
        auth.access_token()
    unknown = SmartBackendAuth(client_id="someone-else", private_key_pem=pem(other),
                               scope="system/Patient.c", token_url=auth_server.token_url)
    with pytest.raises(AuthenticationError, match="HTTP 401|HTTP 400"):
        unknown.access_token()


def test_static_bearer_and_basic_headers(tmp_path):
    proxy = FaultProxy(None).start()
    try:
        EhrClient(proxy.base_url, BearerAuth("s3cret")).capabilities()
        assert proxy.log.authorizations[-1] == "Bearer s3cret"
        EhrClient(proxy.base_url, BasicAuth("lab", "pw")).capabilities()
        assert proxy.log.authorizations[-1] == "Basic " + base64.b64encode(b"lab:pw").decode()
        EhrClient(proxy.base_url, NoAuth()).capabilities()
        assert proxy.log.authorizations[-1] == ""
    finally:
        proxy.stop()


def test_auth_settings_errors(tmp_path, rsa_key):
    with pytest.raises(ConfigurationError):
        auth_from_settings(FhirSettings(auth="kerberos"))
    with pytest.raises(ConfigurationError):
        auth_from_settings(FhirSettings(auth="bearer"))
    with pytest.raises(ConfigurationError):
        auth_from_settings(FhirSettings(auth="smart-backend", client_id="x", base_url="http://127.0.0.1:1/fhir"))
    key = tmp_path / "key.pem"
    key.write_bytes(pem(rsa_key))
    auth = auth_from_settings(FhirSettings(auth="smart-backend", client_id="x", private_key_path=key,
                                           base_url="http://127.0.0.1:1/fhir"))
    assert isinstance(auth, SmartBackendAuth) and auth.algorithm == "RS384"
    key.write_text("not a key")
    with pytest.raises(ConfigurationError, match="private key"):
        auth_from_settings(FhirSettings(auth="smart-backend", client_id="x", private_key_path=key,
                                        base_url="http://127.0.0.1:1/fhir"))
    with pytest.raises(ConfigurationError):
        EhrClient.from_settings(FhirSettings())


def _self_signed(tmp_path):
    import datetime as dt
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, cert_file


def test_tls_is_verified_and_a_custom_ca_bundle_is_honoured(tmp_path):
    from leuk_fhir.delivery import EhrUnavailableError

    ctx, ca = _self_signed(tmp_path)
    proxy = FaultProxy(None, ssl_context=ctx).start()
    try:
        assert proxy.base_url.startswith("https://")
        with pytest.raises(EhrUnavailableError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            EhrClient.from_settings(FhirSettings(base_url=proxy.base_url)).capabilities()
        caps = EhrClient.from_settings(FhirSettings(base_url=proxy.base_url, ca_bundle=ca)).capabilities()
        assert caps.fhir_version == "4.0.1"
        with pytest.raises(ConfigurationError, match="ca_bundle"):
            EhrClient.from_settings(FhirSettings(base_url=proxy.base_url, ca_bundle=tmp_path / "missing.pem"))
    finally:
        proxy.stop()


@pytest.mark.parametrize("route,answer", [
    ("/.well-known/smart-configuration", (200, ["token_endpoint"])),
    ("/token", (200, {"access_token": "t", "expires_in": None})),
    ("/token", (200, {"access_token": "t", "expires_in": [3600]})),
    ("/token", (200, {"access_token": ["t"], "expires_in": 3600})),
    ("/token", (400, ["invalid_client"])),
])
def test_malformed_smart_answers_are_authentication_errors(rsa_key, route, answer):
    proxy = FaultProxy(None, port=free_port()).start()
    try:
        proxy.routes[route] = answer
        if route == "/token":
            proxy.routes["/.well-known/smart-configuration"] = (200, {"token_endpoint": f"http://127.0.0.1:{proxy.port}/token"})
        auth = SmartBackendAuth(client_id=CLIENT_ID, private_key_pem=pem(rsa_key), scope="system/Patient.c",
                                fhir_base_url=proxy.base_url)
        with pytest.raises(AuthenticationError, match="SMART token endpoint|token endpoint"):
            EhrClient(proxy.base_url, auth).capabilities()
        assert proxy.log.authorizations == [], "no request without a token"
    finally:
        proxy.stop()


def test_plain_http_to_another_host_is_warned_about_once(caplog):
    """Reports and credentials over http:// to another machine travel unencrypted: the client
    says so once per base URL; loopback and https:// are quiet."""
    caplog.set_level("WARNING", logger="leuk_fhir.delivery.client")
    for url in ("https://ehr.example.org/fhir", "http://127.0.0.1:8080/fhir",
                "http://localhost/fhir", "http://[::1]:8080/fhir"):
        EhrClient(url)
    assert not caplog.records
    EhrClient("http://ehr-warn-test.example.org/fhir")
    EhrClient("http://ehr-warn-test.example.org/fhir")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "unencrypted" in warnings[0]
    assert "http://ehr-warn-test.example.org/fhir" in warnings[0]
