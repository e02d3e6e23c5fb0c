"""The stack's Redis server (password-protected, nothing kept on disk)."""

from __future__ import annotations

import socket
import subprocess

from gateway.devtools.localstack.base import require_free, terminate, write_private


class RedisServer:
    """The part of `LocalStack` that runs Redis."""

    def start_redis(self) -> None:
        component = self.component("redis")
        if component.pid():
            return
        directory = self.run_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        # The password goes in a file, never on the command line (which every user can read).
        config = directory / "redis.conf"
        write_private(config, f"requirepass {self.secret('redis')}\n")
        require_free(self.ports.redis)
        subprocess.run(
            [
                "redis-server",
                str(config),
                "--port",
                str(self.ports.redis),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--pidfile",
                str(component.pid_file),
                "--logfile",
                str(component.log_file),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop_redis(self) -> None:
        component = self.component("redis")
        pid = component.pid()
        if pid is not None:
            terminate(pid, component.signature, timeout=10)

    def redis_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports.redis), timeout=1) as sock:
                sock.sendall(b"AUTH %s\r\nPING\r\n" % self.secret("redis").encode())
                reply = b""
                while reply.count(b"\r\n") < 2 and (chunk := sock.recv(64)):
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False
