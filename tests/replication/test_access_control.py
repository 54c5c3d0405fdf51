"""Replication into (and out of) a cargohold with access control on: the real Docker token flow
(401 Bearer challenge, a JWT from its /auth/token for a robot account, scoped to the
repositories; cross-repository mounts ask for pull on the source repository too)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from cargohold.config import ReplicationSettings
from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from cargohold.replication import ReplicationService, replication_status
from tests.engine.conftest import make_registry, push_image
from tests.support.servers import RegistryProcess

CONFIG = """
auth:
  service: guarded
  basic: true
  default: {pull: []}
  policies:
    - repositories: "team/**"
      pull: ["robot$replicator", checker]
      push: ["robot$replicator"]
"""


def test_replication_through_the_token_flow_of_a_guarded_cargohold(tmp_path: Path) -> None:
    data = tmp_path / "guarded"
    data.mkdir()
    (data / "config.yaml").write_text(CONFIG)
    store = MetadataStore(data / "metadata.db")
    identities = Identities(store)
    _, secret = identities.add_robot("replicator", description="replication from the source")
    identities.add_user("checker", "checker-password")
    store.close()

    source = make_registry(tmp_path / "source")
    shared = os.urandom(200_000)
    one = push_image(source, "team/one", "v1", b'{"n":1}', [shared, os.urandom(1000)])
    two = push_image(source, "team/two", "v1", b'{"n":2}', [shared, os.urandom(1000)])
    push_image(source, "other/app", "v1", b'{"n":3}', [os.urandom(1000)])

    env = {"CARGOHOLD_CONFIG": str(data / "config.yaml"), "CARGOHOLD_WORKERS": "1"}
    with RegistryProcess(data_dir=data, env=env) as guarded:
        settings = ReplicationSettings(
            targets=[
                {"name": "guarded", "url": guarded.url, "username": "robot$replicator", "password": secret}
            ],
            rules=[
                {"name": "out", "target": "guarded", "repositories": ["team/*", "other/*"]},
                {
                    "name": "back",
                    "direction": "pull",
                    "target": "guarded",
                    "repositories": ["team/one"],
                    "target_prefix": "returned/",
                },
            ],
            chunk_size="64KiB",  # the shared layer goes in PATCHes, each sent with the token up front
            workers=1,  # one after the other: team/two mounts the shared layer from team/one
            max_attempts=1,
        )
        service = ReplicationService(source, settings)
        try:
            reconciled = service.reconcile("out")
            report = service.drain(["out"], timeout=60)
            service.reconcile("back")
            back = service.drain(["back"], timeout=60)
        finally:
            service.close()
        check = httpx.Client(base_url=guarded.url, auth=("checker", "checker-password"))
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        assert check.head("/v2/team/one/manifests/v1", headers=accept).headers["docker-content-digest"] == one
        assert check.head("/v2/team/two/manifests/v1", headers=accept).headers["docker-content-digest"] == two

    # other/app is not the robot's: it cannot be compared, and the job its push event made is
    # refused (403 DENIED) and dead; the rest went through.
    assert reconciled.jobs_enqueued == 2 and len(reconciled.errors) == 1 and "403" in reconciled.errors[0]
    assert (report.succeeded, report.dead) == (2, 1)
    assert any("403" in error and "other/app" in error for error in report.errors)
    assert back.succeeded == 1
    assert source.get_manifest("returned/team/one", "v1").digest == one
    (out,) = [rule for rule in replication_status(source) if rule["rule"] == "out"]
    assert out["bytes_skipped"] == len(shared)  # mounted across repositories, with a token for both
