"""Helpers shared by the service tests (settings, archives, child processes, waiting)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from service.config import Settings

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(data_dir: Path, **kw) -> Settings:
    base = dict(
        environment="production",
        api_tokens=[TOKEN],
        data_dir=data_dir,
        redis_url="redis://127.0.0.1:1/0",
        min_free_disk_mb=0,
        study_quiet_s=1.0,
        export=[],
        export_backoff_s=0.05,
        retry_backoff_s=0.1,
        default_method="dvk",  # the CNN path has its own tests; keep service tests fast
    )
    base.update(kw)
    return Settings(**base)



def zip_folder(folder: Path, target: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return target


@contextlib.contextmanager
def running(cmd: list[str], **kw):
    """A child process, terminated (then killed) on exit."""
    proc = subprocess.Popen(cmd, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
