"""A TCP proxy in front of the test S3 server that cuts the line after N bytes.

``CuttingProxy(upstream).cut_after(n)``: once ``n`` bytes have gone from the clients to the
server (counted over every connection), the connection that crosses the line is dropped in
the middle of its request and every later one is refused, as when the endpoint dies halfway
through an upload. ``restore()`` lets traffic through again, as when it comes back.
``request_starts`` holds the byte offset at which each request since then began, so a test
can cut in the middle of any one of them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class CuttingProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sent = 0  # bytes forwarded client -> server since the last reset
        self.request_starts: list[int] = []
        self._budget: int | None = None
        self._cut = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, budget: int) -> None:
        with self._lock:
            self.sent, self._budget, self._cut = 0, budget, False
            self.request_starts = []

    def restore(self) -> None:
        with self._lock:
            self.sent, self._budget, self._cut = 0, None, False
            self.request_starts = []

    @property
    def was_cut(self) -> bool:
        return self._cut

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._sockets):
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if counted:
                    chunk = self._allowance(chunk)
                if chunk:
                    sink.sendall(chunk)
                if self._cut:
                    break
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)
            self._sockets.discard(source)
            self._sockets.discard(sink)

    def _allowance(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` still inside the budget; crossing it cuts the line."""
        with self._lock:
            if self._cut:
                return b""
            if chunk.startswith(_METHODS):
                self.request_starts.append(self.sent)
            if self._budget is not None and self.sent + len(chunk) >= self._budget:
                chunk = chunk[: max(0, self._budget - self.sent)]
                self._cut = True
            self.sent += len(chunk)
            return chunk


_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
