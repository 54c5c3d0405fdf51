"""/metrics, /healthz and /readyz after a known sequence of operations, over real HTTP."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import RegistryProcess


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_happened(tmp_path: Path) -> None:
    with RegistryProcess(data_dir=tmp_path / "data", env={"CARGOHOLD_WORKERS": "2"}) as server:
        blob = b"x" * 10_000
        with httpx.Client(base_url=server.url) as client:
            for repo in ("m/a", "m/b"):  # the same bytes twice: stored once
                response = client.post(
                    f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(blob)}, content=blob
                )
                assert response.status_code == 201
            for _ in range(3):
                assert client.head(f"/v2/m/a/blobs/{sha256(blob)}").status_code == 200
            assert client.get("/v2/m/a/manifests/nope").status_code == 404
            client.post("/v2/m/a/blobs/uploads/")  # one session left open
        time.sleep(0.2)
        samples = scrape(server.url)
    heads = samples[
        ("cargohold_http_requests_total", (("method", "HEAD"), ("route", "blob"), ("status", "200")))
    ]
    assert heads == 3  # summed over both workers
    assert (
        samples[
            (
                "cargohold_http_requests_total",
                (("method", "POST"), ("route", "blob_upload"), ("status", "201")),
            )
        ]
        == 2
    )
    assert (
        samples[
            ("cargohold_http_requests_total", (("method", "GET"), ("route", "manifest"), ("status", "404")))
        ]
        == 1
    )
    assert samples[("cargohold_http_received_bytes_total", (("route", "blob_upload"),))] == 20_000
    assert samples[("cargohold_blobs_stored", ())] == 1
    assert samples[("cargohold_stored_bytes", ())] == 10_000
    assert samples[("cargohold_logical_bytes", ())] == 20_000
    assert samples[("cargohold_dedup_savings_bytes", ())] == 10_000
    assert samples[("cargohold_upload_sessions_open", ())] == 1
    assert (
        samples[("cargohold_backend_operation_duration_seconds_count", (("operation", "create_staged"),))]
        == 3
    )


def test_health_endpoints(tmp_path: Path) -> None:
    with RegistryProcess(data_dir=tmp_path / "data") as server:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        # The store's root vanishing (a lost volume) makes the registry unready, not dead.
        (tmp_path / "data" / "blobs" / "staging").rename(tmp_path / "data" / "blobs" / "moved")
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert httpx.get(f"{server.url}/healthz").status_code == 200
