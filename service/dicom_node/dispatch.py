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

The options of a DICOM job are the site's: the default engine, and the assumptions the
site accepts for every job or for the calling AE (``SPECTDOSE_ACCEPT``,
``SPECTDOSE_ACCEPT_BY_AE``), built and stored as :class:`spectdose.pipeline.DoseOptions`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import uuid

from ..config import Settings
from ..db import IncomingState, JobState, utcnow
from ..intake import Sender, accept_study
from ..jobs import content_fingerprint
from ..queue import Enqueuer
from .handlers import INPUT_MODALITIES, NodeContext

__all__ = ["dispatch_quiet_studies", "Completer", "job_id_for", "node_options"]

log = logging.getLogger("spectdose.service.dicom")

_JOB_NAMESPACE = uuid.UUID("6f1d3a52-4f0e-4f55-9a57-0c2d9d7f3e11")  # fixed: job ids derive from burst ids


def job_id_for(incoming_id: str) -> str:
    """The job id of a burst: the same after a crash and restart, so a burst makes one job."""
    return uuid.uuid5(_JOB_NAMESPACE, incoming_id).hex


def node_options(settings: Settings, calling_aet: str) -> dict:
    """The stored options of a job pushed by ``calling_aet``: DoseOptions.to_dict() of the site's choices."""
    from spectdose.pipeline import DoseOptions

    return DoseOptions.from_dict({
        "method": settings.resolved_method,
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
    if not files:
        note = f"no CT/NM/PT instance to compute from ({inc.n_own_outputs} of our own outputs came back)"
        store.settle_incoming(inc.id, IncomingState.IGNORED, note=note)
        store.audit(inc.calling_aet, "study_ignored", study_instance_uid=inc.study_instance_uid, why=note)
        return None
    fingerprint = content_fingerprint(files)
    options = node_options(settings, inc.calling_aet)
    earlier = store.find_duplicate(fingerprint, options, source="dicom", calling_aet=inc.calling_aet)
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

    def handed_over(n_files: int, _n_bytes: int) -> None:
        store.settle_incoming(inc.id, IncomingState.DISPATCHED, job_id=job_id)
        log.info("study burst %s from %s complete: job %s with %d instance(s)", inc.id[:8], inc.calling_aet, job_id,
                 n_files)

    accept_study(store, storage, enqueuer, job_id=job_id, files=files,
                 sender=Sender("dicom", inc.calling_aet, inc.remote_host, calling_aet=inc.calling_aet,
                               incoming_id=inc.id),
                 options=options, export=list(settings.export), queue=settings.job_queue,
                 study_instance_uid=inc.study_instance_uid, fingerprint=fingerprint, refused=refused,
                 on_stored=handed_over)
    return job_id


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
