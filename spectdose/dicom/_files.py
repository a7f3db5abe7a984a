"""Finding DICOM files in a folder or zip archive and reading their headers safely.

Private to :mod:`spectdose.dicom.ingest`. Everything here is about files, not physics: which
paths hold DICOM, whether a file is complete, and unpacking archives without letting a
hostile archive write outside a temporary folder or fill the disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MediaStorageDirectoryStorage

from spectdose.dicom.archive import unpack_zip
from spectdose.errors import InputError

_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file found in the input; ``problem`` says why it cannot even be opened."""

    relpath: str  # relative to the input folder or archive
    path: Path  # where to read it now (inside a temporary folder for archives)
    problem: str = ""


@dataclasses.dataclass
class FileHeader:
    """One DICOM file: where it is, its header (no pixels), and whether it is complete."""

    relpath: str  # relative to the input folder or archive; safe to show (no patient data added)
    path: Path  # where to read it now (inside a temporary folder for archives)
    header: Dataset
    forced: bool  # read without the 128-byte preamble / 'DICM' prefix
    truncated: str  # "" if complete, else why we think the file is cut short


def ds_float(ds: Dataset, keyword: str, default: float, where: str) -> float:
    """A numeric attribute as float: ``default`` when absent or empty, InputError when malformed."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise InputError(f"{where}: {keyword} is not a finite number")
    return out


def convert_all_elements(ds: Dataset) -> None:
    """Parse every element now (pydicom converts lazily), so corrupt bytes fail here, not later."""
    for _ in ds.iterall():
        pass
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for _ in meta.iterall():
            pass


def _unpack_zip(archive: Path, dest: Path, max_zip_bytes: int) -> list[InputFile]:
    """The members of ``archive`` as input files (damaged members listed with the reason)."""
    return [InputFile(m.name, m.path, m.problem or "") for m in unpack_zip(archive, dest, max_bytes=max_zip_bytes)]


@contextlib.contextmanager
def input_files(path: str | Path, max_zip_bytes: int) -> Iterator[list[InputFile]]:
    """Yield an :class:`InputFile` for every regular file under ``path``.

    ``path`` is a folder (walked recursively, sorted, symlinked folders not followed), a
    zip archive (unpacked into a temporary folder removed on exit) or a single file.
    """
    root = Path(path)
    if not root.exists():
        raise InputError(f"input path {root} does not exist")
    if root.is_dir():
        files: list[InputFile] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.is_file():
                    files.append(InputFile(p.relative_to(root).as_posix(), p))
        yield files
        return
    if zipfile.is_zipfile(root):
        tmp = Path(tempfile.mkdtemp(prefix="spectdose-zip-"))
        try:
            yield _unpack_zip(root, tmp, max_zip_bytes)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if root.suffix.lower() == ".zip":
        raise InputError(f"{root.name}: not a readable zip archive")
    yield [InputFile(root.name, root)]


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0002 or 0008 element (little endian)."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0020:
        return False
    vr = head[4:6]
    # explicit VR: two upper-case letters; implicit VR: a 4-byte length follows the tag
    return (vr.isalpha() and vr.isupper()) or struct.unpack("<I", head[4:8])[0] < 1 << 16


def _pixel_data_truncation(fp, file_size: int, header: Dataset) -> str:
    """Why the file looks cut short, or "" if the pixel data fits in the file.

    ``fp`` is positioned where ``dcmread(stop_before_pixels=True)`` stopped, i.e. at the
    Pixel Data element (or at the end of the file if there was none).
    """
    pos = fp.tell()
    if pos >= file_size:
        if "SeriesInstanceUID" not in header:
            return "ends inside its header"
        is_image = "Rows" in header or header.get("Modality", "") in ("CT", "NM", "PT")
        return "ends before its pixel data" if is_image else ""
    tag_bytes = fp.read(8)
    if len(tag_bytes) < 8:
        return "ends inside the pixel data element header"
    group, element = struct.unpack("<HH", tag_bytes[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return ""  # stopped for another reason (e.g. float pixel data); not ours to judge
    implicit = header.original_encoding[0] if header.original_encoding[0] is not None else False
    if implicit:
        length = struct.unpack("<I", tag_bytes[4:8])[0]
        start = pos + 8
    else:
        rest = fp.read(4)
        if len(rest) < 4:
            return "ends inside the pixel data element header"
        length = struct.unpack("<I", rest)[0]
        start = pos + 12
    if length == 0xFFFFFFFF:  # encapsulated (compressed): must end with a sequence delimiter
        fp.seek(max(file_size - 8, 0))
        tail = fp.read(8)
        if tail != b"\xfe\xff\xdd\xe0\x00\x00\x00\x00":
            return "compressed pixel data without its closing delimiter"
        return ""
    if start + length > file_size:
        return f"pixel data cut short ({file_size - start} of {length} bytes)"
    return ""


def read_header(item: InputFile) -> FileHeader | str:
    """Read one file's header; return a :class:`FileHeader` or the reason it is not usable DICOM."""
    if item.problem:
        return item.problem
    relpath, path = item.relpath, item.path
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size == 0:
        return "empty file"
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR index (images are found by scanning, not through the index)"
    if path.suffix.lower() in _ARCHIVE_SUFFIXES:
        return "archive inside the input is not opened (pass the archive itself)"
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
            forced = not (len(head) == 132 and head[128:132] == b"DICM")
            if forced and not _looks_like_raw_dicom(head):
                return "not DICOM"
            fp.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = pydicom.dcmread(fp, stop_before_pixels=True, force=forced)
                truncated = _pixel_data_truncation(fp, size, header)
                convert_all_elements(header)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except (
        Exception
    ) as exc:  # pydicom raises many types on corrupt bytes; the file is what is wrong
        return f"damaged or truncated DICOM, not readable ({type(exc).__name__})"
    meta = getattr(header, "file_meta", None)
    sop_class = str(
        header.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")
    )
    if sop_class == MediaStorageDirectoryStorage:
        return "DICOMDIR index (images are found by scanning, not through the index)"
    if forced and not ("SOPClassUID" in header and "SeriesInstanceUID" in header):
        return "not DICOM (no SOP Class or Series Instance UID)"
    return FileHeader(relpath=relpath, path=path, header=header, forced=forced, truncated=truncated)
