"""The job store: job life cycle, claims with a fencing token, exports and the audit log.

Every state change is one conditional UPDATE, so two processes can never both move a job:
a worker *claims* a job (``received``/``queued``, or ``running`` whose heartbeat has gone
stale) and gets an attempt number; later writes carry that number and are refused once
another worker has taken the job over. This is what makes a redelivered Celery message
harmless.

States: ``received`` (stored, not yet on the queue) -> ``queued`` -> ``running`` (stage,
progress) -> ``done`` | ``failed`` (reason). ``running`` goes back to ``queued`` for a
bounded retry or when its worker is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import (
    AuditEvent,
    ExportRecord,
    ExportState,
    IncomingState,
    IncomingStudy,
    Job,
    JobState,
    OutputInstance,
    RegionSetRecord,
    make_engine,
    make_sessionmaker,
    utcnow,
)

__all__ = [
    "JobStore",
    "ExportItem",
    "InstanceDigest",
    "token_label",
    "instance_digest",
    "content_fingerprint",
    "TERMINAL_STATES",
    "ALLOWED_TRANSITIONS",
    "IllegalTransition",
]

log = logging.getLogger("spectdose.service.jobs")

TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED})
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # running -> running: a job whose heartbeat went stale is claimed again (a new attempt).
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED, JobState.RUNNING}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
}
_LIVE_STATES = (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING)


class IllegalTransition(ValueError):
    """A state change that :data:`ALLOWED_TRANSITIONS` does not list (a bug in the caller)."""


def token_label(token: str) -> str:
    """How an API token appears in the audit log: a short hash, never the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class InstanceDigest:
    """One input file: its SOP Class/Instance UIDs ("" when not DICOM) and the digest of its data set."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    sha256: str


def instance_digest(path: Path) -> InstanceDigest:
    """UIDs and the sha256 of the bytes after the File Meta Information.

    The file meta is left out: it names the sending implementation and AE, which differ
    between a REST upload and the same instances received over DICOM; the data set is the
    content. A file that is not DICOM part 10 is digested whole.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    sop = sop_class = ""
    with open(path, "rb") as fh:
        try:
            read_preamble(fh, False)
            _read_file_meta_info(fh)
            start = fh.tell()
        except Exception:  # noqa: BLE001 - not part 10 (or no preamble): the whole file is its content
            start = 0
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sop = str(ds.get("SOPInstanceUID", "") or "")
            sop_class = str(ds.get("SOPClassUID", "") or "")
        except Exception:  # noqa: BLE001 - not DICOM: digested by bytes only
            sop = sop_class = ""
        fh.seek(start)
        digest = hashlib.sha256()
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return InstanceDigest(Path(path), sop_class, sop, digest.hexdigest())


def content_fingerprint(items: Iterable[Path | InstanceDigest]) -> str:
    """The identity of a study's input: each instance's SOP Instance UID and the digest of its data set.

    The same instances give the same fingerprint however they arrived (zip, multipart,
    STOW-RS, C-STORE) or were named; a changed header or pixel value under the same SOP
    Instance UID gives another.
    """
    digests = [i if isinstance(i, InstanceDigest) else instance_digest(i) for i in items]
    lines = sorted(f"{d.sop_instance_uid} {d.sha256}" for d in digests)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ExportItem:
    kind: str
    sop_instance_uid: str


class JobStore:
    """Job store on one SQLAlchemy engine (SQLite file or PostgreSQL)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = make_sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A transaction, committed on exit; ``readonly`` ones do not take SQLite's write lock."""
        with self._sessions() as s, s.begin():
            if readonly:
                s.connection(execution_options={"spectdose_readonly": True})
            yield s

    # ------------------------------------------------------------------ creation and reads

    def create_job(
        self,
        job_id: str,
        *,
        source: str,
        submitted_by: str,
        options: dict,
        export: list[str],
        queue: str,
        n_files: int,
        input_bytes: int = 0,
        calling_aet: str | None = None,
        remote_host: str | None = None,
        study_instance_uid: str | None = None,
        fingerprint: str | None = None,
        incoming_id: str | None = None,
        state: JobState = JobState.RECEIVED,
        reason: str | None = None,
    ) -> Job:
        now = utcnow()
        job = Job(
            id=job_id,
            state=str(state),
            stage=None,
            progress=0.0,
            reason=reason,
            source=source,
            submitted_by=submitted_by,
            calling_aet=calling_aet,
            remote_host=remote_host,
            study_instance_uid=study_instance_uid,
            fingerprint=fingerprint,
            incoming_id=incoming_id,
            options=options,
            export=list(export),
            queue=queue,
            n_files=n_files,
            input_bytes=input_bytes,
            attempt=0,
            transient_failures=0,
            outputs={},
            created_at=now,
            updated_at=now,
            finished_at=now if state in TERMINAL_STATES else None,
        )
        with self.session() as s:
            s.add(job)
            s.add(
                AuditEvent(
                    actor=submitted_by,
                    action="job_created",
                    job_id=job_id,
                    remote_host=remote_host,
                    detail={"source": source, "study_instance_uid": study_instance_uid, "files": n_files,
                            "state": str(state)},
                )
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self.session(readonly=True) as s:
            return s.get(Job, job_id)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        source: str | None = None,
        calling_aet: str | None = None,
        study_instance_uid: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        conds = []
        if state:
            conds.append(Job.state == state)
        if source:
            conds.append(Job.source == source)
        if calling_aet:
            conds.append(Job.calling_aet == calling_aet)
        if study_instance_uid:
            conds.append(Job.study_instance_uid == study_instance_uid)
        if since:
            conds.append(Job.created_at >= since)
        if until:
            conds.append(Job.created_at < until)
        where = and_(*conds) if conds else True
        with self.session(readonly=True) as s:
            total = s.scalar(select(func.count()).select_from(Job).where(where)) or 0
            rows = s.scalars(
                select(Job).where(where).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
            ).all()
        return list(rows), int(total)

    def counts_by_state(self) -> dict[str, int]:
        with self.session(readonly=True) as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = {str(st): 0 for st in JobState}
        counts.update({state: int(n) for state, n in rows})
        return counts

    def find_duplicate(
        self,
        fingerprint: str,
        options: dict,
        *,
        source: str,
        calling_aet: str | None = None,
        export: list[str] | None = None,
    ) -> Job | None:
        """The newest job on the same input content with the same options (and sender/destinations) that has not failed.

        A failed one does not count: sending the study again is how a user retries it.
        """
        conds = [
            Job.fingerprint == fingerprint,
            Job.source == source,
            Job.state != str(JobState.FAILED),
            Job.calling_aet == calling_aet if calling_aet is not None else Job.calling_aet.is_(None),
        ]
        wanted = json.dumps(options, sort_keys=True)  # as stored: equal text, not merely equal values
        with self.session(readonly=True) as s:
            for job in s.scalars(select(Job).where(*conds).order_by(Job.created_at.desc())):
                if json.dumps(job.options, sort_keys=True) == wanted and (export is None or job.export == export):
                    return job
        return None

    def previous_result(self, job: Job) -> Job | None:
        """The newest finished job with outputs on the same study, created before ``job``."""
        if not job.study_instance_uid:
            return None
        with self.session(readonly=True) as s:
            return s.scalars(
                select(Job)
                .where(
                    Job.study_instance_uid == job.study_instance_uid,
                    Job.id != job.id,
                    Job.state == str(JobState.DONE),
                    Job.created_at <= job.created_at,
                )
                .order_by(Job.finished_at.desc())
                .limit(1)
            ).first()

    # ------------------------------------------------------------------ life cycle

    @staticmethod
    def _transition(s: Session, job_id: str, sources: Iterable[JobState], target: JobState, *where,
                    **values) -> bool:
        """The one way a job changes state: ``sources`` -> ``target`` in one conditional UPDATE.

        Each ``source -> target`` must be in :data:`ALLOWED_TRANSITIONS`, or
        :class:`IllegalTransition` is raised before anything is written. The UPDATE matches
        only a job in one of ``sources`` (and ``where``), so two processes can never both
        move it. True when the job moved.
        """
        sources = tuple(sources)
        illegal = [str(src) for src in sources if target not in ALLOWED_TRANSITIONS[src]]
        if illegal or not sources:
            raise IllegalTransition(f"job {job_id}: {', '.join(illegal) or '(no state)'} -> {target} is not allowed")
        n = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_([str(src) for src in sources]), *where)
            .values(state=str(target), **values)
        ).rowcount
        return n == 1

    def mark_queued(self, job_id: str) -> bool:
        """``received`` -> ``queued`` after the task was published; never moves a job back."""
        now = utcnow()
        with self.session() as s:
            return self._transition(s, job_id, [JobState.RECEIVED], JobState.QUEUED, queued_at=now, updated_at=now)

    def touch_queued(self, job_id: str) -> None:
        """Record that a queued job's task was published again."""
        now = utcnow()
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == str(JobState.QUEUED)).values(queued_at=now))

    def claim(self, job_id: str, worker: str, *, lease_s: float, max_attempts: int) -> int | None:
        """Take the job for ``worker``; return the attempt number (fencing token) or None.

        None when the job is finished, unknown, or running under a live heartbeat elsewhere.
        A job claimed more than ``max_attempts`` times is failed instead (its workers keep
        dying: out of memory, killed, a poison input).
        """
        now = utcnow()
        stale = now - dt.timedelta(seconds=lease_s)
        with self.session() as s:
            claimed = self._transition(
                s, job_id, _LIVE_STATES, JobState.RUNNING,
                or_(Job.state != str(JobState.RUNNING), Job.heartbeat_at < stale),
                attempt=Job.attempt + 1,
                worker=worker,
                stage="starting",
                progress=0.0,
                reason=None,
                started_at=func.coalesce(Job.started_at, now),
                heartbeat_at=now,
                updated_at=now,
            )
            if not claimed:
                return None
            attempt = s.scalar(select(Job.attempt).where(Job.id == job_id))
            if attempt > max_attempts:
                self._transition(
                    s, job_id, [JobState.RUNNING], JobState.FAILED,
                    reason=f"given up: the job was started {attempt - 1} times without finishing "
                    "(workers lost or killed while running it)",
                    finished_at=now,
                )
                s.add(AuditEvent(actor=worker, action="job_failed", job_id=job_id, detail={"why": "max_attempts"}))
                return None
            s.add(AuditEvent(actor=worker, action="job_started", job_id=job_id, detail={"attempt": attempt}))
        return int(attempt)

    def _fenced(self, job_id: str, attempt: int, *, to: JobState | None = None, **values) -> bool:
        """Write ``values`` (and move to ``to``) only while ``attempt`` still runs the job."""
        values.setdefault("updated_at", utcnow())
        with self.session() as s:
            if to is not None:
                return self._transition(s, job_id, [JobState.RUNNING], to, Job.attempt == attempt, **values)
            n = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempt == attempt, Job.state == str(JobState.RUNNING))
                .values(**values)
            ).rowcount
        return n == 1

    def set_replaces(self, job_id: str, attempt: int, replaces: dict | None) -> bool:
        """Record which earlier result this job's result replaces (None: it replaces nothing)."""
        return self._fenced(job_id, attempt, replaces=replaces or {})

    def heartbeat(self, job_id: str, attempt: int) -> bool:
        """Renew the lease; False when this attempt no longer owns the job."""
        return self._fenced(job_id, attempt, heartbeat_at=utcnow())

    def set_progress(self, job_id: str, attempt: int, stage: str, fraction: float) -> bool:
        now = utcnow()
        return self._fenced(job_id, attempt, stage=stage, progress=float(min(max(fraction, 0.0), 1.0)), heartbeat_at=now)

    def finish(self, job_id: str, attempt: int, outputs: dict[str, str], result: dict | None = None) -> bool:
        """``running`` -> ``done`` with the output files and what the result says about itself."""
        now = utcnow()
        ok = self._fenced(
            job_id,
            attempt,
            to=JobState.DONE,
            stage="done",
            progress=1.0,
            reason=None,
            outputs=outputs,
            result=result,
            finished_at=now,
        )
        if ok:
            self.audit("worker", "job_done", job_id=job_id, outputs=sorted(outputs))
        return ok

    def fail(self, job_id: str, reason: str, *, attempt: int | None = None, actor: str = "worker") -> bool:
        """Move a job to ``failed`` with a reason (fenced when ``attempt`` is given)."""
        now = utcnow()
        values = {"reason": reason[:4000], "finished_at": now, "updated_at": now}
        if attempt is not None:
            ok = self._fenced(job_id, attempt, to=JobState.FAILED, **values)
        else:
            with self.session() as s:
                ok = self._transition(s, job_id, _LIVE_STATES, JobState.FAILED, **values)
        if ok:
            self.audit(actor, "job_failed", job_id=job_id, reason=reason[:500])
        return ok

    def retry_later(self, job_id: str, attempt: int, reason: str) -> int | None:
        """``running`` -> ``queued`` after a transient failure; returns the failure count."""
        now = utcnow()
        with self.session() as s:
            moved = self._transition(
                s, job_id, [JobState.RUNNING], JobState.QUEUED, Job.attempt == attempt,
                transient_failures=Job.transient_failures + 1,
                reason=reason[:4000],
                stage=None,
                queued_at=now,
                updated_at=now,
            )
            if not moved:
                return None
            return int(s.scalar(select(Job.transient_failures).where(Job.id == job_id)))

    def requeue_if_stale(self, job_id: str, *, lease_s: float, reason: str) -> bool:
        """``running`` -> ``queued`` when its heartbeat is older than ``lease_s`` (worker lost)."""
        now = utcnow()
        with self.session() as s:
            return self._transition(s, job_id, [JobState.RUNNING], JobState.QUEUED,
                                    Job.heartbeat_at < now - dt.timedelta(seconds=lease_s),
                                    reason=reason, stage=None, queued_at=now, updated_at=now)

    def requeue_of_worker(self, worker: str) -> list[str]:
        """Jobs a worker held when it died: back to ``queued`` (called by that worker on restart)."""
        now = utcnow()
        with self.session() as s:
            ids = s.scalars(select(Job.id).where(Job.worker == worker, Job.state == str(JobState.RUNNING))).all()
            done = []
            for job_id in ids:
                if self._transition(s, job_id, [JobState.RUNNING], JobState.QUEUED, Job.worker == worker,
                                    reason=f"worker {worker} restarted while running this job; requeued",
                                    stage=None, queued_at=now, updated_at=now):
                    done.append(job_id)
        return done

    def jobs_to_sweep(self, *, received_before: dt.datetime, heartbeat_before: dt.datetime, queued_before: dt.datetime):
        """Jobs needing attention: unpublished, lost running, or queued for too long."""
        with self.session(readonly=True) as s:
            received = s.scalars(
                select(Job.id).where(Job.state == str(JobState.RECEIVED), Job.created_at < received_before)
            ).all()
            lost = s.scalars(
                select(Job.id).where(Job.state == str(JobState.RUNNING), Job.heartbeat_at < heartbeat_before)
            ).all()
            waiting = s.scalars(
                select(Job.id).where(Job.state == str(JobState.QUEUED), Job.queued_at < queued_before)
            ).all()
        return list(received), list(lost), list(waiting)

    # ------------------------------------------------------------------ outputs and exports

    def record_outputs(self, job_id: str, instances: list[dict]) -> None:
        """Remember the instances we produced (SOP, series, class), so they are known if returned."""
        with self.session() as s:
            for item in instances:
                existing = s.get(OutputInstance, item["sop_instance_uid"])
                if existing is None:
                    s.add(OutputInstance(job_id=job_id, **item))

    def is_own_output(self, sop_instance_uid: str) -> bool:
        with self.session(readonly=True) as s:
            return s.get(OutputInstance, sop_instance_uid) is not None

    def export_sent(self, job_id: str, destination: str, sop_instance_uid: str) -> bool:
        with self.session(readonly=True) as s:
            rec = s.scalars(
                select(ExportRecord).where(
                    ExportRecord.job_id == job_id,
                    ExportRecord.destination == destination,
                    ExportRecord.sop_instance_uid == sop_instance_uid,
                )
            ).first()
            return rec is not None and rec.state == str(ExportState.SENT)

    def record_export(
        self, job_id: str, destination: str, item: ExportItem, *, sent: bool, attempts: int, error: str | None = None
    ) -> None:
        """Upsert the export record of one instance to one destination."""
        state = str(ExportState.SENT if sent else ExportState.FAILED)
        now = utcnow()
        for _ in range(2):
            try:
                with self.session() as s:
                    rec = s.scalars(
                        select(ExportRecord).where(
                            ExportRecord.job_id == job_id,
                            ExportRecord.destination == destination,
                            ExportRecord.sop_instance_uid == item.sop_instance_uid,
                        )
                    ).first()
                    if rec is None:
                        rec = ExportRecord(
                            job_id=job_id,
                            destination=destination,
                            kind=item.kind,
                            sop_instance_uid=item.sop_instance_uid,
                            attempts=0,
                        )
                        s.add(rec)
                    rec.state = state
                    rec.attempts = (rec.attempts or 0) + attempts
                    rec.last_error = error
                    if sent:
                        rec.sent_at = now
                return
            except IntegrityError:  # another process inserted the same record meanwhile
                continue

    def exports_of(self, job_id: str) -> list[ExportRecord]:
        with self.session(readonly=True) as s:
            return list(s.scalars(select(ExportRecord).where(ExportRecord.job_id == job_id).order_by(ExportRecord.id)))

    def exports_for(self, job_ids: list[str]) -> dict[str, list[ExportRecord]]:
        """The export records of several jobs in one query (for listings)."""
        out: dict[str, list[ExportRecord]] = {job_id: [] for job_id in job_ids}
        if not job_ids:
            return out
        with self.session(readonly=True) as s:
            rows = s.scalars(select(ExportRecord).where(ExportRecord.job_id.in_(job_ids)).order_by(ExportRecord.id))
            for rec in rows:
                out[rec.job_id].append(rec)
        return out

    # ------------------------------------------------------------------ DICOM arrivals

    def note_arrival(self, study_instance_uid: str, calling_aet: str, remote_host: str | None, *, n_instances: int,
                     n_own_outputs: int, new_id: str) -> str:
        """Add instances to the study's open burst (``receiving``), or open one; returns its id."""
        now = utcnow()
        with self.session() as s:
            row = s.scalars(
                select(IncomingStudy)
                .where(
                    IncomingStudy.study_instance_uid == study_instance_uid,
                    IncomingStudy.state == str(IncomingState.RECEIVING),
                )
                .with_for_update()
                .limit(1)
            ).first()
            if row is None:
                row = IncomingStudy(
                    id=new_id,
                    study_instance_uid=study_instance_uid,
                    calling_aet=calling_aet,
                    remote_host=remote_host,
                    state=str(IncomingState.RECEIVING),
                    n_instances=0,
                    n_own_outputs=0,
                    first_at=now,
                )
                s.add(row)
            row.n_instances = (row.n_instances or 0) + n_instances
            row.n_own_outputs = (row.n_own_outputs or 0) + n_own_outputs
            row.last_at = now
            return row.id

    def quiet_studies(self, quiet_before: dt.datetime) -> list[IncomingStudy]:
        with self.session(readonly=True) as s:
            return list(
                s.scalars(
                    select(IncomingStudy).where(
                        IncomingStudy.state == str(IncomingState.RECEIVING), IncomingStudy.last_at <= quiet_before
                    )
                )
            )

    def take_incoming(self, incoming_id: str, quiet_before: dt.datetime) -> bool:
        """``receiving`` -> ``dispatching`` if still quiet; only one process wins."""
        with self.session() as s:
            n = s.execute(
                update(IncomingStudy)
                .where(
                    IncomingStudy.id == incoming_id,
                    IncomingStudy.state == str(IncomingState.RECEIVING),
                    IncomingStudy.last_at <= quiet_before,
                )
                .values(state=str(IncomingState.DISPATCHING))
            ).rowcount
        return n == 1

    def settle_incoming(self, incoming_id: str, state: IncomingState, *, job_id: str | None = None,
                        note: str | None = None) -> None:
        with self.session() as s:
            s.execute(
                update(IncomingStudy).where(IncomingStudy.id == incoming_id).values(state=str(state), job_id=job_id, note=note)
            )

    def reset_dispatching(self) -> int:
        """After a crash: bursts caught between 'taken' and 'dispatched' go back to receiving."""
        with self.session() as s:
            return s.execute(
                update(IncomingStudy)
                .where(IncomingStudy.state == str(IncomingState.DISPATCHING))
                .values(state=str(IncomingState.RECEIVING))
            ).rowcount

    def incoming(self, *, study_instance_uid: str | None = None) -> list[IncomingStudy]:
        with self.session(readonly=True) as s:
            q = select(IncomingStudy).order_by(IncomingStudy.first_at)
            if study_instance_uid:
                q = q.where(IncomingStudy.study_instance_uid == study_instance_uid)
            return list(s.scalars(q))

    # ------------------------------------------------------------------ region sets after the dose

    def add_region_set(self, job_id: str, *, region_set_id: str, source: str, submitted_by: str, kind: str,
                       sop_instance_uid: str, digest: str, state: JobState = JobState.RECEIVED,
                       reason: str | None = None) -> tuple[RegionSetRecord, bool]:
        """The job's region set of this content (``digest``), made as its next version if new; (record, created)."""
        for _ in range(3):
            try:
                with self.session() as s:
                    same = s.scalars(select(RegionSetRecord).where(
                        RegionSetRecord.job_id == job_id, RegionSetRecord.digest == digest,
                        RegionSetRecord.state != str(JobState.FAILED))).first()
                    if same is not None:
                        return same, False
                    last = s.scalar(select(func.max(RegionSetRecord.version)).where(RegionSetRecord.job_id == job_id))
                    now = utcnow()
                    rec = RegionSetRecord(
                        id=region_set_id, job_id=job_id, version=int(last or 0) + 1, state=str(state), reason=reason,
                        source=source, submitted_by=submitted_by[:64], kind=kind, sop_instance_uid=sop_instance_uid,
                        digest=digest, attempt=0, created_at=now,
                        finished_at=now if state in TERMINAL_STATES else None)
                    s.add(rec)
                self.audit(submitted_by, "region_set_received", job_id=job_id, region_set=region_set_id,
                           version=rec.version, kind=kind, sop_instance_uid=sop_instance_uid, state=str(state))
                return rec, True
            except IntegrityError:  # another process took the same version number: count again
                continue
        raise RuntimeError(f"job {job_id}: could not number a new region set")

    def region_set(self, region_set_id: str) -> RegionSetRecord | None:
        with self.session(readonly=True) as s:
            return s.get(RegionSetRecord, region_set_id)

    def region_sets_of(self, job_id: str) -> list[RegionSetRecord]:
        with self.session(readonly=True) as s:
            return list(s.scalars(select(RegionSetRecord).where(RegionSetRecord.job_id == job_id)
                                  .order_by(RegionSetRecord.version)))

    def region_set_applied(self, job_id: str, sop_instance_uid: str) -> bool:
        """Whether a region set with this SOP Instance UID was taken for ``job_id`` (queued, done or refused).

        One stored but not yet published (``received``) does not count: offering it again publishes it.
        """
        with self.session(readonly=True) as s:
            return s.scalars(select(RegionSetRecord.id).where(
                RegionSetRecord.job_id == job_id, RegionSetRecord.sop_instance_uid == sop_instance_uid,
                RegionSetRecord.state != str(JobState.RECEIVED))).first() is not None

    def _region_update(self, region_set_id: str, sources: Iterable[JobState], **values) -> bool:
        with self.session() as s:
            n = s.execute(update(RegionSetRecord).where(
                RegionSetRecord.id == region_set_id,
                RegionSetRecord.state.in_([str(x) for x in sources])).values(**values)).rowcount
        return n == 1

    def mark_region_set_queued(self, region_set_id: str) -> bool:
        return self._region_update(region_set_id, [JobState.RECEIVED], state=str(JobState.QUEUED))

    def claim_region_set(self, region_set_id: str) -> int | None:
        """``received``/``queued`` (or ``running`` again, a redelivered task) -> ``running``; the attempt, or None."""
        with self.session() as s:
            n = s.execute(update(RegionSetRecord).where(
                RegionSetRecord.id == region_set_id,
                RegionSetRecord.state.in_([str(JobState.RECEIVED), str(JobState.QUEUED), str(JobState.RUNNING)]))
                .values(state=str(JobState.RUNNING), attempt=RegionSetRecord.attempt + 1)).rowcount
            if n != 1:
                return None
            return int(s.scalar(select(RegionSetRecord.attempt).where(RegionSetRecord.id == region_set_id)))

    def finish_region_set(self, region_set_id: str, result: dict) -> bool:
        return self._region_update(region_set_id, [JobState.RUNNING], state=str(JobState.DONE), reason=None,
                                   result=result, finished_at=utcnow())

    def fail_region_set(self, region_set_id: str, reason: str) -> bool:
        ok = self._region_update(region_set_id, [JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING],
                                 state=str(JobState.FAILED), reason=reason[:4000], finished_at=utcnow())
        if ok:
            rec = self.region_set(region_set_id)
            self.audit("worker", "region_set_failed", job_id=rec.job_id if rec else None, region_set=region_set_id,
                       reason=reason[:500])
        return ok

    # ------------------------------------------------------------------ audit

    def audit(self, actor: str, action: str, *, job_id: str | None = None, remote_host: str | None = None, **detail) -> None:
        """Append an audit event. ``detail`` carries UIDs, AE titles and counts only."""
        with self.session() as s:
            s.add(
                AuditEvent(
                    actor=actor[:64],
                    action=action,
                    job_id=job_id,
                    remote_host=remote_host,
                    detail=json.loads(json.dumps(detail, default=str)),  # values JSON cannot hold, as text
                )
            )

    def audit_events(self, *, job_id: str | None = None, action: str | None = None) -> list[AuditEvent]:
        with self.session(readonly=True) as s:
            q = select(AuditEvent).order_by(AuditEvent.id)
            if job_id:
                q = q.where(AuditEvent.job_id == job_id)
            if action:
                q = q.where(AuditEvent.action == action)
            return list(s.scalars(q))
