"""Run real registry clients (skopeo, docker, podman, buildah) from tests.

A missing tool is a test *failure* with an install hint, never a skip: the end-to-end
suite exists to prove that these clients work, so CI must have them installed.

:class:`DockerDaemon` starts a private containerd + dockerd (sockets and data under a
short temporary directory) and stops them by PID; :class:`ContainersStorage` gives
podman and buildah a private, short storage root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.oci_layout import ALL_MANIFEST_TYPES

INSTALL_HINTS = {
    "skopeo": "apt-get install -y skopeo",
    "docker": "apt-get install -y docker.io containerd",
    "dockerd": "apt-get install -y docker.io containerd",
    "containerd": "apt-get install -y docker.io containerd",
    "ctr": "apt-get install -y containerd",
    "podman": "apt-get install -y podman buildah",
    "buildah": "apt-get install -y podman buildah",
}


def target_kind() -> str:
    """The registry under test: "cargohold" (always, in CI) or "distribution" (a developer check)."""
    return os.environ.get("CARGOHOLD_TEST_TARGET", "cargohold")


def require_tool(name: str) -> str:
    """The absolute path of ``name``; fails the test (not skips) if it is not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    assert path is not None, (
        f"{name} is required by the end-to-end tests but is not installed: "
        f"{INSTALL_HINTS.get(name, 'install it')}"
    )
    return path


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 180.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure (when ``check``) fail with the full command, stdout and stderr."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}"
        )
    return proc


def sha256_hex_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# --- plain HTTP checks against the registry ------------------------------------------------


def get_manifest(
    base_url: str, repo: str, reference: str, accept: str = ALL_MANIFEST_TYPES
) -> httpx.Response:
    return httpx.get(f"{base_url}/v2/{repo}/manifests/{reference}", headers={"Accept": accept}, timeout=30)


def head_blob(base_url: str, repo: str, digest: str) -> httpx.Response:
    return httpx.head(f"{base_url}/v2/{repo}/blobs/{digest}", timeout=30)


def get_blob(base_url: str, repo: str, digest: str) -> bytes:
    response = httpx.get(f"{base_url}/v2/{repo}/blobs/{digest}", timeout=60, follow_redirects=True)
    assert response.status_code == 200, describe(response)
    return response.content


def describe(response: httpx.Response) -> str:
    """A request and its response, for assertion messages."""
    request = response.request
    body = response.text[:2000] if response.content else ""
    return (
        f"{request.method} {request.url} -> {response.status_code}\n"
        f"request headers: {dict(request.headers)}\nresponse headers: {dict(response.headers)}\n"
        f"response body: {body}"
    )


# --- skopeo --------------------------------------------------------------------------------


@dataclass
class Skopeo:
    """skopeo with a private policy (accept anything) and plain HTTP to the test registry."""

    workdir: Path
    exe: str = field(default_factory=lambda: require_tool("skopeo"))

    def __post_init__(self) -> None:
        self.policy = self.workdir / "policy.json"
        self.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        (self.workdir / "auth.json").write_text('{"auths": {}}')
        self.env = {
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(self.workdir / "auth.json"),
        }

    def __call__(
        self, *args: str, debug: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.exe, *(["--debug"] if debug else []), "--policy", str(self.policy), *args]
        return run(cmd, env=self.env, check=check)

    def copy(self, src: str, dest: str, *extra: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
        return self(
            "copy", "--src-tls-verify=false", "--dest-tls-verify=false", *extra, src, dest, debug=debug
        )

    def inspect_raw(self, ref: str) -> bytes:
        proc = subprocess.run(
            [self.exe, "--policy", str(self.policy), "inspect", "--tls-verify=false", "--raw", ref],
            capture_output=True,
            env={**os.environ, **self.env},
            timeout=120,
        )
        assert proc.returncode == 0, f"skopeo inspect --raw {ref} failed:\n{proc.stderr.decode()}"
        return proc.stdout


# --- docker --------------------------------------------------------------------------------


def _wait_for(predicate: object, what: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-5000:]}"
            )
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout}s:\n{log.read_text(errors='replace')[-5000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group we started (its PGID is its PID), SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class DockerDaemon:
    """A private containerd + dockerd, trusting ``insecure_registries`` over plain HTTP."""

    insecure_registries: Sequence[str]
    root: Path | None = None
    containerd: subprocess.Popen[bytes] | None = None
    dockerd: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        assert self.root is not None
        return self.root / "docker.sock"

    @property
    def containerd_socket(self) -> Path:
        assert self.root is not None
        return self.root / "containerd.sock"

    @property
    def env(self) -> dict[str, str]:
        assert self.root is not None
        return {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.root / "cli")}

    def start(self) -> DockerDaemon:
        self.docker_exe = require_tool("docker")
        dockerd_exe = require_tool("dockerd")
        containerd_exe = require_tool("containerd")
        # Unix socket paths are limited to ~108 bytes: keep the root short.
        self.root = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))
        root = self.root
        (root / "cli").mkdir()
        (root / "cli" / "config.json").write_text("{}")
        ctr_sock = self.containerd_socket
        ctr_config = root / "containerd.toml"
        ctr_config.write_text(
            "version = 2\n"
            f'root = "{root}/containerd-root"\n'
            f'state = "{root}/containerd-state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{ctr_sock}"\n'
            f'[ttrpc]\n  address = "{ctr_sock}.ttrpc"\n'
            f'[debug]\n  address = "{root}/containerd-debug.sock"\n'
            '[metrics]\n  address = ""\n'
        )
        ctr_log = root / "containerd.log"
        with open(ctr_log, "ab") as log:
            self.containerd = subprocess.Popen(
                [containerd_exe, "--config", str(ctr_config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(ctr_sock.exists, "containerd", 30, self.containerd, ctr_log)

        daemon_json = root / "daemon.json"
        daemon_json.write_text("{}")
        dockerd_log = root / "dockerd.log"
        cmd = [
            dockerd_exe,
            "--config-file", str(daemon_json),
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "-H", f"unix://{self.socket}",
            "--pidfile", str(root / "docker.pid"),
            "--containerd", str(ctr_sock),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ]  # fmt: skip
        for registry in self.insecure_registries:
            cmd += ["--insecure-registry", registry]
        with open(dockerd_log, "ab") as log:
            self.dockerd = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            probe = run([self.docker_exe, "version"], env=self.env, check=False, timeout=20)
            return probe.returncode == 0

        _wait_for(ready, "dockerd", 60, self.dockerd, dockerd_log)
        return self

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return run([self.docker_exe, *args], env=self.env, check=check)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- dockerd log (tail) ---\n{self.logs()[-5000:]}") from None

    def ctr(self, namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """containerd's own CLI against this containerd, in ``namespace``."""
        exe = require_tool("ctr")
        cmd = [exe, "--address", str(self.containerd_socket), "-n", namespace, *args]
        try:
            return run(cmd, check=check)
        except AssertionError as exc:
            tail = self.logs("containerd")[-5000:]
            raise AssertionError(f"{exc}\n--- containerd log (tail) ---\n{tail}") from None

    def ctr_content(self, namespace: str, digest: str) -> bytes:
        """The bytes of ``digest`` in containerd's content store (``ctr content get``)."""
        cmd = [require_tool("ctr"), "--address", str(self.containerd_socket), "-n", namespace]
        proc = subprocess.run([*cmd, "content", "get", digest], capture_output=True, timeout=60)
        assert proc.returncode == 0, f"ctr content get {digest} failed: {proc.stderr.decode()}"
        return proc.stdout

    def logs(self, daemon: str = "dockerd") -> str:
        assert self.root is not None
        return (self.root / f"{daemon}.log").read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.dockerd)
        _stop(self.containerd)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DockerDaemon:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- podman / buildah ----------------------------------------------------------------------


@dataclass
class ContainersStorage:
    """A private containers/storage for podman and buildah (vfs, short paths under /tmp)."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pm", dir="/tmp")))

    def __post_init__(self) -> None:
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.root / "auth.json").write_text('{"auths": {}}')
        self.env = {
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(self.root / "auth.json"),
            "TMPDIR": str(self.root),
        }

    @property
    def storage_flags(self) -> list[str]:
        return ["--root", str(self.root / "s"), "--runroot", str(self.root / "r"), "--storage-driver", "vfs"]

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = require_tool("podman")
        flags = [
            *self.storage_flags,
            "--tmpdir", str(self.root / "t"),
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]  # fmt: skip
        return run([exe, *flags, *args], env=self.env, check=check)

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = require_tool("buildah")
        return run([exe, *self.storage_flags, *args], env=self.env, check=check)

    def cleanup(self) -> None:
        # vfs layers may carry read-only directories; make them writable before removal.
        for dirpath, _dirs, _files in os.walk(self.root):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(self.root, ignore_errors=True)
