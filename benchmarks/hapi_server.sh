#!/usr/bin/env bash
# Benchmark of the HAPI FHIR test server (tests/hapi-server): time from start to ready
# (GET /fhir/metadata answers), resident memory (RSS) and Java heap in use right after start
# and after the HAPI tests ran against it, and the rate of validated report transactions
# (Patient + DiagnosticReport + 3 Observations, conditional creates) after the tests.
# Starts its own server on a spare port and stops it.
# Prints the figures (also as one JSON line, the last line of stdout).
#
# Usage: bash benchmarks/hapi_server.sh [--port PORT] [--runs N] [PYTEST_ARGS...]
#        (default port 8099, 1 run, pytest on tests/hapi). Set LEUK_FHIR_HAPI_JAVA_OPTS to
#        compare JVM settings.
set -euo pipefail
cd "$(dirname "$0")/.."
port=8099
runs=1
while (($#)); do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) break ;;
  esac
done
pytest_args=("$@")
((${#pytest_args[@]})) || pytest_args=(tests/hapi)
pid_file=tests/hapi-server/target/run/hapi-$port.pid
trap 'bash tests/hapi-server/stop --port "$port" >/dev/null 2>&1 || true' EXIT

rss_mib() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
heap_used_mib() {  # live heap after a full GC, as jcmd reports it ("used NNNK")
  jcmd "$1" GC.run >/dev/null 2>&1 || true
  jcmd "$1" GC.heap_info 2>/dev/null \
    | awk '/used/ {for (i = 1; i <= NF; i++) if ($i == "used") {v = $(i + 1); sub(/K,?/, "", v); s += v}} END {printf "%.0f", s / 1024}'
}

echo "== build (if needed)"
bash tests/hapi-server/run --build-only
for run in $(seq "$runs"); do
  echo "== run $run/$runs: start on port $port (JVM: ${LEUK_FHIR_HAPI_JAVA_OPTS:-default of run})"
  t0=$(date +%s.%N)
  base=$(bash tests/hapi-server/run --port "$port" 2>/dev/null | tail -n 1)
  t1=$(date +%s.%N)
  pid=$(cat "$pid_file")
  start_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
  rss_start=$(rss_mib "$pid")
  heap_start=$(heap_used_mib "$pid")
  t2=$(date +%s.%N)
  LEUK_FHIR_TEST_FHIR_BASE="$base" .venv/bin/python -m pytest -q -p no:cacheprovider \
    "${pytest_args[@]}" >/tmp/hapi_bench_pytest.$$ 2>&1 || { tail -n 20 /tmp/hapi_bench_pytest.$$; exit 1; }
  t3=$(date +%s.%N)
  tests_s=$(awk -v a="$t2" -v b="$t3" 'BEGIN {printf "%.1f", b - a}')
  summary=$(tail -n 1 /tmp/hapi_bench_pytest.$$)
  rm -f /tmp/hapi_bench_pytest.$$
  tx_per_s=$(.venv/bin/python - "$base" "${LEUK_FHIR_HAPI_BENCH_TX:-40}" <<'PY'
import sys, time, uuid
import requests
base, count = sys.argv[1], int(sys.argv[2])
system = f"urn:leuk-fhir:bench:{uuid.uuid4().hex[:12]}"
loinc = "http://loinc.org"

def report(n: int) -> dict:
    patient_url, report_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": patient_url,
                "resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": f"p{n}"}]},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={system}|p{n}"}}]
    results = []
    for i, (code, value) in enumerate((("26446-5", 12.5), ("34922-5", 10.0), ("804-5", 100))):
        url = f"urn:uuid:{uuid.uuid4()}"
        results.append({"reference": url})
        entries.append({"fullUrl": url, "resource": {
            "resourceType": "Observation", "status": "preliminary",
            "identifier": [{"system": system, "value": f"o{n}-{i}"}],
            "code": {"coding": [{"system": loinc, "code": code}]}, "subject": {"reference": patient_url},
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}},
            "request": {"method": "POST", "url": "Observation", "ifNoneExist": f"identifier={system}|o{n}-{i}"}})
    entries.append({"fullUrl": report_url, "resource": {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "identifier": [{"system": system, "value": f"r{n}"}],
        "code": {"coding": [{"system": loinc, "code": "34994-4"}]}, "subject": {"reference": patient_url},
        "issued": "2026-01-15T10:00:00+00:00", "result": results, "conclusion": "AI-generated"},
        "request": {"method": "POST", "url": "DiagnosticReport", "ifNoneExist": f"identifier={system}|r{n}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
start = time.monotonic()
for n in range(count):
    reply = requests.post(base, json=report(n), headers=headers, timeout=120)
    reply.raise_for_status()
print(f"{count / (time.monotonic() - start):.1f}")
PY
)
  rss_after=$(rss_mib "$pid")
  heap_after=$(heap_used_mib "$pid")
  bash tests/hapi-server/stop --port "$port" >/dev/null 2>&1
  echo "start_to_ready_s:        $start_s"
  echo "rss_after_start_mib:     $rss_start"
  echo "heap_live_after_start_mib: $heap_start"
  echo "tests:                   ${pytest_args[*]} -> $summary in ${tests_s} s"
  echo "report_transactions_per_s: $tx_per_s  (5 resources each, validated)"
  echo "rss_after_tests_mib:     $rss_after"
  echo "heap_live_after_tests_mib: $heap_after"
  printf '{"run": %d, "start_to_ready_s": %s, "rss_after_start_mib": %s, "heap_live_after_start_mib": %s, "tests_s": %s, "report_tx_per_s": %s, "rss_after_tests_mib": %s, "heap_live_after_tests_mib": %s}\n' \
    "$run" "$start_s" "$rss_start" "$heap_start" "$tests_s" "$tx_per_s" "$rss_after" "$heap_after"
done
