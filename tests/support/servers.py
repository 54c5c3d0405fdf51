"""Start real registry processes on loopback for tests and benchmarks.

``RegistryProcess`` runs ``cargohold serve`` (or CNCF Distribution's ``docker-registry``,
for side-by-side checks) on a free port with a private data directory, waits until
``GET /v2/`` answers, and stops it by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cargohold_command() -> list[str]:
    exe = shutil.which("cargohold", path=str(Path(sys.executable).parent)) or shutil.which("cargohold")
    if exe is None:
        raise RuntimeError("the cargohold console script is not installed (pip install -e .)")
    return [exe]


@dataclass
class RegistryProcess:
    """A registry server process on 127.0.0.1. ``kind`` is "cargohold" or "distribution"."""

    kind: str = "cargohold"
    data_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    scheme: str = "http"  # "https" when the configuration turns TLS on
    _own_dir: bool = False

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def start(self, timeout: float = 30.0) -> RegistryProcess:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=f"{self.kind}-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        self.log_path = self.data_dir / f"server-{self.port}.log"
        env = {**os.environ, **self.env}
        if self.kind == "cargohold":
            cmd = [*cargohold_command(), "serve", "--address", self.host, "--data-dir", str(self.data_dir)]
        elif self.kind == "distribution":
            exe = shutil.which("docker-registry")
            if exe is None:
                raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
            config = self.data_dir / "config.yml"
            config.write_text(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.data_dir}/storage\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n"
            )
            cmd = [exe, "serve", str(config)]
        else:
            raise ValueError(f"unknown registry kind {self.kind!r}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # Only "is it up?": the certificate of a TLS server is checked by its tests.
                if httpx.get(f"{self.url}/v2/", timeout=1.0, verify=False).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole server (all worker processes): a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
