"""One free-space guard for the gateway, the DICOM node and the worker, and one name for a full disk.

A full disk is the server's problem, not the client's: uploads are refused with 507 and a
``Retry-After``, DICOM with an out-of-resources status, and a job waits (a transient,
retried failure) instead of failing as if its study were damaged. ENOSPC reaches us in
many disguises (an OSError deep in zipfile, SQLite's "database or disk is full", Redis's
MISCONF after a failed append-only write, PostgreSQL's 53100), so :func:`is_disk_full`
walks the exception chain and recognises each.
"""

from __future__ import annotations

import errno

__all__ = ["DiskFull", "is_disk_full", "check_free_space", "DISK_FULL_NAME"]

DISK_FULL_NAME = "insufficient storage on the server (ENOSPC: no space left on device)"
_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_MESSAGES = ("no space left on device", "database or disk is full", "misconf", "disk quota exceeded",
             "could not extend file")


class DiskFull(Exception):
    """Not enough free space to accept or write data; ``retry_after_s`` is when to try again."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or anything in its cause/context chain) means the disk is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return True
        if getattr(exc, "sqlstate", None) == "53100" or getattr(exc, "pgcode", None) == "53100":
            return True  # PostgreSQL disk_full
        text = str(exc).lower()
        if any(m in text for m in _MESSAGES):
            return True
        orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's exception
        if orig is not None and is_disk_full(orig):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_free_space(free_bytes: int, min_free_bytes: int, retry_after_s: int, need_bytes: int = 0) -> None:
    """Raise :class:`DiskFull` unless ``need_bytes`` fit while keeping ``min_free_bytes`` free."""
    if free_bytes - max(need_bytes, 0) < min_free_bytes:
        raise DiskFull(
            f"{DISK_FULL_NAME}: {free_bytes / 2**20:.0f} MiB free, the server keeps at least "
            f"{min_free_bytes / 2**20:.0f} MiB; nothing was stored, retry in {retry_after_s} s",
            retry_after_s,
        )
