"""The `leuk-fhir report | push | outbox` commands, thin over the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leuk_fhir.cli import main
from leuk_fhir.delivery import Outbox
from leuk_fhir.fhir import build_report_bundle

from .conftest import make_findings  # type: ignore[import-not-found]
from .fhir_testservers import Fault, FaultProxy  # type: ignore[import-not-found]

BCCD = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "bccd" / "BCCD" / "JPEGImages"


def test_push_refuses_a_file_that_is_not_a_transaction(tmp_path, capsys):
    bad = tmp_path / "b.json"
    bad.write_text('{"resourceType": "Patient"}')
    assert main(["push", str(bad), "--fhir-base", "http://127.0.0.1:9/fhir"]) == 3
    assert "not a FHIR transaction Bundle" in capsys.readouterr().err
    bad.write_text("{truncated")
    assert main(["push", str(bad), "--fhir-base", "http://127.0.0.1:9/fhir"]) == 3


def test_outbox_commands_on_a_dead_letter(tmp_path, fhir_settings, capsys):
    rb = build_report_bundle(make_findings(), fhir_settings, include_pdf=False)
    bundle_file = tmp_path / "bundle.json"
    bundle_file.write_text(json.dumps(rb.bundle))
    outbox = tmp_path / "o.sqlite"
    assert main(["push", str(bundle_file), "--queue", "--outbox", str(outbox)]) == 0
    proxy = FaultProxy(None).start()
    try:
        proxy.inject(Fault("status", 422, outcome={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "Profile violation"}]}))
        code = main(["outbox", "drain", "--outbox", str(outbox), "--fhir-base", proxy.base_url, "--for", "10"])
    finally:
        proxy.stop()
    assert code == 7, "new dead letters make the drain fail"
    assert "delivery 1" in capsys.readouterr().err
    assert main(["outbox", "list", "--outbox", str(outbox), "--status", "dead"]) == 0
    out = capsys.readouterr().out
    assert f"{rb.report_identifier}/report" in out and "dead" in out and "Profile violation" in out
    assert main(["outbox", "show", "1", "--outbox", str(outbox)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["last_status"] == 422 and shown["operation_outcome"]["issue"][0]["code"] == "invalid"
    assert main(["outbox", "retry", "--all-dead", "--outbox", str(outbox)]) == 0
    with Outbox(outbox) as ob:
        assert ob.get(1).status.value == "pending"
    assert main(["outbox", "show", "7", "--outbox", str(outbox)]) == 1


def test_push_queue_under_a_taken_key_does_not_claim_it_queued(tmp_path, fhir_settings, capsys):
    rb = build_report_bundle(make_findings(), fhir_settings, include_pdf=False)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(rb.bundle))
    corrected = json.loads(json.dumps(rb.bundle))
    corrected["entry"][0]["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-000000000000"
    second.write_text(json.dumps(corrected))
    outbox = tmp_path / "o.sqlite"
    assert main(["push", str(first), "--queue", "--outbox", str(outbox)]) == 0
    assert main(["push", str(first), "--queue", "--outbox", str(outbox)]) == 0  # same Bundle: idempotent
    capsys.readouterr()
    assert main(["push", str(second), "--queue", "--outbox", str(outbox)]) == 1
    err = capsys.readouterr().err
    assert "already in the outbox as delivery 1 (pending)" in err and "NOT queued" in err
    with Outbox(outbox) as ob:
        assert ob.get(1).bundle == rb.bundle


def test_outbox_commands_refuse_a_missing_outbox(tmp_path, capsys):
    missing = tmp_path / "sub" / "dir" / "outbx.sqlite"
    for command in (["list"], ["show", "1"], ["retry", "--all-dead"],
                    ["drain", "--fhir-base", "http://127.0.0.1:9/fhir"]):
        assert main(["outbox", *command, "--outbox", str(missing)]) == 1
        assert f"no outbox at {missing}" in capsys.readouterr().err
    assert not (tmp_path / "sub").exists()


def test_credentials_in_the_base_url_are_a_configuration_error(tmp_path, fhir_settings, capsys):
    rb = build_report_bundle(make_findings(), fhir_settings, include_pdf=False)
    f = tmp_path / "bundle.json"
    f.write_text(json.dumps(rb.bundle))
    assert main(["push", str(f), "--fhir-base", "http://svc:P4ssw0rd@127.0.0.1:9/fhir"]) == 2
    err = capsys.readouterr().err
    assert "must not contain credentials" in err and "P4ssw0rd" not in err


def test_drain_names_deliveries_blocked_by_a_missing_dependency(tmp_path, capsys):
    outbox = tmp_path / "o.sqlite"
    with Outbox(outbox) as ob:
        ob.enqueue("x/sign-off", {"resourceType": "Bundle", "type": "transaction"}, "sign-off", depends_on="x/report")
    proxy = FaultProxy(None).start()
    try:
        assert main(["outbox", "drain", "--outbox", str(outbox), "--fhir-base", proxy.base_url, "--for", "30"]) == 6
    finally:
        proxy.stop()
    assert "delivery 1 (x/sign-off) is blocked: it waits for 'x/report'" in capsys.readouterr().err


@pytest.mark.hapi
def test_push_to_hapi_twice_creates_once(tmp_path, hapi_base, fhir_settings, capsys):
    import dataclasses
    import uuid

    s = dataclasses.replace(fhir_settings, identifier_system=f"urn:leuk-fhir:report:{uuid.uuid4().hex[:8]}")
    rb = build_report_bundle(make_findings(source_id=uuid.uuid4().hex), s, include_pdf=False)
    f = tmp_path / "bundle.json"
    f.write_text(json.dumps(rb.bundle))
    assert main(["push", str(f), "--fhir-base", hapi_base]) == 0
    first = capsys.readouterr().out
    assert main(["push", str(f), "--fhir-base", hapi_base]) == 0
    second = capsys.readouterr().out
    assert " 0 created" not in first and " 0 created" in second


def test_report_command_end_to_end(tmp_path, artifacts_dir):
    pytest.importorskip("leuk_fhir.analysis", reason="the analysis stage is not there yet")
    image = BCCD / "BloodImage_00000.jpg"
    if not image.is_file():
        pytest.skip("shared BCCD dataset not available")
    out = tmp_path / "bundle.json"
    pdf = artifacts_dir / "report-cli-bccd.pdf"
    assert main(["report", str(image), "--out", str(out), "--pdf", str(pdf), "--patient-id", "MRN-77",
                 "--patient-name", "Roe^Richard", "--specimen-id", "SP-77"]) == 0
    bundle = json.loads(out.read_text())
    dr = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert dr["status"] == "preliminary" and "AI-generated" in dr["conclusion"]
    pat = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    assert pat["identifier"][0]["value"] == "MRN-77" and pat["name"][0]["family"] == "Roe"
    assert pdf.read_bytes().startswith(b"%PDF")
