"""Sending results back: C-STORE SCU to DICOM destinations, optional DICOMweb STOW-RS.

Each output instance to each destination has an export record; one already ``sent`` is
never sent again, so a retried or redelivered job does not store a second copy. (A copy
would not make a second series anyway: the core derives the output UIDs from the inputs'
content, options and version, so an identical resend replaces the same instance in the
PACS, and a changed result is a new instance next to the old one.) Sending is retried a bounded number
of times with a doubling delay; every network call has a timeout. A destination that cannot be
associated with (no answer within the short connect/association limits, or a rejection) is not
retried inside the task: the job's task is retried later with its backoff, and the worker
computes other jobs in between. An object whose SOP Class a
destination refuses in association negotiation (a PACS without Segmentation Storage, say) is
recorded as failed with that reason and not retried; the others are sent.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from spectdose.dicom.transfer import (
    UNCOMPRESSED,
    choose_syntax,
    encode_for,
    presentation_contexts,
    syntaxes_for,
)

from .config import SENDER, DicomPeer, Settings
from .jobs import ExportItem, JobStore

__all__ = [
    "OutputFile",
    "ExportFailure",
    "resolve_destinations",
    "c_store",
    "stow_rs",
    "export_outputs",
    "push_files",
]

log = logging.getLogger("spectdose.service.export")

# C-STORE response statuses that mean "stored" (PS3.4 Table B.2-1): success and the
# warnings Coercion of Data Elements (B000), Data Set Does Not Match SOP Class (B007),
# Elements Discarded (B006).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_NOT_ACCEPTED = "does not accept SOP Class"  # in the error of an object whose presentation context was rejected
NO_ASSOCIATION = "association with"  # the start of the error of a destination that could not be associated with


@dataclasses.dataclass(frozen=True)
class OutputFile:
    kind: str  # the output's name: "rtdose", "doserate", "sr", "autoseg", ...
    path: Path
    sop_instance_uid: str
    sop_class_uid: str


@dataclasses.dataclass(frozen=True)
class ExportFailure:
    destination: str
    message: str
    permanent: bool  # retrying cannot help (unknown destination, refused object)


def resolve_destinations(entries: list[str], *, calling_aet: str | None, peers: dict[str, DicomPeer]
                         ) -> tuple[list[DicomPeer], list[ExportFailure]]:
    """Turn export entries ('sender', 'AET@HOST:PORT', or a known AE title) into peers."""
    out: list[DicomPeer] = []
    problems: list[ExportFailure] = []
    for entry in entries:
        if entry == SENDER:
            if calling_aet is None:
                continue  # a REST submission has no sender to return to
            peer = peers.get(calling_aet)
            if peer is None:
                problems.append(ExportFailure(
                    f"sender {calling_aet}",
                    f"the sending AE {calling_aet!r} has no address: add it to SPECTDOSE_PEERS as AET@HOST:PORT",
                    permanent=True,
                ))
                continue
        elif "@" in entry:
            peer = DicomPeer.parse(entry)
        elif entry in peers:
            peer = peers[entry]
        else:
            problems.append(ExportFailure(entry, f"unknown export destination {entry!r}", permanent=True))
            continue
        if peer not in out:
            out.append(peer)
    return out, problems


def c_store(peer: DicomPeer, files: list[OutputFile], *, calling_aet: str, timeout_s: float,
            connect_timeout_s: float = 5.0, associate_timeout_s: float = 10.0) -> dict[str, str | None]:
    """Send ``files`` over one association; map each SOP Instance UID to None (stored) or an error.

    Connecting and association negotiation have their own short limits (a peer that accepts TCP
    and never answers costs ``connect_timeout_s + associate_timeout_s`` at most); ``timeout_s``
    bounds each C-STORE answer. An error of an association that was never set up starts with
    :data:`NO_ASSOCIATION`.
    """
    # Lossless compression per association (issue 20): a context per SOP class and lossless syntax, and
    # one uncompressed; each object goes in the best syntax the peer accepted (spectdose.dicom.transfer).
    headers = {f.sop_instance_uid: pydicom.dcmread(f.path, stop_before_pixels=True) for f in files}
    ae = AE(ae_title=calling_aet)
    for sop_class, syntaxes in presentation_contexts(headers.values()):
        ae.add_requested_context(sop_class, syntaxes)
    ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.acse_timeout = associate_timeout_s
    ae.connection_timeout = connect_timeout_s
    result: dict[str, str | None] = {}
    started = time.monotonic()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        waited = time.monotonic() - started
        why = ("rejected" if assoc.is_rejected else
               f"no answer within {waited:.0f} s" if waited >= min(connect_timeout_s, associate_timeout_s) * 0.9 else
               "aborted" if assoc.is_aborted else "no connection")
        return {f.sop_instance_uid: f"{NO_ASSOCIATION} {peer} failed ({why})" for f in files}
    accepted: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    try:
        for f in files:
            syntax = choose_syntax(headers[f.sop_instance_uid], accepted.get(f.sop_class_uid, []))
            if syntax is None:
                result[f.sop_instance_uid] = f"{peer} {_NOT_ACCEPTED} {f.sop_class_uid} (presentation context rejected)"
                continue
            ds = encode_for(pydicom.dcmread(f.path), syntax)
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code in _STORED:
                result[f.sop_instance_uid] = None
            elif code is None:
                result[f.sop_instance_uid] = f"no C-STORE response from {peer} (timeout or abort)"
            else:
                result[f.sop_instance_uid] = f"{peer} answered C-STORE status 0x{code:04X}"
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for f in files:
        result.setdefault(f.sop_instance_uid, f"association with {peer} ended before sending")
    return result


def push_files(peer: DicomPeer, paths: list[Path], *, calling_aet: str, timeout_s: float = 60.0) -> int:
    """C-STORE every DICOM file in ``paths`` over one association; return how many were stored.

    A generic SCU (the demo and the load benchmark push studies with it); contexts are
    proposed for the SOP classes found in the files, uncompressed syntaxes only.
    """
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association with {peer} not established")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) in _STORED:
                stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def stow_rs(url: str, files: list[OutputFile], *, token: str | None, timeout_s: float,
            connect_timeout_s: float | None = None, compressed: bool = True) -> dict[str, str | None]:
    """POST ``files`` as one STOW-RS request (PS3.18 10.5) to ``url`` (a base URL or .../studies).

    Each object goes in its best lossless transfer syntax (named in its part's Content-Type); an
    origin server that refuses them (HTTP 400, 409 or 415) gets them again uncompressed."""
    target = url if url.rstrip("/").endswith("/studies") else url.rstrip("/") + "/studies"
    boundary = uuid.uuid4().hex
    body = bytearray()
    for f in files:
        data, syntax = _stow_part(f.path, compressed)
        body += f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n\r\n".encode()
        body += data
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        rsp = httpx.post(target, content=bytes(body), headers=headers,
                         timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s or timeout_s))
    except httpx.HTTPError as exc:
        return {f.sop_instance_uid: f"STOW-RS to {target} failed ({type(exc).__name__}: {exc})" for f in files}
    if rsp.status_code in (200, 202):
        return {f.sop_instance_uid: None for f in files}
    if compressed and rsp.status_code in _STOW_SYNTAX_REFUSED:
        # The origin server did not take a compressed syntax: the same objects again, uncompressed.
        log.warning("STOW-RS to %s answered HTTP %d to compressed objects; sending them uncompressed",
                    target, rsp.status_code)
        return stow_rs(url, files, token=token, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                       compressed=False)
    return {f.sop_instance_uid: f"STOW-RS to {target} answered HTTP {rsp.status_code}" for f in files}


# STOW-RS answers that can mean "not in this transfer syntax": 415 Unsupported Media Type, and 400 or
# 409 (none or only some instances stored, PS3.18 10.5); resending uncompressed costs one more request.
_STOW_SYNTAX_REFUSED = {400, 409, 415}


def _stow_part(path: Path, compressed: bool) -> tuple[bytes, str]:
    """A file's bytes for a STOW-RS part and its transfer syntax: in its best lossless syntax (issue 20),
    or uncompressed when ``compressed`` is False (as stored, or decoded from a file stored compressed,
    such as a 16-bit Parametric Map kept JPEG-LS at rest)."""
    ds = pydicom.dcmread(path)
    stored = str(ds.file_meta.TransferSyntaxUID)
    syntax = syntaxes_for(ds)[0] if compressed else (stored if stored in UNCOMPRESSED else ExplicitVRLittleEndian)
    if syntax == str(ds.file_meta.TransferSyntaxUID):
        return path.read_bytes(), syntax
    out = io.BytesIO()
    encode_for(ds, syntax).save_as(out, enforce_file_format=True)
    return out.getvalue(), syntax


def export_outputs(
    store: JobStore,
    settings: Settings,
    job_id: str,
    *,
    destinations: list[str],
    calling_aet: str | None,
    files: list[OutputFile],
    sleep: Callable[[float], None] = time.sleep,
) -> list[ExportFailure]:
    """Send every output to every destination not yet sent; return what still failed."""
    peers, failures = resolve_destinations(destinations, calling_aet=calling_aet, peers=settings.peer_map)
    senders: list[tuple[str, Callable[[list[OutputFile]], dict[str, str | None]]]] = [
        (str(p), lambda fs, p=p: c_store(p, fs, calling_aet=settings.ae_title, timeout_s=settings.export_timeout_s,
                                         connect_timeout_s=settings.export_connect_timeout_s,
                                         associate_timeout_s=settings.export_associate_timeout_s))
        for p in peers
    ]
    if settings.stow_url:
        senders.append((settings.stow_url, lambda fs: stow_rs(
            settings.stow_url, fs, token=settings.stow_token, timeout_s=settings.export_timeout_s,
            connect_timeout_s=settings.export_connect_timeout_s)))
    for dest, send in senders:
        pending = [f for f in files if not store.export_sent(job_id, dest, f.sop_instance_uid)]
        to_send = len(pending)
        errors: dict[str, str | None] = {}
        for attempt in range(1, settings.export_retries + 1):
            if not pending:
                break
            errors = send(pending)
            for f in pending:
                err = errors.get(f.sop_instance_uid)
                store.record_export(job_id, dest, ExportItem(f.kind, f.sop_instance_uid), sent=err is None,
                                    attempts=1, error=err)
            refused = [f for f in pending if _NOT_ACCEPTED in (errors.get(f.sop_instance_uid) or "")]
            if refused:  # the destination does not store this class: retrying cannot change that
                log.warning("job %s: %s does not accept %s; not sent", job_id, dest, ", ".join(f.kind for f in refused))
                store.audit(settings.ae_title, "results_refused_by_destination", job_id=job_id, destination=dest,
                            kinds=[f.kind for f in refused], sop_classes=sorted({f.sop_class_uid for f in refused}))
                to_send -= len(refused)
            pending = [f for f in pending if errors.get(f.sop_instance_uid) is not None and f not in refused]
            if pending and all((errors.get(f.sop_instance_uid) or "").startswith(NO_ASSOCIATION) for f in pending):
                # Nobody answered (or the peer refused us): the task retries later with its backoff, so
                # the worker computes other jobs meanwhile instead of waiting here.
                log.warning("job %s: no association with %s; the task retries later", job_id, dest)
                break
            if pending and attempt < settings.export_retries:
                delay = settings.export_backoff_s * 2 ** (attempt - 1)
                log.warning("job %s: export to %s failed (%d left); retry %d/%d in %.1f s",
                            job_id, dest, len(pending), attempt, settings.export_retries - 1, delay)
                sleep(delay)
        if pending:
            first = errors.get(pending[0].sop_instance_uid) or "unknown error"
            tries = attempt if first.startswith(NO_ASSOCIATION) else settings.export_retries
            failures.append(ExportFailure(dest, f"{len(pending)} object(s) not sent after "
                                                f"{tries} tr{'y' if tries == 1 else 'ies'}: {first}", permanent=False))
        elif to_send:
            store.audit(settings.ae_title, "results_sent", job_id=job_id, destination=dest, objects=to_send)
    return failures
