"""On-disk layout under the data directory, atomic writes and safe archive unpacking.

::

    DATA_DIR/
      uploads/<tmp>/            REST uploads while they are checked (removed after)
      staging/<association>/    instances of an open DICOM association (used only on release)
      incoming/<study>/         instances of studies arriving over DICOM, by SOP Instance UID
      jobs/<job_id>/input/      the job's input, hard-linked or moved here before it is queued
      jobs/<job_id>/work-<n>/   attempt n writing its outputs
      jobs/<job_id>/output/     the published outputs (replaced whole by a rerun)

Everything that must survive a crash is written to a temporary name, fsynced and renamed.
Inputs hold patient data, so :meth:`Storage.purge` removes what the retention settings
no longer keep (inputs of finished jobs by age; whole job folders by age, count or size).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from spectdose.dicom.archive import UnsafeArchiveError, unpack_zip

__all__ = ["Storage", "UnsafeArchive", "extract_zip", "atomic_write_bytes", "safe_component", "fsync_dir",
           "publish_folder", "folder_manifest", "private_tree", "PRIVATE_UMASK"]

log = logging.getLogger("spectdose.service.storage")

# Patient data is readable by the service alone: files 0640, folders 0750 at most (owner and the
# service's own group; nothing for other local users). The commands set this umask at start-up,
# and what is published is brought to it explicitly (private_tree), whatever the umask was.
PRIVATE_UMASK = 0o027
_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_COMPLETE = ".complete.json"


class UnsafeArchive(Exception):
    """An archive refused as a whole; ``kind`` is traversal, bomb, too_large, too_many or corrupt."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def safe_component(text: str) -> str:
    """A path component for a UID: the UID itself when it is one, else a hash (never a name)."""
    if _UID.match(text) and ".." not in text:
        return text
    return "h" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_tree(root: Path) -> None:
    """Take group write and every permission of other users off ``root`` and everything under it
    (symbolic links left alone); files and folders already private are not touched."""
    def tighten(path: str) -> None:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & PRIVATE_UMASK:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~PRIVATE_UMASK)

    if not os.path.lexists(root):
        return
    tighten(str(root))
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            tighten(os.path.join(dirpath, name))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish_folder(work: Path, final: Path, manifest: dict, *, keep_complete: bool = False) -> Path:
    """Make ``work`` the folder ``final`` whole: the manifest (``.complete.json``) is written last and
    everything is on disk before the rename, so a half-written folder is never taken for a finished one.

    An earlier ``final`` is replaced, unless ``keep_complete`` and it is complete (another attempt
    finished first: its objects stand, ``work`` is dropped).
    """
    atomic_write_bytes(work / _COMPLETE, json.dumps(manifest, indent=2, sort_keys=True).encode())
    private_tree(work)  # results name the patient: never readable by other local users
    _fsync_tree(work)
    if keep_complete and (final / _COMPLETE).is_file():
        shutil.rmtree(work, ignore_errors=True)
        return final
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(work, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def folder_manifest(folder: Path) -> dict | None:
    """The manifest of a complete folder (:func:`publish_folder`), or None."""
    try:
        return json.loads((folder / _COMPLETE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def extract_zip(archive: Path, dest: Path, *, max_bytes: int, max_members: int, prefix: str = "z") -> list[Path]:
    """Unpack ``archive`` into ``dest`` under generated names; refuse hostile archives whole.

    Member names are never used as paths (each member becomes ``dest/<prefix><n>.dcm``), so
    nothing can land outside ``dest``; a name that *tries* to (absolute, ``..``, drive
    letter) makes the archive suspect and it is refused. The declared sizes are checked
    against ``max_bytes`` and the compression ratio before anything is written, and the
    bytes actually inflated are counted again while writing.

    Raises
    ------
    UnsafeArchive
        traversal, bomb, too_large, too_many or corrupt.
    """
    try:
        members = unpack_zip(archive, dest, max_bytes=max_bytes, max_members=max_members, prefix=prefix, suffix=".dcm")
    except UnsafeArchiveError as exc:
        raise UnsafeArchive(exc.kind, str(exc)) from exc
    damaged = [m for m in members if m.problem]
    if damaged:
        raise UnsafeArchive("corrupt", f"{damaged[0].problem} in {archive.name}")
    return [m.path for m in members]


class Storage:
    """The data directory: paths derived from study UIDs and job ids, plus atomic publishing."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.uploads = self.root / "uploads"
        self.staging = self.root / "staging"
        self.incoming_root = self.root / "incoming"
        self.jobs_root = self.root / "jobs"
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        for d in (self.uploads, self.staging, self.incoming_root, self.jobs_root):
            d.mkdir(mode=0o750, exist_ok=True)
        for d in (self.root, self.uploads, self.staging, self.incoming_root, self.jobs_root):
            with contextlib.suppress(PermissionError):  # a folder of someone else's: left as it is
                mode = stat.S_IMODE(d.stat().st_mode)
                if mode & PRIVATE_UMASK:
                    os.chmod(d, mode & ~PRIVATE_UMASK)

    # ------------------------------------------------------------------ paths

    def incoming_dir(self, study_instance_uid: str) -> Path:
        return self.incoming_root / safe_component(study_instance_uid)

    def staging_dir(self, key: str) -> Path:
        return self.staging / safe_component(key)

    def job_dir(self, job_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_root / job_id

    def job_input(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def job_output(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "output"

    def job_work(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"work-{attempt}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # ------------------------------------------------------------------ uploads and inputs

    @contextlib.contextmanager
    def upload_dir(self) -> Iterator[Path]:
        """A private folder for one upload; removed on exit unless its content was published."""
        path = self.uploads / uuid.uuid4().hex
        path.mkdir(mode=0o700, parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish_input(self, job_id: str, files: list[Path]) -> tuple[int, int]:
        """Move (or hard-link) ``files`` into the job's input folder, durably; return (count, bytes).

        Files are put in a temporary sibling folder, fsynced, and renamed into place, so the
        input folder exists complete or not at all.
        """
        final = self.job_input(job_id)
        tmp = self.job_dir(job_id) / f".input-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        n_bytes = 0
        try:
            for i, src in enumerate(files):
                target = tmp / (src.name if src.name.endswith(".dcm") else f"f{i:06d}.dcm")
                if target.exists():
                    target = tmp / f"f{i:06d}-{target.name}"
                try:
                    os.link(src, target)
                except OSError:
                    shutil.copy2(src, target)
                n_bytes += target.stat().st_size
            private_tree(tmp)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)  # an earlier, unfinished dispatch of the same job
            os.replace(tmp, final)
            fsync_dir(final.parent)
            fsync_dir(final.parent.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return len(files), n_bytes

    # ------------------------------------------------------------------ outputs

    def new_work_dir(self, job_id: str, attempt: int) -> Path:
        work = self.job_work(job_id, attempt)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(mode=0o750, parents=True)
        return work

    def publish_output(self, job_id: str, work: Path, manifest: dict) -> Path:
        """Make ``work`` the job's output folder, replacing any earlier one whole (:func:`publish_folder`)."""
        return publish_folder(work, self.job_output(job_id), manifest)

    def output_manifest(self, job_id: str) -> dict | None:
        """The manifest of a complete output folder, or None."""
        return folder_manifest(self.job_output(job_id))

    def clean_work_dirs(self, job_id: str) -> None:
        for p in self.job_dir(job_id).glob("work-*"):
            shutil.rmtree(p, ignore_errors=True)

    def discard_work(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's work folder (not another attempt's: it may be running)."""
        shutil.rmtree(self.job_work(job_id, attempt), ignore_errors=True)

    # ------------------------------------------------------------------ retention

    @staticmethod
    def _tree_bytes(path: Path) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def purge(self, store, *, inputs_days: float = 0, jobs_days: float = 0, max_jobs: int = 0, max_bytes: int = 0,
              now: dt.datetime | None = None) -> dict[str, int]:
        """Apply the retention policy to finished (done or failed) jobs; 0 turns a rule off.

        - inputs of jobs finished more than ``inputs_days`` ago (and DICOM-received studies
          whose last instance is that old and which no open burst uses);
        - whole job folders finished more than ``jobs_days`` ago;
        - the oldest finished job folders beyond ``max_jobs``, or while the job folders
          together exceed ``max_bytes``.

        Queued and running jobs are never touched. Each removal is audited (job id, what).
        """
        from .db import IncomingState, IncomingStudy, Job, JobState, utcnow

        now = now or utcnow()
        with store.session(readonly=True) as s:
            rows = s.execute(
                Job.__table__.select()
                .with_only_columns(Job.id, Job.finished_at, Job.updated_at)
                .where(Job.state.in_([str(JobState.DONE), str(JobState.FAILED)]))
            ).all()
            open_studies = set(s.scalars(
                IncomingStudy.__table__.select().with_only_columns(IncomingStudy.study_instance_uid).where(
                    IncomingStudy.state.in_([str(IncomingState.RECEIVING), str(IncomingState.DISPATCHING)]))
            ).all())
        finished = sorted(((r.finished_at or r.updated_at or now), r.id) for r in rows if self.job_dir(r.id).exists())
        counts = {"inputs": 0, "jobs": 0, "incoming": 0, "bytes": 0}

        def remove(path: Path, job_id: str | None, what: str, key: str) -> None:
            size = self._tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            counts[key] += 1
            counts["bytes"] += size
            store.audit("retention", "purged", job_id=job_id, what=what, bytes=size)

        if inputs_days > 0:
            cutoff = now - dt.timedelta(days=inputs_days)
            for finished_at, job_id in finished:
                if finished_at < cutoff and self.job_input(job_id).exists():
                    remove(self.job_input(job_id), job_id, "input", "inputs")
            for folder in self.incoming_root.iterdir():
                newest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
                if folder.name in {safe_component(u) for u in open_studies}:
                    continue
                if dt.datetime.fromtimestamp(newest, dt.UTC).replace(tzinfo=None) < cutoff:
                    remove(folder, None, "incoming study", "incoming")
        keep = list(finished)
        if jobs_days > 0:
            cutoff = now - dt.timedelta(days=jobs_days)
            for item in [x for x in keep if x[0] < cutoff]:
                remove(self.job_dir(item[1]), item[1], "job folder (age)", "jobs")
                keep.remove(item)
        if max_jobs > 0:
            while len(keep) > max_jobs:
                _t, job_id = keep.pop(0)
                remove(self.job_dir(job_id), job_id, "job folder (count)", "jobs")
        if max_bytes > 0:
            total = self._tree_bytes(self.jobs_root)
            while keep and total > max_bytes:
                _t, job_id = keep.pop(0)
                before = counts["bytes"]
                remove(self.job_dir(job_id), job_id, "job folder (size)", "jobs")
                total -= counts["bytes"] - before
        if counts["inputs"] or counts["jobs"] or counts["incoming"]:
            log.info("retention: removed %d input(s), %d job folder(s), %d incoming study folder(s), %.1f MiB",
                     counts["inputs"], counts["jobs"], counts["incoming"], counts["bytes"] / 2**20)
        return counts

    def clear_staging(self) -> int:
        """Remove instances of associations that never ended in a release (a crash or abort)."""
        n = 0
        for p in self.staging.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n
