"""A TCP proxy on loopback that can misbehave on demand, for fault tests of object stores.

Modes: ``pass`` (forward both ways), ``reset`` (cut every open connection and refuse
new ones by closing them at once), ``stall`` (accept, then send nothing back: the
client must give up on its own timeout). Switching mode affects open connections too.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._closing = False
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "reset", "stall")
        self.mode = mode
        if mode == "reset":
            with self._lock:
                sockets, self._open = list(self._open), set()
            for sock in sockets:
                _close(sock, reset=True)

    def close(self) -> None:
        self._closing = True
        self.set_mode("reset")
        _close(self._listener)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "reset":
                _close(client, reset=True)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client, reset=True)
            return
        with self._lock:
            self._open.update((client, upstream))
        try:
            while not self._closing:
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                if self.mode == "stall":
                    continue
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            _close(client)
            _close(upstream)


def _close(sock: socket.socket, reset: bool = False) -> None:
    with contextlib.suppress(OSError):
        if reset:  # RST instead of FIN: what a dying load balancer or store does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
