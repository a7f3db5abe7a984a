"""pynetdicom event handlers: plain functions bound with ``(event, handler, [ctx])``.

Instances of an open association are written to a private staging folder and only moved
into the study's incoming folder when the association is *released*; an aborted or
dropped association leaves nothing behind, so a half-sent study is never used. Each
handler validates, stores and returns a named status; no exception escapes to pynetdicom.
Logs name UIDs, AE titles and counts, never patient attributes.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ParametricMapStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

from spectdose.dicom.region_inputs import REGION_SOP_CLASSES

from ..config import Settings
from ..diskguard import DiskFull, check_free_space
from ..jobs import JobStore
from ..storage import Storage, atomic_write_bytes, fsync_dir, safe_component

__all__ = [
    "NodeContext",
    "INPUT_MODALITIES",
    "REGION_KINDS",
    "STATUS_SUCCESS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_PROCESSING_FAILURE",
    "handle_requested",
    "handle_echo",
    "handle_store",
    "handle_released",
    "handle_aborted",
    "handle_conn_close",
]

log = logging.getLogger("spectdose.service.dicom")

# C-STORE statuses, PS3.4 Table B.2-1 (and PS3.7 C.4 for 0x0110).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
STATUS_DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
STATUS_PROCESSING_FAILURE = 0x0110  # Failure: Processing failure

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 Table 9-21.
_REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent; service user; calling AE title not recognised
_REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent; service user; called AE title not recognised
_REJECT_NO_SPACE = (0x02, 0x03, 0x02)  # transient; service provider (presentation); local limit exceeded

INPUT_MODALITIES = frozenset({"CT", "NM", "PT"})
# Region sets kept with their study (file name prefix by SOP Class, the core's table): the regions of
# a job made from it, or of a finished job when they arrive after the dose (dispatch.py).
REGION_KINDS = REGION_SOP_CLASSES
# Every class we send (worker.execute: RT Dose, map, SEG, RT Structure Set, SR, PDF report).
_OUR_SOP_CLASSES = frozenset({RTDoseStorage, ParametricMapStorage, SegmentationStorage, RTStructureSetStorage,
                              Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage,
                              EncapsulatedPDFStorage})
_OUR_MANUFACTURER = "spectdose"  # spectdose.dicom.rtdose.MANUFACTURER


@dataclasses.dataclass
class _Staged:
    path: Path
    study_instance_uid: str


@dataclasses.dataclass
class _Association:
    key: str
    calling_aet: str
    remote_host: str
    staged: dict[str, _Staged] = dataclasses.field(default_factory=dict)  # by SOP Instance UID
    own_outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # by study UID
    not_used: int = 0


@dataclasses.dataclass
class NodeContext:
    """What the handlers share: settings, job store, data directory, open associations."""

    settings: Settings
    store: JobStore
    storage: Storage
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    associations: dict[int, _Association] = dataclasses.field(default_factory=dict)

    def association(self, assoc) -> _Association:
        with self.lock:
            state = self.associations.get(id(assoc))
            if state is None:
                state = _Association(
                    key=uuid.uuid4().hex,
                    calling_aet=(assoc.requestor.ae_title or "").strip(),
                    remote_host=str(assoc.requestor.address or ""),
                )
                self.associations[id(assoc)] = state
            return state

    def forget(self, assoc) -> _Association | None:
        with self.lock:
            return self.associations.pop(id(assoc), None)


def _same_host(name: str, address: str) -> bool:
    """Whether ``address`` (the peer's IP) is ``name`` (an IP or a host name that resolves to it)."""
    if name == address:
        return True
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False


def calling_ae_allowed(settings: Settings, calling: str, address: str) -> bool:
    """Closed by default: only configured peers (``PEERS``) and ``ALLOWED_CALLING_AETS`` entries.

    An ``AET@HOST`` entry, and a peer when ``CHECK_PEER_HOST`` is set, must also come from
    that host; ``*`` accepts any AE (an explicit choice, never the default).
    """
    for entry in settings.allowed_calling_aets:
        if entry == "*":
            return True
        aet, _, host = entry.partition("@")
        if aet.strip() == calling and (not host or _same_host(host.strip(), address)):
            return True
    peer = settings.peer_map.get(calling)
    return peer is not None and (not settings.check_peer_host or _same_host(peer.host, address))


def _reject(assoc, rsd: tuple[int, int, int]) -> None:
    """A-ASSOCIATE-RJ, then wait until it is on the wire: pynetdicom closes the socket right
    after this handler returns, which the peer would otherwise see as an abort."""
    assoc.acse.send_reject(*rsd)
    assoc.kill()


def handle_requested(event, ctx: NodeContext) -> None:
    """Refuse, with A-ASSOCIATE-RJ and its standard reason, associations to another called AE,
    from an AE that is not a configured peer, or while the disk is nearly full."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = (primitive.calling_ae_title or "").strip()
    called = (primitive.called_ae_title or "").strip()
    host = str(assoc.requestor.address or "")
    settings = ctx.settings
    if called != settings.ae_title:
        log.warning("association from %s (%s) refused: called AE %r is not ours", calling, host, called)
        ctx.store.audit(calling or "?", "association_refused", remote_host=host, why="called AE title not ours",
                        called_aet=called)
        _reject(assoc, _REJECT_CALLED_AET)
        return
    if not calling_ae_allowed(settings, calling, host):
        log.warning("association from %s (%s) refused: calling AE not a configured peer", calling, host)
        ctx.store.audit(calling or "?", "association_refused", remote_host=host, why="calling AE not allowed")
        _reject(assoc, _REJECT_CALLING_AET)
        return
    try:
        check_free_space(ctx.storage.free_bytes(), settings.min_free_disk_bytes, settings.disk_retry_after_s)
    except DiskFull as exc:
        log.error("association from %s refused: %s", calling, exc)
        ctx.store.audit(calling or "?", "association_refused", remote_host=host, why="disk nearly full",
                        free_mib=round(ctx.storage.free_bytes() / 2**20))
        _reject(assoc, _REJECT_NO_SPACE)


def _dataset_bytes(event) -> int:
    data = getattr(event.request, "DataSet", None)
    return data.getbuffer().nbytes if data is not None else 0


def handle_echo(event, ctx: NodeContext) -> int:
    return STATUS_SUCCESS


def handle_store(event, ctx: NodeContext) -> int:
    """Validate one instance and write it to the association's staging folder."""
    try:
        state = ctx.association(event.assoc)
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_uid = str(request.AffectedSOPInstanceUID)
        try:
            ds = event.dataset
            ds_class = str(ds.get("SOPClassUID", ""))
            ds_uid = str(ds.get("SOPInstanceUID", ""))
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "").upper()
            manufacturer = str(ds.get("Manufacturer", "") or "")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's data
            log.warning("C-STORE from %s: dataset not decodable (%s)", state.calling_aet, type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        if ds_class != sop_class or ds_uid != sop_uid:
            log.warning("C-STORE from %s: dataset SOP class/instance differ from the request", state.calling_aet)
            return STATUS_DATASET_MISMATCH
        if not study_uid:
            log.warning("C-STORE from %s: instance %s has no Study Instance UID", state.calling_aet, sop_uid)
            return STATUS_CANNOT_UNDERSTAND
        region_kind = REGION_KINDS.get(sop_class)
        # A region set is ours only by its UID: a viewer's correction of our automatic SEG may keep
        # our Manufacturer, and it is exactly what the physicist sends back to be reported.
        if sop_class in _OUR_SOP_CLASSES and ((manufacturer == _OUR_MANUFACTURER and region_kind is None)
                                              or ctx.store.is_own_output(sop_uid)):
            # Our own result coming back (PACS auto-routing): accepted, never a new job.
            state.own_outputs[study_uid] = state.own_outputs.get(study_uid, 0) + 1
            return STATUS_SUCCESS
        if modality not in INPUT_MODALITIES and region_kind is None:
            state.not_used += 1  # accepted (secondary objects, RT objects...) but not an input
            return STATUS_SUCCESS
        try:
            check_free_space(ctx.storage.free_bytes(), ctx.settings.min_free_disk_bytes, ctx.settings.disk_retry_after_s,
                             _dataset_bytes(event))
        except DiskFull:
            log.error("C-STORE from %s refused: disk nearly full (A700 out of resources)", state.calling_aet)
            return STATUS_OUT_OF_RESOURCES
        prefix = region_kind or modality
        target = ctx.storage.staging_dir(state.key) / f"{prefix}_{safe_component(sop_uid)}.dcm"
        atomic_write_bytes(target, event.encoded_dataset(include_meta=True))
        state.staged[sop_uid] = _Staged(target, study_uid)
        return STATUS_SUCCESS
    except OSError as exc:
        log.error("C-STORE: cannot write the instance (%s%s); answered A700 out of resources",
                  "ENOSPC: " if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "", exc.strerror)
        return STATUS_OUT_OF_RESOURCES
    except Exception:  # noqa: BLE001 - mapped to a status, never raised into pynetdicom
        log.exception("C-STORE: unexpected failure")
        return STATUS_PROCESSING_FAILURE


def handle_released(event, ctx: NodeContext) -> None:
    """The association ended normally: its instances join their studies' incoming folders."""
    state = ctx.forget(event.assoc)
    if state is None:
        return
    try:
        _commit(state, ctx)
    except Exception:  # noqa: BLE001 - logged; the staging folder is cleared on the next start
        log.exception("association %s from %s: could not commit its instances", state.key[:8], state.calling_aet)


def handle_aborted(event, ctx: NodeContext) -> None:
    _discard(ctx.forget(event.assoc), ctx, "aborted")


def handle_conn_close(event, ctx: NodeContext) -> None:
    """The connection closed: settle an association that neither released nor aborted.

    pynetdicom signals the close from its network thread, which can run before the
    association thread has marked a peer's release; so the decision waits for the
    association thread to end, in a helper thread (joining from here could deadlock).
    """
    assoc = event.assoc

    def settle() -> None:
        try:
            if threading.current_thread() is not assoc and assoc.is_alive():
                assoc.join(timeout=60)
            if getattr(assoc, "is_released", False):
                state = ctx.forget(assoc)
                if state is not None:
                    _commit(state, ctx)
            else:
                _discard(ctx.forget(assoc), ctx, "closed without release")
        except Exception:  # noqa: BLE001 - logged; a restart clears the staging folder
            log.exception("settling a closed association failed")

    if id(assoc) in ctx.associations:
        threading.Thread(target=settle, name="spectdose-assoc-close", daemon=True).start()


def _discard(state: _Association | None, ctx: NodeContext, why: str) -> None:
    if state is None:
        return
    for item in state.staged.values():
        item.path.unlink(missing_ok=True)
    folder = ctx.storage.staging_dir(state.key)
    if folder.exists():
        for p in folder.iterdir():
            p.unlink(missing_ok=True)
        folder.rmdir()
    if state.staged:
        log.warning("association from %s %s: %d instance(s) discarded", state.calling_aet, why, len(state.staged))
        ctx.store.audit(state.calling_aet, "association_aborted", remote_host=state.remote_host,
                        discarded=len(state.staged), why=why)


def _commit(state: _Association, ctx: NodeContext) -> None:
    by_study: dict[str, list[_Staged]] = {}
    for item in state.staged.values():
        by_study.setdefault(item.study_instance_uid, []).append(item)
    with ctx.lock:  # one writer of incoming bursts per node process
        for study_uid, items in by_study.items():
            folder = ctx.storage.incoming_dir(study_uid)
            folder.mkdir(parents=True, exist_ok=True)
            for item in items:
                os.replace(item.path, folder / item.path.name)
            fsync_dir(folder)
            ctx.store.note_arrival(study_uid, state.calling_aet, state.remote_host, n_instances=len(items),
                                   n_own_outputs=state.own_outputs.get(study_uid, 0), new_id=uuid.uuid4().hex)
    staging = ctx.storage.staging_dir(state.key)
    if staging.exists():
        staging.rmdir()
    own = sum(state.own_outputs.values())
    ctx.store.audit(
        state.calling_aet,
        "instances_received",
        remote_host=state.remote_host,
        instances=len(state.staged),
        studies=sorted(by_study),
        own_outputs_returned=own,
        not_used=state.not_used,
    )
    if own:
        ctx.store.audit(state.calling_aet, "own_output_returned", remote_host=state.remote_host, instances=own,
                        studies=sorted(state.own_outputs))
    log.info("association from %s released: %d instance(s) in %d study(ies); %d own output(s) ignored; %d not used",
             state.calling_aet, len(state.staged), len(by_study), own, state.not_used)
