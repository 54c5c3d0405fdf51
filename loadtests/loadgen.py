"""Request-rate load for cheap endpoints: wrk or hey when installed, else an asyncio httpx loop.

On a 2-core machine a Python client tops out around 1-2k requests/s, close to what the
servers reach on manifest GET and blob HEAD, so it would measure itself. wrk (C, epoll)
needs a fraction of a core for the same load, which leaves the servers the CPU. wrk 4.1
cannot do HEAD (its parser waits for a body that never comes: 0 requests complete), so
HEAD goes to hey (Go), which costs a little more CPU than wrk but far less than Python.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import httpx

# wrk prints this line from the Lua `done` hook so the harness parses JSON, not wrk's prose.
_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class LoadResult:
    """Completed requests over a fixed duration; errors include non-2xx/3xx statuses."""

    tool: str
    requests: int
    seconds: float
    errors: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def generator_name(method: str = "GET") -> str:
    """The tool ``run_load`` will use for ``method``: wrk, hey or httpx-asyncio."""
    if method != "HEAD" and shutil.which("wrk"):
        return "wrk"
    return "hey" if shutil.which("hey") else "httpx-asyncio"


def run_load(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    connections: int = 64,
    duration: float = 10.0,
    threads: int = 1,
    timeout: float = 10.0,
) -> LoadResult:
    """Hold ``connections`` keep-alive connections busy on one URL for ``duration`` seconds."""
    tool = generator_name(method)
    if tool == "wrk":
        return _run_wrk(url, method, headers or {}, connections, duration, threads, timeout)
    if tool == "hey":
        return _run_hey(url, method, headers or {}, connections, duration, timeout)
    return asyncio.run(_run_httpx(url, method, headers or {}, connections, duration, timeout))


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for our values


def _run_wrk(
    url: str,
    method: str,
    headers: dict[str, str],
    connections: int,
    duration: float,
    threads: int,
    timeout: float,
) -> LoadResult:
    lines = [f"wrk.method = {_lua_string(method)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("\n".join(lines) + "\n" + _WRK_DONE)
        script.flush()
        cmd = [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s",
            "-s",
            script.name,
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 30, check=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    stats = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(stats[k] for k in ("connect", "read", "write", "status", "timeout"))
    latency = {"p50_ms": stats["p50_us"] / 1000, "p99_ms": stats["p99_us"] / 1000}
    return LoadResult("wrk", stats["requests"], stats["duration_us"] / 1e6, errors, latency)


def _run_hey(
    url: str, method: str, headers: dict[str, str], connections: int, duration: float, timeout: float
) -> LoadResult:
    cmd = ["hey", "-c", str(connections), "-z", f"{max(1, round(duration))}s", "-m", method]
    cmd += ["-t", str(max(1, round(timeout))), "-disable-compression"]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    run = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + timeout + 30)
    out = run.stdout
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    if run.returncode != 0 or total is None:
        raise RuntimeError(f"hey failed ({run.returncode}):\n{out}\n{run.stderr}")
    # "Status code distribution:" lines read "  [200]\t1234 responses";
    # "Error distribution:" lines read "  [17]\tGet ...: connection refused".
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    transport_errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s+(?!\d+ responses)\D", out, re.M))
    bad_statuses = sum(n for code, n in statuses.items() if code >= 400)
    latency = {f"p{p}_ms": float(v) * 1000 for p, v in re.findall(r"(50|99)% in ([\d.]+) secs", out)}
    requests = sum(statuses.values()) + transport_errors
    return LoadResult("hey", requests, float(total[1]), bad_statuses + transport_errors, latency)


async def _run_httpx(
    url: str, method: str, headers: dict[str, str], connections: int, duration: float, timeout: float
) -> LoadResult:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        start = time.monotonic()
        deadline = start + duration

        async def worker() -> tuple[int, int]:
            done = failed = 0
            while time.monotonic() < deadline:
                try:
                    response = await client.request(method, url)
                    failed += response.status_code >= 400
                except httpx.HTTPError:
                    failed += 1
                done += 1
            return done, failed

        results = await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - start
    return LoadResult("httpx-asyncio", sum(r[0] for r in results), elapsed, sum(r[1] for r in results))
