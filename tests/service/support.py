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


def push_study(peer, paths: list[Path], *, calling_aet: str, attempts: int = 4, backoff_s: float = 2.0) -> int:
    """C-STORE ``paths`` as a modality does: a refused, dropped or aborted association is tried again, whole.

    The node keeps an association's instances only once it is released (an aborted one leaves
    nothing), so every try sends the whole study on a new association. On a loaded machine an
    association can be dropped before or while sending ("must be established before sending a
    C-STORE request"); a modality retries, and so do the tests. Returns the count stored by the
    try that went through; raises after ``attempts`` failed tries.
    """
    from service.export import push_files

    last: Exception | None = None
    for k in range(attempts):
        try:
            stored = push_files(peer, list(paths), calling_aet=calling_aet)
            if stored == len(paths):
                return stored
            last = RuntimeError(f"{stored} of {len(paths)} instances stored")
        except (ConnectionError, RuntimeError, OSError) as exc:
            last = exc
        time.sleep(backoff_s * (k + 1))
    raise AssertionError(f"{peer}: the study was not stored after {attempts} associations ({last})")
