"""`leuk-fhir` sub-commands of the service family: ``serve``, ``token``, ``sample-image``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this family's sub-commands."""
    serve = subparsers.add_parser(
        "serve",
        help="run the service: HTTP API + clinician page, DICOM listener, outbox sender",
        description="Run leuk-fhir on embedded defaults (SQLite under --data-dir, the bundled "
        "model, a DICOM C-STORE listener, an outbox sender when an EHR is configured). EHR "
        "credentials come from the environment (LEUK_FHIR_FHIR_*) or --config.",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    serve.add_argument("--dicom-port", type=int, help="DICOM C-STORE port (default 11112)")
    serve.add_argument("--no-dicom", action="store_true", help="do not start the DICOM listener")
    serve.add_argument("--data-dir", type=Path, help="where analyses, tokens and the outbox live")
    serve.add_argument("--fhir-base", help="EHR FHIR base URL; reports are sent there")
    serve.add_argument("--model", type=Path, help="model artifact (default: the bundled DEMO model)")
    serve.add_argument("--workers", type=int, help="analysis worker threads (default 2)")
    serve.add_argument("--require-auth", action="store_true",
                       help="require API tokens (always on when listening beyond loopback)")
    serve.set_defaults(handler=_serve)

    token = subparsers.add_parser("token", help="manage API tokens (device, clinician, admin)")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--role", required=True, choices=("device", "clinician", "admin"))
    create.add_argument("--name", required=True, help='who or what holds it, e.g. "Dr X"')
    create.add_argument("--data-dir", type=Path)
    create.set_defaults(handler=_token_create)
    listing = token_sub.add_parser("list", help="list tokens (never their secret)")
    listing.add_argument("--data-dir", type=Path)
    listing.set_defaults(handler=_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("token_id")
    revoke.add_argument("--data-dir", type=Path)
    revoke.set_defaults(handler=_token_revoke)

    sample = subparsers.add_parser(
        "sample-image", help="write a synthetic blood-cell image to try the service with"
    )
    sample.add_argument("output", type=Path, help="PNG file to write")
    sample.add_argument("--kind", choices=("blast", "normal", "field"), default="blast",
                        help="a lymphoblast-like cell, a lymphocyte-like cell, or a smear field")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample_image)


def _settings(args: argparse.Namespace) -> Any:
    from leuk_fhir.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    changes: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        changes["data_dir"] = args.data_dir
    for option, key in (("host", "service__host"), ("port", "service__port"),
                        ("dicom_port", "dicom__port"), ("fhir_base", "fhir__base_url"),
                        ("model", "model__path"), ("workers", "service__workers")):
        value = getattr(args, option, None)
        if value is not None:
            changes[key] = value
    if getattr(args, "no_dicom", False):
        changes["dicom__enabled"] = False
    if getattr(args, "require_auth", False):
        changes["service__require_auth"] = True
    return settings.replace(**changes) if changes else settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import waitress

    from leuk_fhir.commands import interrupt_on_stop_signals
    from leuk_fhir.errors import ConfigurationError
    from leuk_fhir.service import create_app
    from leuk_fhir.service.events import MAX_STREAMS

    settings = _settings(args)
    service_settings = settings.service
    if not service_settings.require_auth and not _is_loopback(service_settings.host):
        raise ConfigurationError(
            f"refusing to listen on {service_settings.host} without authentication",
            hint="add --require-auth (and create tokens with 'leuk-fhir token create')",
        )
    logging.getLogger("leuk_fhir").setLevel(min(logging.INFO, logging.getLogger().level))
    app = create_app(settings)
    service = app.extensions["leuk_fhir"]
    server = waitress.create_server(
        app,
        host=service_settings.host,
        port=service_settings.port,
        # Each open page holds one thread for its event stream (at most MAX_STREAMS of them);
        # requests always have the other 16 + workers.
        threads=16 + service_settings.workers + MAX_STREAMS,
        # Above Flask's limit, so that Flask answers an oversized request with a problem+json
        # 413 (its declared length is refused before the body is read).
        max_request_body_size=service_settings.max_request_bytes + 1024 * 1024,
        ident="leuk-fhir",
        clear_untrusted_proxy_headers=True,
    )
    port = server.effective_port  # type: ignore[union-attr]
    url = f"http://{service_settings.host}:{port}/"
    print(f"leuk-fhir: serving {url} (API {url}v1, OpenAPI {url}openapi.json)", flush=True)
    if service.dicom_receiver is not None:
        print(f"leuk-fhir: DICOM C-STORE listener {settings.dicom.ae_title} on "
              f"{settings.dicom.host}:{service.dicom_receiver.port}", flush=True)
    print(f"leuk-fhir: data in {Path(settings.data_dir).resolve()}; EHR: "
          f"{settings.fhir.base_url or 'none (reports stay in the outbox)'}; authentication "
          f"{'required' if service_settings.require_auth else 'OFF (loopback demo)'}", flush=True)

    interrupt_on_stop_signals()
    try:
        server.run()
    except KeyboardInterrupt:
        print("leuk-fhir: stopping", file=sys.stderr, flush=True)
    finally:
        # End the event streams, and let their threads finish writing, before the sockets close.
        service.broker.close(wait_s=5.0)
        time.sleep(0.2)
        server.close()
        service.stop()
    return 0


def _store(args: argparse.Namespace) -> Any:
    from leuk_fhir.service.store import ServiceStore

    return ServiceStore(Path(_settings(args).data_dir) / "service.sqlite3")


def _token_create(args: argparse.Namespace) -> int:
    token, clear = _store(args).create_token(name=args.name, role=args.role)
    print(f"created {token.role} token {token.id} for {token.name!r}; shown once, keep it safe:",
          file=sys.stderr)
    print(clear)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    for token in _store(args).list_tokens():
        state = f"revoked {token.revoked_at}" if token.revoked_at else "active"
        print(f"{token.id}\t{token.role}\t{token.name}\t{token.created_at}\t{state}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    _store(args).revoke_token(args.token_id)
    print(f"revoked {args.token_id}")
    return 0


def _sample_image(args: argparse.Namespace) -> int:
    from PIL import Image

    if args.kind == "field":
        from leuk_fhir.adapters.synthetic import synthetic_smear_field

        pixels, _ = synthetic_smear_field(seed=args.seed)
    else:
        from leuk_fhir.model.synthetic import generate_cell

        pixels = generate_cell(args.kind, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(args.output, format="PNG")
    print(f"wrote a synthetic {args.kind} image to {args.output} (not a real patient image)")
    return 0
