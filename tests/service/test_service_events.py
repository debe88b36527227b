"""Server-Sent Events through the production WSGI server (waitress) on loopback."""

from __future__ import annotations

import contextlib
import json
import queue
import threading

import requests


def _read_events(response: requests.Response, into: queue.Queue) -> None:
    with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
        _parse(response, into)  # ends when the server (or the test) closes the stream


def _parse(response: requests.Response, into: queue.Queue) -> None:
    event: dict[str, str] = {}
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):
        if line is None:
            continue
        if not line:
            if event:
                into.put(event)
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.strip()


def test_events_stream_live_through_waitress(make_app, live_server, cell_png) -> None:
    app = make_app()
    server = live_server(app)
    events: queue.Queue = queue.Queue()
    stream = requests.get(f"{server.url}/v1/events", stream=True, timeout=10)
    assert stream.status_code == 200
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    reader = threading.Thread(target=_read_events, args=(stream, events), daemon=True)
    reader.start()
    assert events.get(timeout=5)["event"] == "hello"

    accepted = requests.post(f"{server.url}/v1/analyses",
                             files={"image": ("cell.png", cell_png(), "image/png")}, timeout=10)
    assert accepted.status_code == 202
    event = events.get(timeout=5)
    assert event["event"] == "analysis"
    data = json.loads(event["data"])
    assert data == {"id": accepted.json()["id"], "status": "queued"}
    assert "cell.png" not in event["data"]  # events carry ids and states, no names
    app.extensions["leuk_fhir"].broker.close()  # the server ends the stream
    reader.join(5)
    assert not reader.is_alive()
    stream.close()
