"""Turning a quiet study into a job: once, and never for a study we have already processed.

A burst of instances is complete when no new instance of its study has arrived for
``study_quiet_s``; the time of the last arrival is in the job store, so a restart keeps
counting where it stopped. The job's input is every CT/NM/PT instance received for the
study so far; its *fingerprint* (each SOP Instance UID with a digest of its data set,
:func:`service.jobs.content_fingerprint`) identifies it. A study whose fingerprint and
options match a job of the same sender that has not failed is a duplicate: this is how a
PACS that forwards the whole study again after our results arrived (an auto-routing
loop) is recognised and ignored. The same instances re-sent with a changed header (same
SOP Instance UIDs, other content) have another fingerprint and are computed again.

Region sets (SEG, RT Structure Set) are kept with the study. Sent with the images of a new
job, they are its regions (the worker picks them out). One that arrives later, alone or with
images already computed, is applied to the study's newest finished job whose CT it was drawn
on (:func:`service.intake.accept_region_set`: statistics again, no dose recomputed); one on
another frame of reference is recorded as a refused region set of that job, with the reason.
While that job is still computing, the burst waits (it is looked at again on the next pass).

The options of a DICOM job are the site's: the default engine, time model and uncertainty
map (``SPECTDOSE_DEFAULT_UNCERTAINTY``: a C-STORE cannot ask for one), and the assumptions
the site accepts for every job or for the calling AE (``SPECTDOSE_ACCEPT``,
``SPECTDOSE_ACCEPT_BY_AE``), built and stored as :class:`spectdose.pipeline.DoseOptions`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import uuid
from pathlib import Path

from ..config import Settings
from ..db import IncomingState, JobState, utcnow
from ..intake import (
    Sender,
    UploadRejected,
    accept_region_set,
    accept_study,
    file_digest,
    job_ct,
    study_incomplete,
)
from ..jobs import content_fingerprint
from ..queue import Enqueuer
from .handlers import INPUT_MODALITIES, REGION_KINDS, NodeContext

__all__ = ["dispatch_quiet_studies", "Completer", "job_id_for", "node_options"]

log = logging.getLogger("spectdose.service.dicom")

_JOB_NAMESPACE = uuid.UUID("6f1d3a52-4f0e-4f55-9a57-0c2d9d7f3e11")  # fixed: job ids derive from burst ids


def job_id_for(incoming_id: str) -> str:
    """The job id of a burst: the same after a crash and restart, so a burst makes one job."""
    return uuid.uuid5(_JOB_NAMESPACE, incoming_id).hex


def node_options(settings: Settings, calling_aet: str) -> dict:
    """The stored options of a job pushed by ``calling_aet``: DoseOptions.to_dict() of the site's choices."""
    from spectdose.pipeline import DoseOptions

    method = settings.resolved_method
    return DoseOptions.from_dict({
        "method": method,
        "time_model": settings.default_time_model,
        "uncertainty": settings.resolved_uncertainty(method),
        "calling_aet": calling_aet,
        "accept": settings.accepted_assumptions(calling_aet),
    }).to_dict()


def dispatch_quiet_studies(ctx: NodeContext, enqueuer: Enqueuer, now: dt.datetime | None = None) -> list[str]:
    """Dispatch every burst quiet for ``study_quiet_s``; return the ids of jobs created."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=ctx.settings.study_quiet_s)
    created = []
    for inc in ctx.store.quiet_studies(cutoff):
        if not ctx.store.take_incoming(inc.id, cutoff):
            continue  # new instances arrived meanwhile, or another process took it
        try:
            job_id = _dispatch(ctx, enqueuer, inc)
        except Exception:  # noqa: BLE001 - retried on the next pass
            log.exception("study burst %s: dispatch failed; will retry", inc.id[:8])
            ctx.store.settle_incoming(inc.id, IncomingState.RECEIVING)
            continue
        if job_id:
            created.append(job_id)
    return created


def _dispatch(ctx: NodeContext, enqueuer: Enqueuer, inc) -> str | None:
    store, storage, settings = ctx.store, ctx.storage, ctx.settings
    job_id = job_id_for(inc.id)
    existing = store.get(job_id)
    if existing is not None:  # created before a crash; finish the hand-over
        store.settle_incoming(inc.id, IncomingState.DISPATCHED, job_id=job_id)
        if existing.state == JobState.RECEIVED:
            enqueuer.submit(job_id, existing.queue)
        return None
    folder = storage.incoming_dir(inc.study_instance_uid)
    files = sorted(p for p in folder.glob("*.dcm") if p.name.split("_", 1)[0] in INPUT_MODALITIES)
    region_files = sorted(p for p in folder.glob("*.dcm") if p.name.split("_", 1)[0] in set(REGION_KINDS.values()))
    if not files and region_files:
        return _regions_later(ctx, enqueuer, inc, region_files, None)
    if not files:
        note = f"no CT/NM/PT instance to compute from ({inc.n_own_outputs} of our own outputs came back)"
        store.settle_incoming(inc.id, IncomingState.IGNORED, note=note)
        store.audit(inc.calling_aet, "study_ignored", study_instance_uid=inc.study_instance_uid, why=note)
        return None
    fingerprint = content_fingerprint(files)
    options = node_options(settings, inc.calling_aet)
    earlier = store.find_duplicate(fingerprint, options, source="dicom", calling_aet=inc.calling_aet)
    if earlier is not None and _new_region_files(ctx, earlier, region_files):
        return _regions_later(ctx, enqueuer, inc, region_files, earlier)
    if earlier is not None:
        note = f"same {len(files)} input instances and options as job {earlier.id} ({earlier.state}): not computed again"
        store.settle_incoming(inc.id, IncomingState.DUPLICATE, job_id=earlier.id, note=note)
        store.audit(inc.calling_aet, "study_duplicate", job_id=earlier.id, study_instance_uid=inc.study_instance_uid,
                    own_outputs_returned=inc.n_own_outputs)
        log.info("study burst %s from %s: duplicate of job %s, ignored", inc.id[:8], inc.calling_aet, earlier.id)
        return None
    modalities = {p.name.split("_", 1)[0] for p in files}
    missing = [m for m in ("CT", "NM") if m not in modalities]
    refused = None
    if missing:
        refused = (f"the study has no {' and no '.join(missing)} instances (received {', '.join(sorted(modalities))}); "
                   "a SPECT/CT dosimetry needs both")
    elif (why := study_incomplete(files)) is not None:
        # Quiet for STUDY_QUIET_S and still incomplete (e.g. an aborted association and a later one with the
        # rest of the CT): refused, nothing computed or sent. The instances stay in incoming/: the rest (or the
        # whole study) sent again makes a new burst of every instance received, computed once it is whole.
        refused = (f"incomplete study: {why}; nothing was computed or sent: send the rest of the study (or all of "
                   f"it) again, it is computed once whole")
        store.audit(inc.calling_aet, "study_incomplete", job_id=job_id, study_instance_uid=inc.study_instance_uid,
                    instances=len(files))
        log.warning("study burst %s from %s: incomplete (%s); refused", inc.id[:8], inc.calling_aet, why.split(":")[0])

    def handed_over(n_files: int, _n_bytes: int) -> None:
        store.settle_incoming(inc.id, IncomingState.DISPATCHED, job_id=job_id)
        log.info("study burst %s from %s complete: job %s with %d instance(s)", inc.id[:8], inc.calling_aet, job_id,
                 n_files)

    # The fingerprint is the images' (as before region sets were kept), so the same images with a
    # region set added later are recognised as computed, and the set is applied to that result.
    accept_study(store, storage, enqueuer, job_id=job_id, files=files + region_files,
                 sender=Sender("dicom", inc.calling_aet, inc.remote_host, calling_aet=inc.calling_aet,
                               incoming_id=inc.id),
                 options=options, export=list(settings.export), queue=settings.job_queue,
                 study_instance_uid=inc.study_instance_uid, fingerprint=fingerprint, refused=refused,
                 on_stored=handed_over)
    return job_id


def _new_region_files(ctx: NodeContext, job, region_files: list[Path]) -> list[Path]:
    """Region files not yet taken for ``job``: neither in its input nor received as one of its region sets."""
    from spectdose.dicom.region_inputs import read_region_input
    from spectdose.errors import InputError

    new = []
    for path in region_files:
        if (ctx.storage.job_input(job.id) / path.name).exists():
            continue
        try:
            info = read_region_input(path)
        except InputError:
            continue
        if info is not None and not ctx.store.region_set_applied(job.id, info.sop_instance_uid):
            new.append(path)
    return new


def _target_job(ctx: NodeContext, study_uid: str):
    """The study's newest job that has not failed (the result region sets are applied to), or None."""
    jobs, _n = ctx.store.list_jobs(study_instance_uid=study_uid, limit=50)
    return next((j for j in jobs if j.state != JobState.FAILED), None)


def _regions_later(ctx: NodeContext, enqueuer: Enqueuer, inc, region_files: list[Path], job) -> str | None:
    """Region sets that arrived after the dose: applied to the study's finished job, or refused with a reason."""
    from spectdose.dicom.region_inputs import not_on_ct, read_region_input

    store = ctx.store
    job = job or _target_job(ctx, inc.study_instance_uid)
    if job is None:
        note = (f"{len(region_files)} region set(s) but no job of this study to apply them to: send them with the "
                "study's CT and SPECT, or after a job of the study has finished")
        store.settle_incoming(inc.id, IncomingState.IGNORED, note=note)
        store.audit(inc.calling_aet, "region_set_refused", study_instance_uid=inc.study_instance_uid, why=note)
        log.info("study burst %s from %s: region set(s) without a job of the study", inc.id[:8], inc.calling_aet)
        return None
    if job.state != JobState.DONE:
        store.settle_incoming(inc.id, IncomingState.RECEIVING)  # looked at again once the job has finished
        return None
    pending = _new_region_files(ctx, job, region_files)
    ct_series, ct_frame = job_ct(ctx.storage, job.id)
    versions = []
    for path in pending:
        info = read_region_input(path)
        why = not_on_ct(info, ct_series_uid=ct_series, ct_frame_of_reference_uid=ct_frame)
        if why:  # recorded as a refused region set of the job: visible at GET /jobs/{id}/regions
            rec, _ = store.add_region_set(job.id, region_set_id=uuid.uuid4().hex, source="dicom",
                                          submitted_by=inc.calling_aet, kind=info.kind,
                                          sop_instance_uid=info.sop_instance_uid, digest=file_digest(path),
                                          state=JobState.FAILED, reason=f"region set refused, the dose result is "
                                          f"kept: {why}")
            log.info("job %s: region set from %s refused (frame of reference)", job.id, inc.calling_aet)
            continue
        try:
            accepted = accept_region_set(store, ctx.storage, enqueuer, job, path, source="dicom",
                                         submitted_by=inc.calling_aet, info=info)
        except UploadRejected as exc:
            store.audit(inc.calling_aet, "region_set_refused", job_id=job.id, why=exc.detail[:300])
            continue
        if not accepted.queued:
            raise ConnectionError(f"region set {accepted.region_set_id}: queue unavailable")  # retried next pass
        versions.append(accepted.version)
    note = (f"{len(pending)} region set(s) after the dose for job {job.id}"
            + (f": version(s) {', '.join(map(str, versions))}" if versions else ": refused or already applied"))
    store.settle_incoming(inc.id, IncomingState.DISPATCHED, job_id=job.id, note=note)
    log.info("study burst %s from %s: %s", inc.id[:8], inc.calling_aet, note)
    return None


@dataclasses.dataclass
class Completer:
    """Background thread: dispatches quiet studies every ``interval_s``."""

    ctx: NodeContext
    enqueuer: Enqueuer
    interval_s: float
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spectdose-completer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                dispatch_quiet_studies(self.ctx, self.enqueuer)
            except Exception:  # noqa: BLE001 - DB restarting: try again next tick
                log.exception("completer pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
