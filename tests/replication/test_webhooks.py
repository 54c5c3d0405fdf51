"""Webhooks to a local HTTP receiver: every event arrives, signed, in order, across failures
of the receiver and a kill -9 of the registry."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from cargohold.cli import main
from cargohold.config import WebhookSettings
from cargohold.engine import Registry
from cargohold.replication.webhooks import WebhookService, webhook_status
from tests.engine.conftest import make_registry, push_image
from tests.replication.support import ADMIN_TOKEN, wait_for
from tests.replication.support import push_image as http_push
from tests.support.servers import RegistryProcess

SECRET = "hook-secret"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Accepts POSTs; ``fail`` decides per request (by its number, from 1) how to misbehave."""

    fail: Any = None  # callable(number, delivery) -> None | "500" | "drop"
    accepted: list[Delivery] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        receiver = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                delivery = Delivery(dict(self.headers.items()), body)
                with lock:
                    receiver.requests += 1
                    number = receiver.requests
                how = receiver.fail(number, delivery) if receiver.fail else None
                if how == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                status = 500 if how == "500" else 400 if how == "400" else 200
                if status == 200:
                    with lock:
                        receiver.accepted.append(delivery)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def settings(url: str, **endpoint: Any) -> WebhookSettings:
    return WebhookSettings(
        endpoints=[
            {"name": "ci", "url": url, "secret": SECRET, "backoff": 0.02, "backoff_max": 0.1, **endpoint}
        ],
        source="test-registry",
    )


def assert_signed(delivery: Delivery) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(delivery.headers["X-Cargohold-Signature-256"], expected)


def test_every_event_arrives_signed_and_in_order_through_failures(
    registry: Registry, receiver: Receiver
) -> None:
    receiver.fail = lambda number, _delivery: {3: "500", 6: "drop"}.get(number)
    service = WebhookService(registry, settings(receiver.url))  # registered: events from now on
    for n in range(3):
        push_image(registry, f"team/app{n % 2}", f"v{n}", b'{"n":%d}' % n, [b"layer-%d" % n])
    registry.delete_manifest("team/app0", "v0")
    events = registry.events.after(0)
    reports = service.deliver_all(timeout=30)
    service.close()

    assert reports["ci"].delivered == len(events) == 7 and reports["ci"].failed == 2
    assert [d.document["id"] for d in receiver.accepted] == [e.id for e in events]  # each once, in order
    for delivery, event in zip(receiver.accepted, events, strict=True):
        assert_signed(delivery)
        document = delivery.document
        assert document["action"] == event.action and document["repository"] == event.repository
        assert (document["digest"], document["tag"], document["registry"]) == (
            event.digest,
            event.tag,
            "test-registry",
        )
        assert delivery.headers["X-Cargohold-Event-Id"] == str(event.id)
        assert delivery.headers["Content-Type"] == "application/json"
    assert [d.headers["X-Cargohold-Delivery-Attempt"] for d in receiver.accepted].count("2") == 2
    (status,) = webhook_status(registry)
    assert (status["delivered"], status["failed"], status["dead"], status["events_behind"]) == (7, 2, 0, 0)
    assert "500" in status["last_error"] or "Error" in status["last_error"]


def test_filters_and_the_cloudevents_format(registry: Registry, receiver: Receiver) -> None:
    service = WebhookService(
        registry,
        settings(receiver.url, repositories=["team/*"], actions=["tag", "untag"], format="cloudevents"),
    )
    push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer"])
    push_image(registry, "other/app", "v1", b'{"a":2}', [b"layer2"])
    registry.delete_manifest("team/app", "v1")
    service.deliver_all(timeout=30)
    service.close()
    documents = [d.document for d in receiver.accepted]
    assert [(d["type"], d["subject"]) for d in documents] == [
        ("io.cargohold.tag", "team/app:v1"),
        ("io.cargohold.untag", "team/app:v1"),
    ]
    first = documents[0]
    assert first["specversion"] == "1.0" and first["source"] == "test-registry" and first["id"] == "2"
    assert first["data"]["repository"] == "team/app" and first["time"].endswith("Z")
    assert receiver.accepted[0].headers["Content-Type"] == "application/cloudevents+json"
    (status,) = webhook_status(registry)
    assert status["events_behind"] == 0 and status["delivered"] == 2


def test_an_event_refused_too_often_is_logged_dead_and_the_rest_goes_on(
    registry: Registry, receiver: Receiver
) -> None:
    receiver.fail = lambda _number, delivery: "400" if delivery.document["tag"] == "bad" else None
    service = WebhookService(registry, settings(receiver.url, max_attempts=3, actions=["tag"]))
    for tag in ("v1", "bad", "v2"):
        push_image(registry, "team/app", tag, b'{"t":"%s"}' % tag.encode(), [tag.encode()])
    report = service.deliver_all(timeout=30)["ci"]
    service.close()
    assert [d.document["tag"] for d in receiver.accepted] == ["v1", "v2"]
    assert (report.delivered, report.failed, report.dead) == (2, 2, 1)
    (status,) = webhook_status(registry)
    assert status["dead"] == 1 and "answered 400" in status["last_error"]


@pytest.mark.slow
def test_events_survive_a_kill_of_the_registry_while_the_receiver_is_down(
    tmp_path: Path, receiver: Receiver
) -> None:
    down = threading.Event()
    down.set()
    receiver.fail = lambda _number, _delivery: "500" if down.is_set() else None
    config = tmp_path / "config.yaml"
    hooks = settings(receiver.url, max_attempts=1000).model_dump(mode="json")
    hooks["poll_interval"] = 0.1
    config.write_text(yaml.safe_dump({"admin": {"token": ADMIN_TOKEN}, "webhooks": hooks}))
    env = {"CARGOHOLD_CONFIG": str(config), "CARGOHOLD_WORKERS": "2"}
    server = RegistryProcess(data_dir=tmp_path / "data", env=env)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for n in range(3):
                http_push(client, f"team/app{n}", "v1", [os.urandom(1000)])
        wait_for(lambda: receiver.requests >= 3, "the receiver to be tried and fail")
        server.kill()
        server.proc = None
        server.start()
        down.clear()
        wait_for(lambda: len(receiver.accepted) >= 6, "every event after the restart", 30)

        def delivered() -> list[dict[str, Any]] | None:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            found = httpx.get(f"{server.url}/admin/webhooks/status", headers=auth).json()["endpoints"]
            return found if found and found[0]["delivered"] == 6 else None

        status = wait_for(delivered, "the delivery log to show every delivery")
    finally:
        server.cleanup()
    documents = [d.document for d in receiver.accepted]
    assert [d["id"] for d in documents] == [1, 2, 3, 4, 5, 6]  # push, tag for each image: none lost
    assert [d["action"] for d in documents] == ["push", "tag"] * 3
    for delivery in receiver.accepted:
        assert_signed(delivery)
    assert status[0]["endpoint"] == "ci" and status[0]["delivered"] == 6 and status[0]["failed"] >= 3


def test_the_cli_shows_status_and_the_delivery_log(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.fail = lambda number, _delivery: "500" if number == 1 else None
    registry = make_registry(tmp_path / "data")
    service = WebhookService(registry, settings(receiver.url))
    push_image(registry, "team/app", "v1", b'{"a":1}', [b"layer"])
    service.deliver_all(timeout=30)
    service.close()
    registry.store.close()
    monkeypatch.setenv("CARGOHOLD_DATA_DIR", str(tmp_path / "data"))
    status = CliRunner().invoke(main, ["webhooks", "status"])
    assert status.exit_code == 0, status.output
    assert status.output.splitlines()[1].split() == ["ci", "0", "0.0s", "2", "1", "0"]
    assert "last error: answered 500" in status.output
    log = CliRunner().invoke(main, ["webhooks", "log", "ci"]).output.splitlines()
    assert len(log) == 3 and "attempt 2   delivered" in log[1] and "failed    500" in log[2]
