"""Service commands for ``spectdose``: serve (all in one), gateway, node, worker.

Registered through the ``spectdose.commands`` entry-point group (each ``add_*`` takes the
argparse subparsers object); ``python -m service.cli COMMAND ...`` runs them directly.
Every option has a SPECTDOSE_* environment variable (see docs/service.md); options given
on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["add_serve", "add_gateway", "add_node", "add_worker", "main", "build_parser"]

log = logging.getLogger("spectdose.service")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="dotenv file of SPECTDOSE_* settings (default: $SPECTDOSE_CONFIG)")
    p.add_argument("--data-dir", type=Path, help="received studies, job outputs and the SQLite job store")
    p.add_argument("--redis-url", help="broker URL (default: redis://127.0.0.1:6379/0)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite under the data directory)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING")


def _settings(args: argparse.Namespace, **extra):
    from .config import load_settings

    overrides = {
        "data_dir": args.data_dir,
        "redis_url": args.redis_url,
        "database_url": args.database_url,
        "log_level": args.log_level,
        **extra,
    }
    return load_settings(args.config, **{k: v for k, v in overrides.items() if v is not None})


def _logging(level: str) -> None:
    """Our loggers at ``level``; pynetdicom and highdicom quieter (per-instance chatter, and
    their debug output can echo dataset attributes, which must stay out of the logs)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "highdicom", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _no_extra(args: argparse.Namespace, module: str | None) -> int:
    print(f"spectdose {args.command}: error: {module or 'a dependency'} is not installed; the service commands "
          "need the service extra: pip install 'spectdose[service]'", file=sys.stderr)
    return 2


def _friendly(func):
    """Operational problems (no Redis, bad settings, port in use) end with a message, status 2."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            from pydantic import ValidationError
        except ModuleNotFoundError:  # installed without the [service] extra
            return _no_extra(args, "pydantic")
        try:
            return func(args)
        except ModuleNotFoundError as exc:
            return _no_extra(args, exc.name)
        except ValidationError as exc:  # the messages only: the input values may hold secrets
            reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
            print(f"spectdose {args.command}: invalid settings: {reasons}", file=sys.stderr)
            return 2
        except (RuntimeError, ValueError, FileNotFoundError) as exc:
            print(f"spectdose {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"spectdose {args.command}: error: {exc.strerror or exc}", file=sys.stderr)
            return 2

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


# ------------------------------------------------------------------ serve


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run gateway, DICOM node and a worker in one command (starts a local Redis if none answers)",
        description="Local all-in-one service for a workstation or a demo. API authentication is off unless "
        "SPECTDOSE_API_TOKENS is set, and then the gateway listens on loopback only.",
    )
    _common(p)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--dicom-port", type=int, default=11112)
    p.add_argument("--ae-title", default="SPECTDOSE")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (HTTP and DICOM)")
    p.add_argument("--export", action="append", metavar="AET@HOST:PORT",
                   help="send results here (repeatable; default: back to the sender, see --peer)")
    p.add_argument("--peer", action="append", metavar="AET@HOST:PORT",
                   help="a known DICOM peer (repeatable); peers may send studies, other AEs are refused")
    p.add_argument("--allow", action="append", metavar="AET[@HOST]",
                   help="also accept studies from this calling AE (repeatable; '*' accepts any AE)")
    p.add_argument("--quiet-s", type=float, help="a study is complete after this many seconds without instances")
    p.add_argument("--demo", action="store_true", help="after start, push a virtual patient and show the results")
    p.add_argument("--exit-after-demo", action="store_true", help="stop the service when the demo has finished")
    p.set_defaults(func=cmd_serve)


class WorkerProcess:
    """The worker of ``serve``: a child process (Celery, prefork, concurrency 1) kept running.

    It runs in its own process group, so killing it (even with SIGKILL) takes its pool
    child with it; the supervisor then starts a new one with the same name, which takes
    back the job it held (see worker/app.py). Its pid is in ``DATA_DIR/run/worker.pid``.
    """

    def __init__(self, settings, hostname: str):
        self.settings = settings
        self.hostname = hostname
        self.pid_file = settings.data_dir / "run" / "worker.pid"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def _spawn(self) -> None:
        env = {**os.environ, **self.settings.to_env()}
        cmd = [sys.executable, "-m", "service.cli", "worker", "--concurrency", "1", "--hostname", self.hostname,
               "--queues", "auto"]
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(f"{self.proc.pid}\n")
        log.info("worker %s started (pid %d)", self.hostname, self.proc.pid)

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._spawn()
            started = time.monotonic()
            while self.proc.poll() is None and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                return
            log.warning("worker exited with status %s; restarting in %.0f s", self.proc.returncode, delay)
            self.restarts += 1
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            self._stop.wait(delay)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown; an interrupted job is requeued
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._thread.join(timeout=5)
        self.pid_file.unlink(missing_ok=True)


@_friendly
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .context import build_context
    from .demo import DEMO_SCU_AET, DemoPacs, run_demo
    from .dicom_node import DicomNode
    from .localredis import ensure_redis, redacted
    from .main import create_app

    tokens_set = bool(os.environ.get("SPECTDOSE_API_TOKENS"))
    extra = {
        "environment": "development",
        "auth_enabled": tokens_set,
        "http_host": args.host,
        "http_port": args.http_port,
        "dicom_host": args.host,
        "dicom_port": args.dicom_port,
        "ae_title": args.ae_title,
        "data_dir": args.data_dir or Path("spectdose-data"),
    }
    if args.export:
        extra["export"] = args.export
    if args.peer:
        extra["peers"] = args.peer
    if args.allow:
        extra["allowed_calling_aets"] = args.allow
    if args.quiet_s is not None:
        extra["study_quiet_s"] = args.quiet_s
    settings = _settings(args, **extra)
    _logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})

    redis_url, local_redis = ensure_redis(settings.redis_url, settings.data_dir / "redis")
    settings = settings.model_copy(update={"redis_url": redis_url})
    pacs = None
    if args.demo:
        pacs = DemoPacs(settings.data_dir / "demo-pacs").start()
        exports = [str(pacs.peer), *(args.export or [])]
        settings = settings.model_copy(update={"export": exports, "peers": [*settings.peers, str(pacs.peer)],
                                               "allowed_calling_aets": [*settings.allowed_calling_aets, DEMO_SCU_AET]})

    ctx = build_context(settings)
    node = DicomNode.for_context(ctx)
    worker = WorkerProcess(settings, f"serve@{socket.gethostname()}")
    server = uvicorn.Server(uvicorn.Config(create_app(context=ctx), host=settings.http_host,
                                           port=settings.http_port, log_level="warning", **_tls(settings)))
    http_url = f"http{'s' if settings.tls_certfile else ''}://{settings.http_host}:{settings.http_port}"
    status = {"demo": 0}

    def terminate(*_):
        raise SystemExit(0)

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM disposition that would end the process before the cleanup below.
    signal.signal(signal.SIGTERM, terminate)
    try:
        node.start()
        worker.start()
        print(
            f"spectdose serve: gateway {http_url} (docs {http_url}/docs), DICOM node {settings.ae_title}@"
            f"{settings.dicom_host}:{settings.dicom_port}, broker {redacted(redis_url)}"
            f"{' (started here)' if local_redis else ''}, data {settings.data_dir}\n"
            f"  results go to: {', '.join(settings.export) or 'nowhere (REST only)'}; "
            f"API authentication {'ON' if settings.auth_enabled else 'OFF (local demo)'}",
            flush=True,
        )
        if args.demo:
            def demo() -> None:
                while not server.started:
                    time.sleep(0.1)
                try:
                    status["demo"] = run_demo(settings, pacs, http_url=http_url, say=lambda m: print(m, flush=True))
                except Exception as exc:  # noqa: BLE001 - reported, then the service keeps running
                    print(f"[demo] failed: {type(exc).__name__}: {exc}", flush=True)
                    status["demo"] = 1
                if args.exit_after_demo:
                    server.should_exit = True

            threading.Thread(target=demo, name="demo", daemon=True).start()
        server.run()
    finally:
        node.stop()
        worker.stop()
        if pacs is not None:
            pacs.stop()
        if local_redis is not None:
            local_redis.stop()
    return status["demo"]


# ------------------------------------------------------------------ gateway, node, worker


def _tls(settings) -> dict:
    """uvicorn's TLS options from the settings (HTTPS without a reverse proxy)."""
    if settings.tls_certfile is None:
        return {}
    return {"ssl_certfile": str(settings.tls_certfile), "ssl_keyfile": str(settings.tls_keyfile)}


def add_gateway(sub) -> None:
    p = sub.add_parser("gateway", help="run the REST gateway (FastAPI on uvicorn)")
    _common(p)
    p.add_argument("--host", help="listen address (default: $SPECTDOSE_HTTP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: $SPECTDOSE_HTTP_PORT or 8000)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_gateway)


@_friendly
def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from .main import create_app

    extra = {k: v for k, v in {"http_host": args.host, "http_port": args.port}.items() if v is not None}
    settings = _settings(args, **extra)
    _logging(settings.log_level)
    if args.workers > 1:
        os.environ.update(settings.to_env())
        uvicorn.run("service.main:create_app", factory=True, host=settings.http_host, port=settings.http_port,
                    workers=args.workers, log_level="info", proxy_headers=True, **_tls(settings))
    else:
        uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port, log_level="info",
                    proxy_headers=True, **_tls(settings))
    return 0


def add_node(sub) -> None:
    p = sub.add_parser("node", help="run the DICOM node (C-ECHO, C-STORE SCP) that turns pushed studies into jobs")
    _common(p)
    p.add_argument("--host", help="listen address (default: $SPECTDOSE_DICOM_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: $SPECTDOSE_DICOM_PORT or 11112)")
    p.add_argument("--ae-title", help="our AE title (default: $SPECTDOSE_AE_TITLE or SPECTDOSE)")
    p.set_defaults(func=cmd_node)


@_friendly
def cmd_node(args: argparse.Namespace) -> int:
    from .context import build_context
    from .dicom_node import DicomNode

    extra = {k: v for k, v in {"dicom_host": args.host, "dicom_port": args.port, "ae_title": args.ae_title}.items()
             if v is not None}
    settings = _settings(args, **extra)
    _logging(settings.log_level)
    ctx = build_context(settings)
    node = DicomNode.for_context(ctx)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    print(f"DICOM node {settings.ae_title} on {settings.dicom_host}:{node.port}", flush=True)
    stop.wait()
    node.stop()
    return 0


def add_worker(sub) -> None:
    p = sub.add_parser("worker", help="run a Celery worker that computes queued jobs")
    _common(p)
    p.add_argument("--queues", default="auto",
                   help="comma-separated queues, or auto: gpu,cpu when a CUDA device is present, else cpu")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1: one dose grid in memory)")
    p.add_argument("--pool", choices=["prefork", "solo", "threads"], default="prefork",
                   help="prefork (default) enforces the time limits; solo runs the task in the worker process")
    p.add_argument("--hostname", default=None, help="Celery node name (default: worker@<host>); keep it stable")
    p.set_defaults(func=cmd_worker)


def _auto_queues() -> str:
    try:
        import torch

        return "gpu,cpu" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@_friendly
def cmd_worker(args: argparse.Namespace) -> int:
    from .celery_app import QUEUES, WORKER_MODULE, make_celery

    settings = _settings(args)
    _logging(settings.log_level)
    queues = _auto_queues() if args.queues == "auto" else args.queues
    unknown = set(queues.split(",")) - set(QUEUES)
    if unknown:
        raise SystemExit(f"unknown queue(s) {sorted(unknown)}: use {', '.join(QUEUES)}")
    os.environ.update(settings.to_env())  # the pool's children build their context from these
    importlib.import_module(WORKER_MODULE)  # the worker's signal handlers (the only way service reaches worker/)
    app = make_celery(settings)
    hostname = args.hostname or f"worker@{socket.gethostname()}"
    log.info("worker %s consuming %s", hostname, queues)
    app.worker_main(["worker", "-Q", queues, "-c", str(args.concurrency), "-P", args.pool, "-n", hostname,
                     "--loglevel", settings.log_level, "--without-gossip", "--without-mingle"])
    return 0


# ------------------------------------------------------------------ python -m service.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.cli", description="spectdose service commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_serve, add_gateway, add_node, add_worker):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
