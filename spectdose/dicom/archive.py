"""Unpacking zip archives of DICOM safely: the one implementation the CLI and service share.

Member names are never used as paths: member ``n`` is written to ``dest/<prefix><n><suffix>``,
so nothing can land outside ``dest``. A name that *tries* to (absolute, ``..``, drive
letter, NUL) makes the whole archive suspect and it is refused, as are archives over the
member-count, size or compression-ratio limits (zip bombs). Declared sizes are checked
before anything is written and the bytes actually inflated are counted again while writing.
"""

from __future__ import annotations

import dataclasses
import errno
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from spectdose.errors import InputError

__all__ = ["MAX_ZIP_RATIO", "MAX_ZIP_MEMBERS", "UnsafeArchiveError", "ArchiveMember", "unpack_zip"]

# A member (or the archive as a whole) claiming to inflate by more than this is taken for
# a zip bomb; DICOM compresses 2-10-fold. Tiny members compress wildly, so the ratio is only
# judged above 1 MiB.
MAX_ZIP_RATIO = 200.0
MAX_ZIP_MEMBERS = 100_000
_RATIO_MIN_BYTES = 1 << 20


class UnsafeArchiveError(InputError):
    """A refused archive; ``kind`` is traversal, bomb, too_large, too_many or corrupt."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class ArchiveMember:
    name: str  # as stored in the archive (for messages only)
    path: Path  # where its bytes were written
    problem: str | None = None  # a damaged or encrypted member: nothing usable was written


def _is_traversal(name: str) -> bool:
    if "\x00" in name:
        return True
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return True
    return any(part == ".." for part in PurePosixPath(norm).parts)


def unpack_zip(
    archive: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_members: int = MAX_ZIP_MEMBERS,
    prefix: str = "",
    suffix: str = "",
) -> list[ArchiveMember]:
    """Write the members of ``archive`` into ``dest``; refuse hostile archives whole.

    Raises
    ------
    UnsafeArchiveError
        Not a zip (corrupt), too many members, a traversal name, more than ``max_bytes``
        uncompressed, or a compression ratio of a zip bomb.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchiveError("corrupt", f"{archive.name}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > max_members:
            raise UnsafeArchiveError(
                "too_many", f"{archive.name}: {len(infos)} members, more than the limit of {max_members}"
            )
        for info in infos:
            if _is_traversal(info.filename):
                raise UnsafeArchiveError(
                    "traversal",
                    f"{archive.name}: member name {info.filename!r} points outside the archive "
                    "(absolute path or '..'); refusing the archive",
                )
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise UnsafeArchiveError(
                "too_large",
                f"{archive.name}: uncompressed size {total / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:.1f} MiB",
            )
        for info in infos:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size >= _RATIO_MIN_BYTES and ratio > MAX_ZIP_RATIO:
                raise UnsafeArchiveError(
                    "bomb",
                    f"{archive.name}: member {info.filename!r} inflates {ratio:.0f}-fold "
                    f"(limit {MAX_ZIP_RATIO:.0f}); refusing a possible zip bomb",
                )
        archive_bytes = max(archive.stat().st_size, 1)
        if total >= _RATIO_MIN_BYTES and total > MAX_ZIP_RATIO * archive_bytes:
            raise UnsafeArchiveError(
                "bomb",
                f"{archive.name}: declares {total / archive_bytes:.0f} times its own size "
                f"(limit {MAX_ZIP_RATIO:.0f}); refusing a possible zip bomb (overlapping members?)",
            )
        dest.mkdir(parents=True, exist_ok=True)
        out: list[ArchiveMember] = []
        written = 0
        for n, info in enumerate(infos):
            if (info.external_attr >> 16) & 0o170000 == stat.S_IFLNK:
                continue  # symbolic links are never materialised
            target = dest / f"{prefix}{n:06d}{suffix}"
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    # zipfile stops at the declared size and checks the CRC; count anyway.
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise UnsafeArchiveError(
                                "bomb", f"{archive.name}: more data than declared; refusing the archive"
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
                target.unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # our disk is full: not the archive's fault
                out.append(ArchiveMember(info.filename, target, f"damaged or encrypted archive member ({type(exc).__name__})"))
                continue
            out.append(ArchiveMember(info.filename, target))
        return out
