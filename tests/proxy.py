"""A TCP proxy in front of a real server, for tests that cut or delay a real connection (as
aio-pika's own reconnect tests do): `cut()` closes every connection and refuses new ones (the
server is away), `hold()` keeps what the server sends until `release()` (its answers are late).
In front of RabbitMQ it also counts the messages its clients publish (AMQP `basic.publish`
frames).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
#: A method frame (type 1) of `basic.publish` (class 60, method 40).
BASIC_PUBLISH = (1, 60, 40)


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._open = threading.Event()
        self._open.set()
        self._released = threading.Event()
        self._released.set()
        self._closed = False
        self.accepted = 0
        #: `basic.publish` frames the clients sent, over every connection.
        self.published = 0
        threading.Thread(target=self._accept, name="proxy:accept", daemon=True).start()

    def cut(self) -> None:
        """Close every connection, and every new one at once, until `restore()`."""
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self._open.set()

    def hold(self) -> None:
        """Keep what the server sends (nothing reaches the client) until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        frames = _Frames()
        try:
            while chunk := source.recv(65536):
                if from_server:
                    self._released.wait()
                else:
                    published = frames.count(chunk, BASIC_PUBLISH)
                    with self._lock:
                        self.published += published
                if not self._open.is_set():
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Frames:
    """AMQP 0-9-1 frames of one direction of a connection, read as the bytes go by."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False

    def count(self, chunk: bytes, method: tuple[int, int, int]) -> int:
        """How many frames of `method` (frame type, class id, method id) `chunk` completes."""
        self._buffer += chunk
        if not self._started:
            if len(self._buffer) < len(AMQP_HEADER):
                return 0
            self._buffer = self._buffer[len(AMQP_HEADER) :]
            self._started = True
        found = 0
        while len(self._buffer) >= 7:
            kind, _, size = struct.unpack(">BHI", self._buffer[:7])
            if len(self._buffer) < 7 + size + 1:
                break
            payload = self._buffer[7 : 7 + size]
            if kind == 1 and size >= 4 and (kind, *struct.unpack(">HH", payload[:4])) == method:
                found += 1
            self._buffer = self._buffer[7 + size + 1 :]
        return found
