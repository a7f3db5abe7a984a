"""Receiving a study over REST: spool, unpack, check, store durably, then queue.

Accepted bodies: a zip (``application/zip``), ``multipart/form-data`` file parts (DICOM
files or zips), and DICOMweb STOW-RS ``multipart/related; type="application/dicom"``.
The body is spooled to disk under the size limit, split and unpacked into a private
folder, and checked with the core's header scan (no pixels read). Only a study with a
CT and a SPECT is stored as a job; a bad upload is refused with a 4xx and a reason, and
its folder is removed, so nothing stored before is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .config import Settings
from .db import JobState
from .diskguard import DISK_FULL_NAME, DiskFull, check_free_space, is_disk_full
from .jobs import InstanceDigest, JobStore, content_fingerprint, instance_digest
from .queue import Enqueuer
from .storage import Storage, UnsafeArchive, atomic_write_bytes, extract_zip

__all__ = ["UploadRejected", "SubmitParams", "Accepted", "Sender", "accept_study", "receive_study", "spool_body",
           "RegionSetAccepted", "accept_region_set", "publish_region_set", "read_region_file", "job_ct", "file_digest",
           "REGIONS_TASK_NAME",
           "store_upload", "study_incomplete", "ZIP_TYPES"]

log = logging.getLogger("spectdose.service.intake")

ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})
_DICOM_TYPES = frozenset({"application/dicom", "application/octet-stream", ""})
_TRUNCATION_WORDS = ("truncat", "cut short", "ends before", "ends inside", "without its closing")


class UploadRejected(Exception):
    """A refused upload: the HTTP status and the reason shown to the client."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers or {}
        self.instances: tuple[InstanceDigest, ...] = ()  # what was read before the refusal (STOW-RS response)


@dataclasses.dataclass(frozen=True)
class SubmitParams:
    """Per-study options (query parameters of POST /studies)."""

    options: dict
    export: list[str]
    recompute: bool = False  # a new job even when the same content with the same options has one
    cycle_id: str | None = None  # the therapy cycle a client names for the study (service/cycles.py)


@dataclasses.dataclass(frozen=True)
class Accepted:
    job_id: str
    files: int
    ignored_files: int
    study_instance_uid: str | None
    duplicate: bool = False  # the existing job of the same content and options
    instances: tuple[InstanceDigest, ...] = ()


class ClientGone(UploadRejected):
    """The client disconnected before its body ended: audited once, answered to nobody."""

    def __init__(self):
        super().__init__(400, "the client disconnected before the request body ended; nothing was stored")


async def spool_body(stream, target: Path, max_bytes: int, timeout_s: float | None = None) -> int:
    """Write the request body to ``target``; refuse past ``max_bytes`` (413) or ``timeout_s`` idle (408).

    The idle limit frees the request and its spool folder when a client sends headers
    and then nothing (or stalls half-way).
    """
    n = 0
    chunks = stream.__aiter__()
    with open(target, "wb") as fh:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UploadRejected(408, f"no request body data for {timeout_s:g} s: upload dropped, nothing "
                                          "was stored", headers={"Connection": "close"}) from None
            except ClientDisconnect:
                raise ClientGone() from None
            n += len(chunk)
            if n > max_bytes:
                raise UploadRejected(413, f"upload exceeds the limit of {max_bytes / 2**20:.1f} MiB")
            fh.write(chunk)
    if n == 0:
        raise UploadRejected(400, "empty request body: send a zip, multipart files or STOW-RS parts")
    return n


@dataclasses.dataclass
class _Part:
    path: Path
    headers: dict[str, str]

    @property
    def content_type(self) -> str:
        return parse_options_header(self.headers.get("content-type", ""))[0].decode("latin-1").lower()

    @property
    def filename(self) -> str:
        params = parse_options_header(self.headers.get("content-disposition", ""))[1]
        return params.get(b"filename", b"").decode("utf-8", "replace")


def _split_multipart(spool: Path, boundary: bytes, dest: Path, max_parts: int) -> list[_Part]:
    """Split a multipart body into one file per part (headers kept, names generated)."""
    parts: list[_Part] = []
    state: dict = {"field": b"", "value": b"", "headers": {}, "fh": None, "ended": False}

    def on_part_begin():
        state["headers"] = {}
        state["field"], state["value"] = b"", b""

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").strip().lower()] = state["value"].decode("latin-1").strip()
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        if len(parts) >= max_parts:
            raise UploadRejected(413, f"more than {max_parts} parts in one request")
        path = dest / f"p{len(parts):06d}.part"
        state["fh"] = open(path, "wb")  # noqa: SIM115 - closed in on_part_end
        parts.append(_Part(path, state["headers"]))

    def on_part_data(data, start, end):
        state["fh"].write(data[start:end])

    def on_part_end():
        state["fh"].close()
        state["fh"] = None

    def on_end():
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        with open(spool, "rb") as fh:
            while chunk := fh.read(1 << 20):
                parser.write(chunk)
        parser.finalize()
    except UploadRejected:
        raise
    except Exception as exc:  # python-multipart raises its own and ValueError types on bad framing
        raise UploadRejected(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from exc
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    if not state["ended"]:
        # python-multipart's finalize() accepts a body cut off mid-part; a study missing its
        # last instances must not be computed as if it were whole.
        raise UploadRejected(
            400, f"the multipart body ends without its closing boundary (--boundary--): the upload was cut off "
            f"after {len(parts)} part(s); nothing was stored, send the whole study again")
    if not parts:
        raise UploadRejected(400, "multipart body without any part")
    return parts


def _unpack(spool: Path, content_type: str, work: Path, settings: Settings) -> list[Path]:
    """The files of the upload, by media type; archives unpacked safely."""
    media, params = parse_options_header(content_type or "")
    media_s = media.decode("latin-1").lower()
    files_dir = work / "files"
    files_dir.mkdir()
    limits = {"max_bytes": settings.max_unzipped_bytes, "max_members": settings.max_upload_files}
    try:
        if media_s in ZIP_TYPES:
            return extract_zip(spool, files_dir, prefix="z", **limits)
        if media_s in ("multipart/form-data", "multipart/related"):
            boundary = params.get(b"boundary")
            if not boundary:
                raise UploadRejected(400, f"{media_s} without a boundary parameter")
            stow = media_s == "multipart/related"
            if stow:
                declared = params.get(b"type", b"").decode("latin-1").lower()
                if declared != "application/dicom":
                    raise UploadRejected(
                        415, f'STOW-RS type {declared or "(none)"!r} is not supported: send type="application/dicom"'
                    )
            parts = _split_multipart(spool, boundary, work, settings.max_upload_files)
            out: list[Path] = []
            for i, part in enumerate(parts):
                ctype = part.content_type
                if stow and ctype not in ("application/dicom", ""):
                    raise UploadRejected(415, f"STOW-RS part {i + 1} is {ctype!r}, not application/dicom")
                if not stow and "filename" not in part.headers.get("content-disposition", ""):
                    continue  # a plain form field, not a file
                if ctype in ZIP_TYPES or part.filename.lower().endswith(".zip"):
                    out += extract_zip(part.path, files_dir, prefix=f"z{i:04d}-", **limits)
                    part.path.unlink()
                elif ctype in _DICOM_TYPES or not stow:
                    target = files_dir / f"m{i:06d}.dcm"
                    part.path.rename(target)
                    out.append(target)
            if not out:
                raise UploadRejected(400, "no file parts in the multipart body")
            return out
    except UnsafeArchive as exc:
        status = 413 if exc.kind in ("bomb", "too_large", "too_many") else 400
        raise UploadRejected(status, f"archive refused: {exc}") from exc
    raise UploadRejected(
        415,
        f"unsupported Content-Type {media_s or '(none)'!r}: use application/zip, multipart/form-data or "
        'multipart/related; type="application/dicom" (STOW-RS)',
    )


def _ct_gaps(headers: list) -> str | None:
    """Why the CT slices with these headers are not a whole volume (positions missing inside it), or None."""
    import numpy as np

    positions, normal = [], None
    for ds in headers:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return None  # the core says what is wrong with such a series
        if normal is None:
            iop = np.asarray(ds.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
        positions.append(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    if len(positions) < 3:
        return None
    dist = np.sort(np.asarray(positions))
    gaps = np.diff(dist)
    nominal = float(np.median(gaps))
    if nominal <= 1e-3:
        return None
    missing = int(round(float(np.sum(np.maximum(np.round(gaps / nominal) - 1, 0)))))
    if missing == 0:
        return None
    k = int(np.argmax(gaps))
    return (f"{missing} slice(s) missing inside the volume ({len(positions)} present, spacing {nominal:.2f} mm, "
            f"largest gap {gaps[k]:.2f} mm between {dist[k]:.1f} and {dist[k + 1]:.1f} mm)")


def _check_complete(files_dir: Path, inv) -> None:
    """Refuse (422) a study whose every CT series has slices missing between its first and last.

    Only what the headers allow: a gap in the slice positions. Slices cut off at either end
    leave no trace in the headers; a cut-off body is caught by its missing closing boundary.
    NM frames against the pixel data are checked by the core's scan (truncated or mismatched).
    Each file's header is read once for both checks (issue 20: the gateway's time per upload).
    """
    from spectdose.dicom.completeness import read_headers

    headers = read_headers(p for p in files_dir.rglob("*") if p.is_file())
    wanted = {s.series_instance_uid for s in inv.ct_candidates}
    by_series: dict[str, list] = {}
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid in wanted and str(ds.get("Modality", "")).upper() == "CT":
            by_series.setdefault(uid, []).append(ds)
    problems = {uid: why for uid, series in by_series.items() if (why := _ct_gaps(series))}
    if problems and len(problems) == len(wanted):
        why = "; ".join(problems.values())
        raise UploadRejected(422, f"incomplete study: the CT series has {why}; send the whole study again")
    why = study_incomplete(headers)
    if why:
        raise UploadRejected(422, f"incomplete study: {why}; nothing was stored, send the whole study again")


def study_incomplete(files) -> str | None:
    """Why a study's CT cannot be whole (cut at either end of the SPECT, fewer slices than its header counts),
    or None; of files or headers already read; for REST uploads and DICOM bursts alike (:func:`spectdose.dicom.completeness.ct_coverage_problem`)."""
    from spectdose.dicom.completeness import ct_coverage_problem

    return ct_coverage_problem(files)


def _check_study(files_dir: Path, max_bytes: int) -> tuple[str | None, int]:
    """Refuse uploads that cannot be a SPECT/CT study; return (study UID, ignored file count)."""
    from spectdose.dicom.ingest import scan_dicom
    from spectdose.errors import SpectdoseError

    try:
        inv = scan_dicom(files_dir, max_zip_bytes=max_bytes)
    except SpectdoseError as exc:
        raise UploadRejected(400, f"unreadable upload: {exc}") from exc
    truncated = [f for s in inv.series for f in s.truncated_files]
    truncated += [f for f, why in inv.ignored_files if any(w in why for w in _TRUNCATION_WORDS)]
    if truncated:
        raise UploadRejected(400, f"{len(truncated)} DICOM file(s) are truncated (cut short); send the study again")
    if not inv.series:
        reasons = sorted({why for _f, why in inv.ignored_files})
        raise UploadRejected(
            400, f"no DICOM instances in the upload ({len(inv.ignored_files)} file(s): {'; '.join(reasons[:3])})"
        )
    modalities = sorted({s.modality for s in inv.series})
    if not inv.ct_candidates and not inv.spect_candidates:
        raise UploadRejected(
            422, f"wrong modality: the upload holds {', '.join(modalities)}; a SPECT/CT study needs a CT and an NM SPECT"
        )
    if not inv.ct_candidates:
        why = "; ".join(f"{s.modality}: {s.reason}" for s in inv.series if s.modality == "CT" and s.reason)
        raise UploadRejected(
            422, "no usable CT series in the upload" + (f" ({why})" if why else f" (found {', '.join(modalities)})")
        )
    if not inv.spect_candidates:
        why = "; ".join(f"{s.modality}: {s.reason}" for s in inv.series if s.modality in ("NM", "PT") and s.reason)
        raise UploadRejected(
            422,
            "no usable SPECT (NM) series in the upload" + (f" ({why})" if why else f" (found {', '.join(modalities)})"),
        )
    _check_complete(files_dir, inv)
    studies = {s.study_instance_uid for s in inv.ct_candidates + inv.spect_candidates}
    return (next(iter(studies)) if len(studies) == 1 else None), len(inv.ignored_files)


@dataclasses.dataclass(frozen=True)
class Sender:
    """Who sent a study, as its job records it."""

    source: str  # "rest" or "dicom"
    submitted_by: str  # an API token's label, or the calling AE title
    remote_host: str | None
    calling_aet: str | None = None
    incoming_id: str | None = None  # the DICOM study burst the job was made from


def accept_study(
    store: JobStore,
    storage: Storage,
    enqueuer: Enqueuer,
    *,
    job_id: str,
    files: Sequence[Path],
    sender: Sender,
    options: dict,
    export: list[str],
    queue: str,
    study_instance_uid: str | None,
    fingerprint: str,
    refused: str | None = None,
    on_stored: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Make job ``job_id`` from stored instances: publish them as its input, record it, queue it.

    The one way a job is created, for the REST intake and the DICOM node alike. With
    ``refused`` (a reason) the job is recorded as failed and not queued. ``on_stored(n_files,
    n_bytes)`` runs once the job is stored and before it is published (audit event, hand-over
    of a DICOM burst); a crash in between leaves a ``received`` job that the sweeper publishes.
    Returns the number of files and bytes of the job's input.
    """
    n_files, n_bytes = storage.publish_input(job_id, list(files))
    outcome = {} if refused is None else {"state": JobState.FAILED, "reason": refused}
    store.create_job(
        job_id,
        source=sender.source,
        submitted_by=sender.submitted_by,
        options=options,
        export=export,
        queue=queue,
        n_files=n_files,
        input_bytes=n_bytes,
        calling_aet=sender.calling_aet,
        remote_host=sender.remote_host,
        study_instance_uid=study_instance_uid,
        fingerprint=fingerprint,
        incoming_id=sender.incoming_id,
        **outcome,
    )
    if on_stored is not None:
        on_stored(n_files, n_bytes)
    if refused is None:
        enqueuer.submit(job_id, queue)
    return n_files, n_bytes


def store_upload(
    spool: Path,
    content_type: str,
    work: Path,
    *,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    enqueuer: Enqueuer,
    params: SubmitParams,
    actor: str,
    remote_host: str | None,
) -> Accepted:
    """Unpack and check an upload, store it as a job (durably), then publish it.

    Blocking (disk and header reads): call it from a worker thread.
    """
    files = _unpack(spool, content_type, work, settings)
    spool.unlink(missing_ok=True)
    instances = tuple(instance_digest(f) for f in files)
    try:
        study_uid, ignored = _check_study(work / "files", settings.max_unzipped_bytes)
    except UploadRejected as exc:
        exc.instances = instances
        raise
    fingerprint = content_fingerprint(instances)
    earlier = None if params.recompute else store.find_duplicate(
        fingerprint, params.options, source="rest", export=params.export)
    if earlier is not None:
        store.audit(actor, "study_duplicate", job_id=earlier.id, remote_host=remote_host, files=len(files),
                    study_instance_uid=study_uid)
        log.info("upload from %s: same content and options as job %s; not computed again", actor, earlier.id)
        return Accepted(earlier.id, earlier.n_files, ignored, earlier.study_instance_uid, duplicate=True,
                        instances=instances)
    job_id = uuid.uuid4().hex

    def received(n_files: int, n_bytes: int) -> None:
        store.audit(actor, "study_received", job_id=job_id, remote_host=remote_host, files=n_files, bytes=n_bytes,
                    ignored_files=ignored, study_instance_uid=study_uid, media_type=content_type.split(";")[0])
        log.info("job %s: %d file(s) received over REST from %s", job_id, n_files, actor)
        if params.cycle_id:  # recorded before the job is queued, so its worker sees it
            from .cycles import note_cycle_request
            note_cycle_request(store, job_id, params.cycle_id)

    n_files, _ = accept_study(store, storage, enqueuer, job_id=job_id, files=files,
                              sender=Sender("rest", actor, remote_host), options=params.options,
                              export=params.export, queue=settings.job_queue, study_instance_uid=study_uid,
                              fingerprint=fingerprint, on_stored=received)
    return Accepted(job_id, n_files, ignored, study_uid, instances=instances)


@contextlib.asynccontextmanager
async def spooled_request_body(request, ctx, name: str):
    """``(folder, file)``: the request body on disk in a fresh upload folder, after the free-space
    check; the folder goes when the block ends. A full disk raises for the caller to answer 507."""
    settings = ctx.settings
    length = request.headers.get("content-length", "")
    check_free_space(ctx.storage.free_bytes(), settings.min_free_disk_bytes, settings.disk_retry_after_s,
                     int(length) if length.isdigit() else 0)
    with ctx.storage.upload_dir() as work:
        path = work / name
        await spool_body(request.stream(), path, settings.max_upload_bytes, settings.body_timeout_s)
        yield work, path


async def receive_study(request, ctx, actor: str, params: SubmitParams) -> Accepted:
    """The POST /studies body -> a stored, queued job; :class:`UploadRejected` for a bad upload."""
    settings = ctx.settings
    remote = request.client.host if request.client else None
    try:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes:
            raise UploadRejected(413, f"upload of {int(length) / 2**20:.1f} MiB exceeds the limit of "
                                      f"{settings.max_upload_bytes / 2**20:.1f} MiB")
        try:
            async with spooled_request_body(request, ctx, "body") as (work, spool):
                return await run_in_threadpool(
                    store_upload, spool, request.headers.get("content-type", ""), work, settings=settings,
                    store=ctx.store, storage=ctx.storage, enqueuer=ctx.enqueuer, params=params, actor=actor,
                    remote_host=remote,
                )
        except UploadRejected:
            raise
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # Never "damaged archive" or a 500: the server is full, the client did nothing wrong.
            detail = str(exc) if isinstance(exc, DiskFull) else (
                f"{DISK_FULL_NAME}; nothing was stored, retry in {settings.disk_retry_after_s} s")
            log.error("upload from %s refused: %s", actor, DISK_FULL_NAME)
            raise UploadRejected(507, detail, headers={"Retry-After": str(settings.disk_retry_after_s)}) from exc
    except UploadRejected as exc:
        if isinstance(exc, ClientGone):  # one audit event, no traceback: nobody is left to answer
            ctx.store.audit(actor, "upload_disconnected", remote_host=remote)
            log.info("upload from %s: client disconnected before the body ended; nothing stored", actor)
        else:
            ctx.store.audit(actor, "upload_rejected", remote_host=remote, status=exc.status_code,
                            reason=exc.detail[:300])
            log.info("upload from %s refused (%d)", actor, exc.status_code)
        raise


# ------------------------------------------------------------------ region sets after the dose

# The Celery task that applies a region set to a finished job (registered by worker.tasks).
REGIONS_TASK_NAME = "spectdose.process_region_set"


def file_digest(path: Path) -> str:
    """sha256 of a file: a region set's identity (the same file sent twice is one version)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def job_ct(storage: Storage, job_id: str) -> tuple[str | None, str | None]:
    """(CT series UID, CT frame of reference UID) of a job's result, from its summary.json."""
    import json

    manifest = storage.output_manifest(job_id)
    entry = (manifest or {}).get("files", {}).get("summary_json")
    if entry is None:
        return None, None
    try:
        ct = json.loads((storage.job_output(job_id) / entry["file"]).read_text())["series"]["ct"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    return ct.get("series_instance_uid"), ct.get("frame_of_reference_uid")


def read_region_file(path: Path):
    """The header of an uploaded region set; :class:`UploadRejected` (400/415) when it is not one."""
    from spectdose.dicom.region_inputs import read_region_input
    from spectdose.errors import InputError

    try:
        info = read_region_input(path)
    except InputError as exc:
        raise UploadRejected(400, f"malformed region set: {exc}") from exc
    if info is None:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
        raise UploadRejected(415, f"not a region set: SOP Class {ds.get('SOPClassUID', '(none)')}, modality "
                                  f"{ds.get('Modality', '(none)')}; send a DICOM SEG or RT Structure Set")
    return info


@dataclasses.dataclass(frozen=True)
class RegionSetAccepted:
    region_set_id: str
    job_id: str
    version: int
    state: str
    created: bool  # False: the same file was applied to the job before (that version is answered)
    queued: bool


def accept_region_set(store: JobStore, storage: Storage, enqueuer: Enqueuer, job, path: Path, *, source: str,
                      submitted_by: str, info=None) -> RegionSetAccepted:
    """Store a region set for the finished ``job`` and queue its region report; refuse what cannot apply.

    Refusals (:class:`UploadRejected`) store nothing: 409 when the job is not finished, 422
    for a set not drawn on the job's CT (another frame of reference). The file is copied
    into the job's ``regions/`` folder durably before the record is made, and the record
    before the task is published; a set already received for the job (same content) gives
    its existing version, published again if its first publication failed.
    """
    from spectdose.dicom.region_inputs import not_on_ct

    info = info or read_region_file(path)
    if job.state != JobState.DONE or storage.output_manifest(job.id) is None:
        raise UploadRejected(409, f"job {job.id} is {job.state}: a region set is applied to a finished result "
                                  "(send it with the study, or again once the job is done)")
    ct_series, ct_frame = job_ct(storage, job.id)
    why = not_on_ct(info, ct_series_uid=ct_series, ct_frame_of_reference_uid=ct_frame)
    if why:
        raise UploadRejected(422, f"region set refused, the dose result is kept: {why}")
    digest = file_digest(path)
    folder = storage.job_dir(job.id) / "regions"
    folder.mkdir(parents=True, exist_ok=True)
    region_set_id = uuid.uuid4().hex
    target = folder / f"{region_set_id}.dcm"
    atomic_write_bytes(target, path.read_bytes())
    rec, created = store.add_region_set(job.id, region_set_id=region_set_id, source=source, submitted_by=submitted_by,
                                        kind=info.kind, sop_instance_uid=info.sop_instance_uid, digest=digest)
    if not created:
        target.unlink(missing_ok=True)
    queued = rec.state != JobState.RECEIVED
    if rec.state == JobState.RECEIVED:
        queued = publish_region_set(store, enqueuer, rec.id, job.queue)
    return RegionSetAccepted(rec.id, job.id, rec.version, store.region_set(rec.id).state, created, queued)


def publish_region_set(store: JobStore, enqueuer: Enqueuer, region_set_id: str, queue: str) -> bool:
    """Put the region set's task on ``queue``; False when the broker is unavailable (the record stays ``received``)."""
    try:
        enqueuer.app.send_task(REGIONS_TASK_NAME, args=[region_set_id], queue=queue, routing_key=queue)
    except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types; all mean "not published"
        log.warning("region set %s: could not publish to queue %s (%s)", region_set_id, queue, type(exc).__name__)
        return False
    store.mark_region_set_queued(region_set_id)
    return True
