"""`leuk-fhir` sub-commands of the adapters family.

- ``inspect FILE``: what leuk-fhir reads from a file (format, scope, levels, metadata);
  ``inspect --plugins`` lists optional codecs and back-ends.
- ``analyze FILE...``: detect, classify and count white cells; ``--json`` for machines.
- ``dicom-listen``: run the C-STORE SCP alone (analysing what arrives with ``--analyze``).
- ``pull --dicomweb URL --study UID``: fetch a study from a PACS over DICOMweb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this family's sub-commands."""
    p = subparsers.add_parser(
        "inspect", help="show what leuk-fhir reads from an image, DICOM file or slide"
    )
    p.add_argument("files", type=Path, nargs="*", metavar="FILE", help="file or DICOM study folder")
    p.add_argument(
        "--plugins", action="store_true", help="list optional codecs/back-ends and their status"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_inspect)

    p = subparsers.add_parser(
        "analyze", help="count white cells and blasts in images, DICOM files or slides"
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--scope", choices=["cell", "field", "slide"], help="override the guessed scope")
    p.add_argument(
        "--model", type=Path, help="model file (default: settings, else the bundled demo model)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON document with per-cell evidence"
    )
    p.set_defaults(handler=_analyze)

    p = subparsers.add_parser("dicom-listen", help="run the DICOM C-STORE SCP alone (Ctrl-C stops)")
    p.add_argument("--dicom-port", type=_port, help="TCP port (default: settings dicom.port, 11112)")
    p.add_argument("--ae-title", help="our AE title (default: settings dicom.ae_title)")
    p.add_argument("--host", help="address to bind (default: settings dicom.host)")
    p.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="AET",
        help="allowed calling AE title (repeatable)",
    )
    p.add_argument("--spool", type=Path, help="spool folder (default: <data_dir>/spool/dicom)")
    p.add_argument(
        "--analyze",
        action="store_true",
        help="analyse each received instance and print a JSON line",
    )
    p.set_defaults(handler=_dicom_listen)

    p = subparsers.add_parser(
        "pull", help="fetch a study from a PACS over DICOMweb (QIDO-RS + WADO-RS)"
    )
    p.add_argument(
        "--dicomweb",
        required=True,
        metavar="URL",
        help="DICOMweb base URL, e.g. http://pacs/dicom-web",
    )
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--spool", type=Path, help="spool folder (default: <data_dir>/spool/dicomweb)")
    p.add_argument("--analyze", action="store_true", help="analyse the pulled study")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_pull)


def _port(text: str) -> int:
    """argparse type of a TCP port: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535, not {port}")
    return port


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def describe_acquisition(acq: Any) -> dict[str, Any]:
    """Acquisition metadata as a JSON-ready dict (pixels summarised, not read)."""
    px = acq.pixels
    return {
        "source_id": acq.source_id,
        "filename": acq.filename,
        "media_type": acq.media_type,
        "scope": str(acq.scope),
        "transport": str(acq.transport),
        "frames": px.frame_count,
        "levels": [
            {"width": lv.width, "height": lv.height, "downsample": lv.downsample}
            for lv in px.levels
        ],
        "microns_per_pixel": px.microns_per_pixel,
        "acquired_at": _jsonable(acq.acquired_at),
        "patient": _jsonable(acq.patient),
        "specimen": _jsonable(acq.specimen),
        "device": _jsonable(acq.device),
        "dicom": _jsonable(acq.dicom),
        "content_sha256": acq.content_sha256,
    }


def _inspect(args: argparse.Namespace) -> int:
    from leuk_fhir.adapters import open_acquisition
    from leuk_fhir.settings import load_settings

    if args.plugins:
        from leuk_fhir.adapters.plugins import all_statuses

        rows = all_statuses()
        if args.json:
            print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        else:
            for r in rows:
                state = "available" if r.available else f"MISSING ({r.install_hint})"
                print(f"{r.name:40s} {state:12s} {r.provides}")
        if not args.files:
            return 0
    if not args.files:
        print("leuk-fhir inspect: give a FILE or --plugins", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    docs = []
    for path in args.files:
        acq = open_acquisition(path, image_settings=settings.image)
        try:
            docs.append(describe_acquisition(acq))
        finally:
            acq.pixels.close()
    if args.json:
        print(json.dumps(docs if len(docs) > 1 else docs[0], indent=2))
    else:
        for doc in docs:
            for key, value in doc.items():
                print(f"{key:18s} {json.dumps(value) if isinstance(value, dict | list) else value}")
            print()
    return 0


def _load_classifier(args: argparse.Namespace, settings: Any) -> Any:
    from leuk_fhir.model import load_classifier

    return load_classifier(
        getattr(args, "model", None) or settings.model.path,
        device=settings.model.device,
        batch_size=settings.model.batch_size,
    )


def _analyze(args: argparse.Namespace) -> int:
    from leuk_fhir.acquisition import Scope
    from leuk_fhir.adapters import open_acquisition
    from leuk_fhir.analysis import analyze, findings_summary
    from leuk_fhir.errors import LeukFhirError
    from leuk_fhir.settings import load_settings

    settings = load_settings(args.config)
    classifier = _load_classifier(args, settings)
    results: list[dict[str, Any]] = []
    failures = 0
    exit_code = 0
    for path in args.files:
        try:
            acq = open_acquisition(
                path, image_settings=settings.image, scope=Scope(args.scope) if args.scope else None
            )
            try:
                summary = findings_summary(
                    analyze(acq, classifier, settings.image), cells=args.json
                )
            finally:
                acq.pixels.close()
        except LeukFhirError as exc:
            failures += 1
            exit_code = exit_code or exc.exit_code
            results.append({"file": str(path), "error": exc.code, "message": str(exc)})
            if not args.json:
                print(f"{path}: error: {exc}", file=sys.stderr)
            continue
        summary["file"] = str(path)
        results.append(summary)
        if not args.json:
            pct = summary["blast_percentage"]
            pct_text = "n/a" if pct is None else f"{pct:.1f}%"
            print(
                f"{path}: {summary['scope']}, {summary['cells_total']} cells "
                f"({summary['cells_classified']} classified), blasts {summary['blast_count']} = {pct_text}, "
                f"{summary['outcome']} [{summary['model']['name']} {summary['model']['version']}"
                f"{', DEMO model' if summary['model']['is_demo'] else ''}; AI-generated, preliminary]"
            )
    if args.json:
        print(json.dumps({"results": results, "failed": failures}, indent=2))
    return exit_code


def _dicom_listen(args: argparse.Namespace) -> int:
    from leuk_fhir.adapters.dicom_scp import CStoreReceiver
    from leuk_fhir.commands import interrupt_on_stop_signals
    from leuk_fhir.settings import load_settings

    settings = load_settings(args.config)
    dicom = settings.dicom
    changes: dict[str, Any] = {}
    if args.dicom_port is not None:
        changes["port"] = args.dicom_port
    if args.ae_title:
        changes["ae_title"] = args.ae_title
    if args.host:
        changes["host"] = args.host
    if args.allow:
        changes["allowed_calling_aes"] = tuple(args.allow)
    dicom = dataclasses.replace(dicom, **changes)
    spool = args.spool or settings.data_dir / "spool" / "dicom"
    classifier = _load_classifier(args, settings) if args.analyze else None
    lock = threading.Lock()

    def on_instance(path: Path, ref: Any) -> None:
        from leuk_fhir.acquisition import Transport
        from leuk_fhir.adapters import open_acquisition
        from leuk_fhir.analysis import analyze, findings_summary

        line: dict[str, Any] = {"received": str(path), "dicom": _jsonable(ref)}
        if classifier is not None:
            acq = open_acquisition(
                path,
                image_settings=settings.image,
                transport=Transport.C_STORE,
                calling_ae_title=ref.calling_ae_title,
            )
            try:
                line["findings"] = findings_summary(
                    analyze(acq, classifier, settings.image), cells=False
                )
            finally:
                acq.pixels.close()
        with lock:
            print(json.dumps(line), flush=True)

    rx = CStoreReceiver(dicom, spool, on_instance, image_settings=settings.image)
    interrupt_on_stop_signals()
    rx.start()
    print(
        f"leuk-fhir: DICOM C-STORE SCP {dicom.ae_title} on {dicom.host}:{rx.port}, spooling to {spool}",
        file=sys.stderr,
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        rx.stop()
    return 0


def _pull(args: argparse.Namespace) -> int:
    from leuk_fhir.acquisition import Transport
    from leuk_fhir.adapters import open_acquisition
    from leuk_fhir.adapters.dicomweb_pull import pull_study
    from leuk_fhir.settings import load_settings

    settings = load_settings(args.config)
    spool = args.spool or settings.data_dir / "spool" / "dicomweb"
    pulled = pull_study(args.dicomweb, args.study, spool, image_settings=settings.image)
    doc: dict[str, Any] = {
        "study_uid": pulled.study_uid,
        "stored": [str(p) for p, _ in pulled.stored],
        "skipped": [{"sop_instance_uid": uid, "reason": why} for uid, why in pulled.skipped],
    }
    if args.analyze and pulled.study_dir is not None:
        from leuk_fhir.analysis import analyze, findings_summary

        acq = open_acquisition(
            pulled.study_dir, image_settings=settings.image, transport=Transport.DICOMWEB_PULL
        )
        try:
            doc["findings"] = findings_summary(
                analyze(acq, _load_classifier(args, settings), settings.image), cells=args.json
            )
        finally:
            acq.pixels.close()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"study {pulled.study_uid}: {len(pulled.stored)} instance(s) stored under {spool}, {len(pulled.skipped)} skipped"
        )
        for item in doc["skipped"]:
            print(f"  skipped {item['sop_instance_uid']}: {item['reason']}")
        if "findings" in doc:
            f = doc["findings"]
            print(
                f"  {f['cells_total']} cells, blast percentage {f['blast_percentage']}, {f['outcome']}"
            )
    return 0
