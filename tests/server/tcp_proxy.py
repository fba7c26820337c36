"""Network faults in front of the real vLLM server: the answers that arrive are the server's own.

:class:`Proxy` forwards TCP both ways; :meth:`Proxy.cut` closes the listening socket and every
live connection (to the client exactly a server that went away: connections reset, new ones
refused), :meth:`Proxy.restore` listens on the same port again.

:class:`Relay` forwards whole HTTP requests, counting the ones that ask for log-probs: past a
count it holds them until released, or closes them unanswered.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit


class Proxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass




class Relay:
    """Forwards HTTP requests to ``upstream`` unchanged. Requests for an example's log-probs
    (POST /v1/completions other than the check's two-token probe) are counted; past ``hold_after``
    of them each waits for :meth:`release`, past ``cut_after`` the connection closes unanswered."""

    def __init__(self, upstream: str, *, hold_after: int | None = None, cut_after: int | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.hold_after, self.cut_after = hold_after, cut_after
        self.scored = self.held = self.cut = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            if request.startswith(b"POST /v1/completions") and b'"prompt": [0, 0]' not in request:
                with self._lock:
                    self.scored += 1
                    n = self.scored
                    hold = self.hold_after is not None and n > self.hold_after
                    cut = self.cut_after is not None and n > self.cut_after
                    self.held += hold
                    self.cut += cut
                if hold:
                    self._released.wait(60)
                if cut:
                    return  # closed without an answer, as a server that went away
            # urllib asks for Connection: close, so the server ends the answer by closing.
            with socket.create_connection(self.upstream) as up:
                up.sendall(request)
                while chunk := up.recv(1 << 16):
                    conn.sendall(chunk)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(1 << 16)
    return head + b"\r\n\r\n" + body
