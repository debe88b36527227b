"""`leuk-fhir` sub-commands of the fhir family: report, push, outbox.

Thin over the library: :func:`leuk_fhir.fhir.build_report_bundle`,
:class:`leuk_fhir.delivery.EhrClient`, :class:`leuk_fhir.delivery.Outbox` and
:class:`leuk_fhir.delivery.OutboxSender`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from leuk_fhir.errors import ConfigurationError, ConflictError, InputError

REPORT_KIND = "report"
#: `outbox drain` exit codes: deliveries still pending / deliveries that became dead letters.
EXIT_PENDING = 6
EXIT_DEAD = 7


def _settings(args: argparse.Namespace) -> Any:
    from leuk_fhir.settings import load_settings

    settings = load_settings(getattr(args, "config", None))
    changes: dict[str, Any] = {}
    if getattr(args, "fhir_base", None):
        changes["fhir__base_url"] = args.fhir_base
    if getattr(args, "auth", None):
        changes["fhir__auth"] = args.auth
    if getattr(args, "bearer_token", None):
        changes["fhir__bearer_token"] = args.bearer_token
    if getattr(args, "timeout", None):
        changes["fhir__timeout_s"] = args.timeout
    if getattr(args, "lease", None):
        changes["outbox__lease_s"] = args.lease
    return settings.replace(**changes) if changes else settings


def _outbox_path(args: argparse.Namespace, settings: Any) -> Path:
    return Path(args.outbox) if getattr(args, "outbox", None) else Path(settings.data_dir) / "outbox.sqlite"


def _read_bundle(path: Path) -> dict[str, Any]:
    try:
        bundle = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise InputError(f"{path} is not a FHIR transaction Bundle")
    return bundle


def _report_key(bundle: dict[str, Any]) -> str:
    for e in bundle.get("entry", []):
        res = e.get("resource", {})
        if res.get("resourceType") == "DiagnosticReport" and res.get("identifier"):
            return f"{res['identifier'][0]['value']}/{REPORT_KIND}"
    for e in bundle.get("entry", []):
        res = e.get("resource", {})
        if res.get("identifier"):
            return f"{res['identifier'][0]['value']}/{res['resourceType'].lower()}"
    raise InputError("the Bundle has no identified resource to key the delivery on")


# ------------------------------------------------------------------ report


def _cmd_report(args: argparse.Namespace) -> int:
    from leuk_fhir.acquisition import PatientInfo
    from leuk_fhir.adapters import open_acquisition
    from leuk_fhir.analysis import analyze
    from leuk_fhir.fhir import build_report_bundle
    from leuk_fhir.model import load_classifier

    settings = _settings(args)
    model_path = args.model or settings.model.path
    classifier = load_classifier(model_path, device=settings.model.device, batch_size=settings.model.batch_size)
    images: list[Path] = args.images
    out = Path(args.out)
    if len(images) > 1:
        out.mkdir(parents=True, exist_ok=True)
    for image in images:
        acq = open_acquisition(image, image_settings=settings.image)
        try:
            p = acq.patient
            patient = PatientInfo(
                identifier=args.patient_id or p.identifier,
                identifier_system=args.patient_system or p.identifier_system,
                name=args.patient_name or p.name,
                birth_date=date.fromisoformat(args.patient_birth_date) if args.patient_birth_date else p.birth_date,
                sex=args.patient_sex or p.sex,
            )
            specimen = acq.specimen
            if args.specimen_id:
                specimen = dataclasses.replace(specimen, identifier=args.specimen_id)
            acq = dataclasses.replace(acq, patient=patient, specimen=specimen)
            findings = analyze(acq, classifier, settings.image)
            rb = build_report_bundle(findings, settings.fhir, include_pdf=not args.no_pdf)
        finally:
            acq.pixels.close()
        target = out / f"{image.stem}.bundle.json" if len(images) > 1 else out
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(rb.bundle, indent=1), encoding="utf-8")
        if args.pdf and rb.pdf:
            pdf_path = Path(args.pdf) if len(images) == 1 else Path(args.pdf) / f"{image.stem}.pdf"
            pdf_path.parent.mkdir(parents=True, exist_ok=True)
            pdf_path.write_bytes(rb.pdf)
        if args.html:
            html_path = Path(args.html) if len(images) == 1 else Path(args.html) / f"{image.stem}.html"
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(rb.html, encoding="utf-8")
        pct = findings.blast_percentage
        print(f"{image}: {findings.outcome.value}, {len(findings.cells)} cell(s), blasts "
              f"{'n/a' if pct is None else f'{pct:.1f}%'}, report {rb.report_identifier} -> {target}")
    return 0


# ------------------------------------------------------------------ push


def _cmd_push(args: argparse.Namespace) -> int:
    from leuk_fhir.delivery import EhrClient, Outbox

    settings = _settings(args)
    bundle = _read_bundle(args.bundle)
    if args.queue:
        key = args.key or _report_key(bundle)
        with Outbox(_outbox_path(args, settings), lease_s=settings.outbox.lease_s) as outbox:
            did = outbox.enqueue(key, bundle, args.kind)
            d = outbox.get(did)
        if d.bundle != bundle:
            raise ConflictError(f"key {key!r} is already in the outbox as delivery {did} ({d.status.value}) "
                                "with a different Bundle; this Bundle was NOT queued",
                                hint="use --key to queue it under another key")
        print(f"queued as delivery {did} ({d.status.value})")
        return 0
    if not settings.fhir.base_url:
        raise ConfigurationError("no EHR given", hint="--fhir-base URL or fhir.base_url")
    client = EhrClient.from_settings(settings.fhir)
    try:
        result = client.post_transaction(bundle)
    finally:
        client.close()
    print(f"HTTP {result.status}: {result.created} created, {len(result.entry_statuses) - result.created} "
          "matched or updated")
    for status, location in zip(result.entry_statuses, result.locations, strict=False):
        print(f"  {status:<12} {location}")
    return 0


# ------------------------------------------------------------------ outbox


def _open_outbox(args: argparse.Namespace) -> tuple[Any, Any]:
    """The settings and the existing outbox (a mistyped path is an error, not a new outbox)."""
    from leuk_fhir.delivery import Outbox

    settings = _settings(args)
    return settings, Outbox(_outbox_path(args, settings), lease_s=settings.outbox.lease_s, create=False)


def _cmd_outbox_list(args: argparse.Namespace) -> int:
    _, outbox = _open_outbox(args)
    with outbox:
        rows = outbox.list(args.status, limit=args.limit)
        if args.json:
            print(json.dumps([d.as_dict() for d in rows], indent=1))
            return 0
        print(f"{'id':>6} {'status':<10} {'kind':<14} {'tries':>5} {'http':>4}  key / last error")
        for d in rows:
            print(f"{d.id:>6} {d.status.value:<10} {d.kind:<14} {d.attempts:>5} {d.last_status or '':>4}  {d.key}")
            if d.last_error and d.status.value != "delivered":
                print(f"{'':>44}{d.last_error[:160]}")
        print(json.dumps(outbox.stats()))
    return 0


def _cmd_outbox_show(args: argparse.Namespace) -> int:
    _, outbox = _open_outbox(args)
    with outbox:
        d = outbox.get(args.id)
    print(json.dumps(d.as_dict(with_bundle=args.bundle), indent=1))
    return 0


def _cmd_outbox_retry(args: argparse.Namespace) -> int:
    _, outbox = _open_outbox(args)
    with outbox:
        ids = args.ids or [d.id for d in outbox.list("dead", limit=100_000)] if args.all_dead else args.ids
        if not ids:
            raise InputError("give delivery ids or --all-dead")
        for i in ids:
            d = outbox.retry(i)
            print(f"delivery {d.id} ({d.key}) is {d.status.value}")
    return 0


def _cmd_outbox_drain(args: argparse.Namespace) -> int:
    from leuk_fhir.delivery import EhrClient, OutboxSender

    settings, outbox = _open_outbox(args)
    with outbox:
        client = EhrClient.from_settings(settings.fhir)
        try:
            dead_before = {d.id for d in outbox.list("dead", limit=1_000_000)}
            stats = OutboxSender(outbox, client, settings.outbox).drain(timeout_s=args.timeout_drain)
            new_dead = [d for d in outbox.list("dead", limit=1_000_000) if d.id not in dead_before]
            blocked = outbox.blocked()
        finally:
            client.close()
    print(json.dumps(stats))
    for d in reversed(new_dead):
        print(f"delivery {d.id} ({d.key}) is now a dead letter: {(d.last_error or '')[:200]}", file=sys.stderr)
    for d in blocked:
        print(f"delivery {d.id} ({d.key}) is blocked: it waits for {d.depends_on!r}, not delivered yet",
              file=sys.stderr)
    if new_dead:
        return EXIT_DEAD
    return 0 if stats["pending"] == 0 and stats["sending"] == 0 else EXIT_PENDING


# ------------------------------------------------------------------ wiring


def _ehr_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fhir-base", help="EHR FHIR base URL (default: fhir.base_url)")
    p.add_argument("--auth", choices=["none", "bearer", "basic", "smart-backend"],
                   help="authentication scheme (default: fhir.auth)")
    p.add_argument("--bearer-token", help="static bearer token (for --auth bearer); other users "
                   "of this machine can read command lines, so prefer LEUK_FHIR_FHIR_BEARER_TOKEN "
                   "or fhir.bearer_token in a settings file only you can read")
    p.add_argument("--timeout", type=float, help="HTTP timeout in seconds")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this family's sub-commands."""
    p = subparsers.add_parser("report", help="analyse images and write a FHIR transaction Bundle",
                              description="Classify the images and write one FHIR R4 transaction Bundle "
                              "per image (AI-generated, status preliminary).")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--model", type=Path, help="model artifact (.lfm); default: model.path or the demo model")
    p.add_argument("--out", required=True, type=Path,
                   help="Bundle JSON file (a directory when several images are given)")
    p.add_argument("--pdf", type=Path, help="also write the PDF report here")
    p.add_argument("--html", type=Path, help="also write the HTML report here")
    p.add_argument("--no-pdf", action="store_true", help="leave the PDF out of the Bundle")
    p.add_argument("--patient-id", help="patient identifier (default: from DICOM headers)")
    p.add_argument("--patient-system", help="patient identifier system (default: fhir.patient_identifier_system)")
    p.add_argument("--patient-name", help='patient name, "Family^Given"')
    p.add_argument("--patient-birth-date", help="YYYY-MM-DD")
    p.add_argument("--patient-sex", help="M, F, O or U")
    p.add_argument("--specimen-id", help="specimen identifier (accession of the smear)")
    p.set_defaults(handler=_cmd_report)

    p = subparsers.add_parser("push", help="send a transaction Bundle to the EHR (or queue it)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE.json")
    _ehr_options(p)
    p.add_argument("--queue", action="store_true", help="put it in the outbox instead of sending now")
    p.add_argument("--outbox", type=Path, help="outbox file (default: DATA_DIR/outbox.sqlite)")
    p.add_argument("--key", help="outbox key (default: the DiagnosticReport identifier)")
    p.add_argument("--kind", default=REPORT_KIND, help="outbox kind label")
    p.set_defaults(handler=_cmd_push)

    p = subparsers.add_parser("outbox", help="inspect and operate the delivery outbox")
    sub = p.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--outbox", type=Path, help="outbox file (default: DATA_DIR/outbox.sqlite)")

    q = sub.add_parser("list", help="list deliveries (newest first)")
    common(q)
    q.add_argument("--status", choices=["pending", "sending", "delivered", "dead"])
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_cmd_outbox_list)
    q = sub.add_parser("show", help="show one delivery with its last error and OperationOutcome")
    common(q)
    q.add_argument("id", type=int)
    q.add_argument("--bundle", action="store_true", help="include the Bundle")
    q.set_defaults(handler=_cmd_outbox_show)
    q = sub.add_parser("retry", help="resubmit dead letters")
    common(q)
    q.add_argument("ids", type=int, nargs="*")
    q.add_argument("--all-dead", action="store_true")
    q.set_defaults(handler=_cmd_outbox_retry)
    q = sub.add_parser("drain", help="send everything pending now, waiting out back-offs")
    common(q)
    _ehr_options(q)
    q.add_argument("--timeout-drain", "--for", dest="timeout_drain", type=float, default=None,
                   help="stop after this many seconds (default: until empty)")
    q.add_argument("--lease", type=float, help="lease of a claimed delivery, seconds")
    q.set_defaults(handler=_cmd_outbox_drain)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the leuk-fhir console script")
