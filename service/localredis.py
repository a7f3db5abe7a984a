"""A real local Redis for ``spectdose serve`` when none answers at the configured URL.

Debian's ``redis-server`` is started as a child process on loopback, with its append-only
file under the data directory, so queued tasks survive a restart of the local service.
It gets a generated password (in a 0600 config file, never on the command line) that is
passed on in the broker URL, so other local users cannot read or inject jobs.
Remote URLs are never replaced: a deployment whose Redis is down should fail, not fork.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redis_answers", "LocalRedis", "ensure_redis", "free_port", "redacted"]

log = logging.getLogger("spectdose.service.redis")

_CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redacted(url: str) -> str:
    """``url`` with its password replaced, for logs and banners."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_local(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalRedis:
    """``redis-server`` on 127.0.0.1:``port``, data in ``data_dir`` (AOF, fsync every second).

    With ``password`` it requires AUTH; :attr:`url` carries the password and is also written
    to ``data_dir/url`` (mode 0600) for tools run by the same user.
    """

    def __init__(self, port: int, data_dir: Path, binary: str | None = None, password: str | None = None):
        self.port = port
        self.password = password
        self.data_dir = Path(data_dir)
        self.binary = binary or next((b for b in _CANDIDATES if Path(b).exists()), None) or shutil.which(
            "redis-server")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _write_private(self, name: str, text: str) -> Path:
        path = self.data_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(path, 0o600)
        return path

    def start(self, timeout_s: float = 15.0) -> LocalRedis:
        if not self.binary:
            raise RuntimeError(
                "no Redis answers and redis-server is not installed: install Debian's redis-server "
                "(apt-get install redis-server) or point SPECTDOSE_REDIS_URL at a running Redis"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = []
        if self.password:  # a config file, so the password never shows in `ps`
            conf = [str(self._write_private("redis.conf", f"requirepass {self.password}\n"))]
            self._write_private("url", self.url + "\n")
        cmd = [
            self.binary, *conf, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}): {err.strip()[:300]}")
            if redis_answers(self.url, 0.5):
                log.info("started a local Redis on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
        self.proc = None


def ensure_redis(url: str, data_dir: Path) -> tuple[str, LocalRedis | None]:
    """Return a URL where Redis answers, starting a local one for a loopback URL if needed."""
    if redis_answers(url):
        return url, None
    parts = urlsplit(url)
    if parts.scheme != "redis" or not _is_local(parts.hostname):
        raise RuntimeError(f"no Redis answers at {url}; a local one is only started for a loopback redis:// URL")
    port = parts.port or 6379
    if _port_in_use(port):
        port = free_port()  # something else (not Redis) holds the port
    password = secrets.token_urlsafe(24)
    local = LocalRedis(port, data_dir, password=password).start()
    netloc = f":{password}@127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, parts.fragment)), local
