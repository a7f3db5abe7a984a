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
import shutil
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


def _private_files() -> None:
    """Files 0640 and folders 0750 at most from here on (patient data: the service's alone)."""
    from .storage import PRIVATE_UMASK

    os.umask(PRIVATE_UMASK)


def _configured_names(config: Path | None) -> set[str]:
    """The settings named in the environment or in the settings file (lower-case field names)."""
    from dotenv import dotenv_values

    names = {k[len("SPECTDOSE_"):].lower() for k in os.environ if k.upper().startswith("SPECTDOSE_")}
    path = config or os.environ.get("SPECTDOSE_CONFIG")
    if path and Path(path).is_file():
        names |= {k[len("SPECTDOSE_"):].lower() for k, v in dotenv_values(path).items()
                  if k.upper().startswith("SPECTDOSE_") and v is not None}
    return names


def _reaches(path: Path, uid: int, gid: int) -> bool:
    """Whether user ``uid`` (group ``gid``) can pass through every folder above ``path``."""
    import stat

    for parent in path.resolve().parents:
        st = parent.stat()
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _drop_root(settings):
    """``serve`` started as root runs as ``RUN_AS_USER`` (default: spectdose if it exists, else nobody).

    Before switching, the data directory is given to that user and the kernel cache copied into it
    (the default one lies in root's home). Returns (settings, who we run as, a warning or None). A
    data directory that user cannot reach keeps root, with the warning saying why and how to fix it.
    """
    import pwd

    if os.geteuid() != 0:
        return settings, pwd.getpwuid(os.geteuid()).pw_name, None
    name = settings.run_as_user
    if name is None:
        try:
            pwd.getpwnam("spectdose")
            name = "spectdose"
        except KeyError:
            name = "nobody"
    if name == "root":
        return settings, "root", "running as root because SPECTDOSE_RUN_AS_USER=root"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"SPECTDOSE_RUN_AS_USER: no user {name!r} on this machine") from None
    data = settings.data_dir
    needed = {"the data directory": data,
              "Python": Path(sys.executable).resolve(),  # the interpreter, its standard library, our code
              "Python's standard library": Path(sys.base_prefix) / "lib" / "_",
              "the virtual environment": Path(sys.prefix) / "_",
              "the spectdose code": Path(__file__).resolve()}
    closed = [f"{what} ({path.parent if path.name == '_' else path})" for what, path in needed.items()
              if not _reaches(path, pw.pw_uid, pw.pw_gid)]
    if closed:
        return settings, "root", (f"STILL RUNNING AS ROOT: user {name} cannot reach {', '.join(closed)} (a folder "
                                  f"above is closed to it); install so that {name} can reach them, or set "
                                  "SPECTDOSE_RUN_AS_USER to a user who can")
    updates = {}
    if settings.kernel_cache_dir is None:
        own = data / "kernel-cache"
        if settings.kernel_dir.is_dir():
            shutil.copytree(settings.kernel_dir, own, dirs_exist_ok=True)
        updates["kernel_cache_dir"] = own
    (data / "run").mkdir(exist_ok=True)
    for dirpath, dirs, files in os.walk(data):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirs + files)]:
            os.lchown(entry, pw.pw_uid, pw.pw_gid)
    os.environ["MPLCONFIGDIR"] = str(data / "run")  # matplotlib's cache: root's home is closed to the user
    os.environ["HOME"] = str(data)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    return settings.model_copy(update=updates), name, None


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
        description="Local all-in-one service for a workstation or a demo. Every setting of --config FILE (or "
        "the environment) applies, tokens included; options given here win. Without SPECTDOSE_API_TOKENS the API "
        "is open and may listen on loopback only (--no-auth opens it to the network knowingly). Started as root, "
        "it runs as SPECTDOSE_RUN_AS_USER (default: spectdose, else nobody).",
    )
    _common(p)
    p.add_argument("--http-port", type=int, default=None, help="default: $SPECTDOSE_HTTP_PORT or 8000")
    p.add_argument("--dicom-port", type=int, default=None, help="default: $SPECTDOSE_DICOM_PORT or 11112")
    p.add_argument("--ae-title", default=None, help="default: $SPECTDOSE_AE_TITLE or SPECTDOSE")
    p.add_argument("--host", default=None, help="address to listen on, HTTP and DICOM (default: 127.0.0.1)")
    p.add_argument("--no-auth", action="store_true",
                   help="no API tokens even on a network address: anyone who reaches it reads patient data")
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
    """The worker of ``serve``: a child process (Celery prefork, ``worker_concurrency`` jobs at once) kept running.

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

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service.cli", "worker", "--concurrency", str(self.settings.worker_concurrency),
                "--hostname", self.hostname, "--queues", "auto"]

    def _spawn(self) -> None:
        env = {**os.environ, **self.settings.to_env()}
        self.proc = subprocess.Popen(self.command(), env=env, start_new_session=True, stdin=subprocess.DEVNULL)
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
    from .storage import private_tree

    _private_files()
    # The file and the environment give every setting (tokens included); serve's own defaults fill in
    # only what neither names, and options given on the command line win.
    configured = _configured_names(args.config)
    given = {"http_host": args.host, "dicom_host": args.host, "http_port": args.http_port,
             "dicom_port": args.dicom_port, "ae_title": args.ae_title}
    extra = {k: v for k, v in given.items() if v is not None}
    if "environment" not in configured:
        extra["environment"] = "development"
    if args.data_dir is None and "data_dir" not in configured:
        extra["data_dir"] = Path("spectdose-data")
    if args.no_auth:
        extra.update(auth_enabled=False, no_auth_beyond_loopback=True)
    if args.export:
        extra["export"] = args.export
    if args.peer:
        extra["peers"] = args.peer
    if args.allow:
        extra["allowed_calling_aets"] = args.allow
    if args.quiet_s is not None:
        extra["study_quiet_s"] = args.quiet_s
    settings = _settings(args, **extra)
    if not settings.api_tokens and "auth_enabled" not in extra and "auth_enabled" not in configured:
        extra["auth_enabled"] = False  # no token anywhere: the open local demo (loopback only, checked)
        settings = _settings(args, **extra)
    _logging(settings.log_level)
    settings.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    settings, user, user_warning = _drop_root(settings)
    private_tree(settings.data_dir)

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
        if settings.auth_enabled:
            auth = f"ON ({len(settings.api_tokens)} token(s))"
        elif settings.no_auth_beyond_loopback:
            auth = "OFF (--no-auth)"
        else:
            auth = "OFF (local demo): loopback only"
        print(
            f"spectdose serve: gateway {http_url} (docs {http_url}/docs: {settings.docs_mode}), DICOM node "
            f"{settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}, broker {redacted(redis_url)}"
            f"{' (started here)' if local_redis else ''}, data {settings.data_dir}\n"
            f"  results go to: {', '.join(settings.export) or 'nowhere (REST only)'}; "
            f"API authentication {auth}; running as {user}",
            flush=True,
        )
        shout = []
        if not settings.auth_enabled and settings.no_auth_beyond_loopback:
            shout.append(f"API AUTHENTICATION IS OFF ON {settings.http_host}:{settings.http_port} (--no-auth): ANYONE "
                         "WHO CAN REACH THIS ADDRESS READS AND SUBMITS PATIENT DATA")
        if user_warning:
            shout.append(user_warning)
        for line in shout:
            print(f"!!! WARNING: {line} !!!", flush=True)
            print(f"spectdose serve: WARNING: {line}", file=sys.stderr, flush=True)
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

    _private_files()
    extra = {k: v for k, v in {"http_host": args.host, "http_port": args.port}.items() if v is not None}
    settings = _settings(args, **extra)
    _logging(settings.log_level)
    from .storage import private_tree

    private_tree(settings.data_dir)  # what an older version left readable to other users
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

    _private_files()
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
    p.add_argument("--concurrency", type=int, default=None,
                   help="jobs at once (default: the worker_concurrency setting, 1 unless configured)")
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

    _private_files()
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
    app.worker_main(["worker", "-Q", queues, "-c", str(args.concurrency or settings.worker_concurrency), "-P", args.pool, "-n", hostname,
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
