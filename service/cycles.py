"""Therapy cycles in the service: time points that arrive days apart, grouped and re-integrated.

A finished dose job (one SPECT/CT study, computed on its own like any other) is offered to a
cycle by :func:`time_point_done` (called by the worker on the job's success path). It joins
the cycle of the same patient and the same administration (Radiopharmaceutical Start
DateTime within :data:`SAME_ADMINISTRATION_S`), or the cycle a client named with ``POST
/studies?cycle_id=`` (:func:`note_cycle_request`), or starts one. A patient is PatientID with
IssuerOfPatientID, checked against the name and birth date first recorded for them: a study
that matches the ID but not the name or birth date is *held* as an identity conflict, never
integrated or counted, until :func:`resolve_conflict`. One administration is one cycle: a
``cycle_id`` naming a second cycle for it is refused with the first one's id.
A study that cannot join (another patient, another administration, acquired before the
administration, a duplicate time point, an uncalibrated SPECT, a time fixed by a single-study
option) is recorded as *rejected* with the reason; its own result stands.

Once a cycle holds two or more joined time points, a *cycle result* is made for that set of
time points and a cycle job is queued (``worker.cycle_tasks``), which runs
:func:`spectdose.cycle.run_cycle` on the time points' stored inputs: each result is a new
RT Dose series (its UIDs derive from the time points used), the newest is exported like the
single-study results (:func:`service.export.export_outputs`) and the older ones are kept and
marked *superseded*. A time point whose CT registration fails its quality check is left out
of that result and rejected with the figures; the rest is integrated if two remain.

Patient IDs are PHI: tables hold a hash (:func:`patient_key`), logs hold job and cycle ids.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from .config import Settings
from .db import (
    CYCLE_TABLES,
    Base,
    Cycle,
    CyclePatient,
    CycleRequest,
    CycleResult,
    CycleTimePoint,
    Job,
    JobState,
    utcnow,
)
from .jobs import JobStore
from .storage import Storage, safe_component

__all__ = [
    "CYCLE_TASK_NAME",
    "CYCLE_ID_PATTERN",
    "KIDNEY_ABSORBED_LIMIT_GY",
    "KIDNEY_BED_LIMIT_GY",
    "SAME_ADMINISTRATION_S",
    "CycleIdError",
    "ConflictError",
    "RESOLUTIONS",
    "resolve_conflict",
    "check_cycle_id",
    "patient_key",
    "ensure_tables",
    "note_cycle_request",
    "time_point_done",
    "request_integration",
    "republish_pending",
    "cycle_view",
    "cycles_of_job",
    "cumulative",
    "newest_result",
    "result_dir",
    "cycle_options",
]

log = logging.getLogger("spectdose.service.cycles")

CYCLE_TASK_NAME = "spectdose.process_cycle"

# Kidney limits flagged on the cumulative dose over all cycles:
# - 23 Gy absorbed dose: whole-kidney TD5/5 of external-beam radiotherapy (5 % risk of
#   nephropathy within 5 years, 2 Gy fractions), Emami et al., Int J Radiat Oncol Biol Phys 21
#   (1991) 109-122; the kidney limit used in Lu-177 PRRT since the first dosimetry studies.
# - 28 Gy BED: the renal BED threshold for patients with risk factors (hypertension,
#   diabetes) of Bodei et al., Eur J Nucl Med Mol Imaging 35 (2008) 1847-1856 (40 Gy without
#   risk factors); their BED is linear-quadratic with alpha/beta 2.6 Gy and a 2.8 h repair
#   half-time, the parameters spectdose.integration uses for kidneys (Wessels et al. 2008).
# BED adds over cycles: weeks apart, repair between cycles is complete (Dale, Br J Radiol 58
# (1985) 515), so the cumulative BED is the sum of the cycles' BEDs, as Bodei et al. sum them.
KIDNEY_ABSORBED_LIMIT_GY = 23.0
KIDNEY_BED_LIMIT_GY = 28.0
KIDNEY_LIMIT_SOURCES = {
    "absorbed_dose_gy": "Emami et al., IJROBP 21 (1991) 109: whole-kidney TD5/5 (external beam)",
    "bed_gy": "Bodei et al., EJNMMI 35 (2008) 1847: renal BED threshold with risk factors",
}

# The same administration: start date-times this close (spectdose.cycle refuses more, clock
# rounding and a header written in minutes allow a little).
SAME_ADMINISTRATION_S = 120.0
# Two time points closer than this are the same session (spectdose.cycle: a duplicate).
DUPLICATE_WITHIN_H = 0.5
# The same administration's activity in every time point's header (typed once, copied): 1 % for rounding.
SAME_ACTIVITY_REL = 0.01

# Options that name one study's fact or a single-time-point model: not carried to a cycle job.
_SINGLE_STUDY_OPTIONS = ("time_model", "effective_half_life_h", "dose_grid", "uncertainty")
# Options a time point must not have needed: spectdose.cycle refuses them for a cycle.
_REFUSED_OPTIONS = {
    "acquisition_time": "its acquisition time was given as an option (acquisition_time)",
    "hours_after_administration": "its time was given as an option (hours_after_administration)",
    "spect_series": "its SPECT was chosen with spect_series",
    "ct_series": "its CT was chosen with ct_series",
}

CYCLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CycleIdError(ValueError):
    """A cycle id that is not 1-64 letters, digits, '.', '_' or '-'."""


def check_cycle_id(text: str) -> str:
    if not CYCLE_ID_PATTERN.match(text or ""):
        raise CycleIdError(f"cycle_id must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
                           f"digit), got {text!r}")
    return text


def patient_key(patient_id: str, issuer: str | None = None) -> str:
    """The pseudonym of a patient in the tables: SHA-256 of PatientID and IssuerOfPatientID (never stored as such).

    Without an issuer it is the hash of the ID alone, as stored before issuers were used: cycles
    of an earlier release count for the patient of that ID without an issuer.
    """
    text = "spectdose-patient-id:" + patient_id.strip()
    if issuer and issuer.strip():
        text += "\x00issuer:" + issuer.strip()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _id_key(patient_id: str) -> str:
    return patient_key(patient_id)


def _name_key(patient_name: str) -> str:
    """Hash of a PatientName, compared without case, spaces or empty trailing components (``DOE^JANE^^``)."""
    norm = "=".join("^".join(c.strip() for c in group.split("^")).rstrip("^")
                    for group in patient_name.upper().split("=")).rstrip("=")
    return hashlib.sha256(("spectdose-patient-name:" + norm).encode("utf-8")).hexdigest()


def _birth_key(birth_date: str) -> str | None:
    """Hash of a PatientBirthDate; None when the header leaves it empty (type 2: nothing to compare)."""
    text = birth_date.strip()
    return hashlib.sha256(("spectdose-patient-birth:" + text).encode("utf-8")).hexdigest() if text else None


_ensured: set[int] = set()
_ensured_lock = threading.Lock()


def ensure_tables(store: JobStore) -> None:
    """Create the cycle tables on the store's engine once per process (idempotent)."""
    key = id(store.engine)
    if key in _ensured:
        return
    with _ensured_lock:
        if key not in _ensured:
            for attempt in range(3):  # another process may be creating them at the same moment
                try:
                    Base.metadata.create_all(store.engine, tables=CYCLE_TABLES)
                    break
                except (IntegrityError, OperationalError, ProgrammingError):
                    if attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            _ensured.add(key)


def note_cycle_request(store: JobStore, job_id: str, cycle_id: str) -> None:
    """Record the cycle a client named for a job; called once the job is stored, before it is queued."""
    ensure_tables(store)
    with store.session() as s:
        s.merge(CycleRequest(job_id=job_id, cycle_id=check_cycle_id(cycle_id), created_at=utcnow()))


def result_dir(storage: Storage, cycle_id: str, result_id: str) -> Path:
    """``DATA_DIR/cycles/<cycle>/<result>/`` (its ``output`` folder holds the cycle outputs)."""
    return storage.root / "cycles" / safe_component(cycle_id) / result_id


def cycle_options(job_options: dict) -> dict:
    """The options of a cycle job from its first time point's: the single-time-point ones left out."""
    out = {k: v for k, v in job_options.items() if k not in _SINGLE_STUDY_OPTIONS and k not in _REFUSED_OPTIONS}
    out.pop("normalised", None)
    if "accept" in out:
        out["accept"] = sorted(a for a in out["accept"] if a != "time_outside_model_range")
        if not out["accept"]:
            out.pop("accept")
    return out


# ---------------------------------------------------------------------------------- time points


def _naive(text: str | None) -> dt.datetime | None:
    """A stored ISO date-time as wall-clock time (headers are local; spectdose.cycle compares so)."""
    if not text:
        return None
    return dt.datetime.fromisoformat(text).replace(tzinfo=None)


_PATIENT_TAGS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                 "IssuerOfPatientIDQualifiersSequence")


def _issuer_of(ds) -> str:
    """The assigning authority of the PatientID: IssuerOfPatientID, else the Universal Entity ID of the
    IssuerOfPatientIDQualifiersSequence (PS3.3 C.7.1.1: either may carry it; an issuer given only
    there is an issuer, not none, or two hospitals' P1 would be one patient)."""
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if issuer:
        return issuer
    for item in ds.get("IssuerOfPatientIDQualifiersSequence", None) or []:
        universal = str(item.get("UniversalEntityID", "") or "").strip()
        if universal:
            kind = str(item.get("UniversalEntityIDType", "") or "").strip()
            return f"{universal}&{kind}" if kind else universal
    return ""


def _patient_of(input_dir: Path, spect_series_uid: str | None) -> dict | None:
    """PatientID, IssuerOfPatientID, PatientName, PatientBirthDate of the SPECT the job used (its stored input)."""
    import pydicom

    fallback = None
    for path in sorted(input_dir.iterdir()) if input_dir.is_dir() else []:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=[*_PATIENT_TAGS, "SeriesInstanceUID", "Modality"])
        except Exception:  # noqa: BLE001 - not DICOM: the job's scan ignored it too
            continue
        found = {tag: str(ds.get(tag, "") or "") for tag in _PATIENT_TAGS[:4]}
        found["IssuerOfPatientID"] = _issuer_of(ds)
        if spect_series_uid and str(ds.get("SeriesInstanceUID", "")) == spect_series_uid:
            return found
        if fallback is None and str(ds.get("Modality", "")) == "NM":
            fallback = found
    return fallback


def _facts(storage: Storage, job: Job) -> dict:
    """What grouping needs of a finished job: patient keys, times, units; ``reason`` when it cannot join."""
    manifest = storage.output_manifest(job.id) or {}
    entry = (manifest.get("files") or {}).get("summary_json")
    if entry is None:
        return {"reason": "the job has no summary.json to read its times from"}
    summary = json.loads((storage.job_output(job.id) / entry["file"]).read_text())
    spect_uid = ((summary.get("series") or {}).get("spect") or {}).get("series_instance_uid")
    patient = _patient_of(storage.job_input(job.id), spect_uid)
    timing = summary.get("time") or {}
    units = (summary.get("activity") or {}).get("units")
    facts = {
        "activity_mbq": (summary.get("activity") or {}).get("injected_activity_mbq"),
        "study_instance_uid": job.study_instance_uid,
        "administration": _naive(timing.get("administration")),
        "acquisition": _naive(timing.get("acquisition")),
        "hours": timing.get("hours_since_administration"),
        "units": units,
    }
    if patient is None:
        return facts | {"reason": "its stored input has no SPECT header to read the patient from (input removed?)"}
    if not patient["PatientID"].strip():
        return facts | {"reason": "the study has no PatientID: a cycle is one patient's, and it cannot be matched "
                                  "(send it with the others' PatientID)"}
    facts["patient_key"] = patient_key(patient["PatientID"], patient["IssuerOfPatientID"])
    facts["id_key"] = _id_key(patient["PatientID"])
    facts["name_key"] = _name_key(patient["PatientName"])
    facts["birth_key"] = _birth_key(patient["PatientBirthDate"])
    refused = [why for key, why in _REFUSED_OPTIONS.items() if job.options.get(key) is not None]
    if refused:
        return facts | {"reason": f"{'; '.join(refused)}: a cycle takes each time point's facts from its own "
                                  "headers (spectdose.cycle refuses single-study options)"}
    if units != "Bq/ml":
        return facts | {"reason": f"its SPECT is not calibrated to Bq/ml (units {units!r}, computed per MBq on its "
                                  "own): a cycle integrates activity over time and needs calibrated SPECT at every "
                                  "time point (give sensitivity_cps_per_mbq or a calibrations file)"}
    if facts["administration"] is None or facts["acquisition"] is None or facts["hours"] is None:
        return facts | {"reason": "its administration or acquisition date-time is unknown"}
    return facts


def _find_cycle(s, facts: dict, requested: str | None) -> Cycle | None:
    if requested is not None:
        return s.get(Cycle, requested)
    if "patient_key" not in facts or facts.get("administration") is None:
        return None
    for cycle in s.scalars(select(Cycle).where(Cycle.patient_key == facts["patient_key"]).order_by(Cycle.created_at)):
        if cycle.administration is not None and abs(
                (cycle.administration - facts["administration"]).total_seconds()) <= SAME_ADMINISTRATION_S:
            return cycle
    return None


def _lock_patient(s, facts: dict) -> None:
    """Serialise the offers of one patient's studies until this transaction ends.

    Which cycle an administration belongs to is decided by reading the patient's cycles and then
    writing one: two offers at once (two new cycle_ids for one administration, or one named and
    one derived) would each see none and form two cycles, and the cumulative would count the
    administration twice. SQLite's writers already queue at BEGIN IMMEDIATE (service.db);
    PostgreSQL, at READ COMMITTED, needs this transaction-scoped advisory lock on the patient.
    """
    if "patient_key" not in facts or s.get_bind().dialect.name != "postgresql":
        return
    key = int(facts["patient_key"][:16], 16)
    key = key - (1 << 64) if key >= (1 << 63) else key  # a signed bigint, as pg_advisory_xact_lock takes
    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _derived_cycle_id(facts: dict) -> str:
    return "c" + hashlib.sha256(f"{facts['patient_key']}|{facts['administration'].isoformat()}".encode()).hexdigest()[:31]


def _why_not(s, cycle: Cycle, job: Job, facts: dict) -> tuple[str | None, CycleTimePoint | None]:
    """Why a calibrated, dated time point cannot join ``cycle`` (None: it can), and a time point it replaces."""
    if facts["patient_key"] != cycle.patient_key:
        patient = s.get(CyclePatient, cycle.patient_key)
        what = ("IssuerOfPatientID" if patient is not None and patient.id_key == facts["id_key"] else "PatientID")
        return (f"another patient: its {what} differs from the cycle's (a cycle is one patient's; the study was "
                "computed on its own)"), None
    if cycle.administration is not None and facts["acquisition"] < cycle.administration:
        return (f"acquired before the cycle's administration (acquisition {facts['acquisition'].isoformat()}, "
                f"administration {cycle.administration.isoformat()}): not a time point of this cycle"), None
    if cycle.administration is not None and abs(
            (facts["administration"] - cycle.administration).total_seconds()) > SAME_ADMINISTRATION_S:
        return (f"another administration: its Radiopharmaceutical Start DateTime {facts['administration'].isoformat()} "
                f"differs from the cycle's {cycle.administration.isoformat()} by more than "
                f"{SAME_ADMINISTRATION_S:.0f} s (a cycle is one administration; if a header is wrong, send the study "
                "again with administration_time)"), None
    if cycle.activity_mbq and facts.get("activity_mbq") and abs(
            facts["activity_mbq"] - cycle.activity_mbq) > SAME_ACTIVITY_REL * cycle.activity_mbq:
        return (f"another administration: its administered activity (RadionuclideTotalDose) differs from the "
                f"cycle's by {100 * abs(facts['activity_mbq'] / cycle.activity_mbq - 1):.1f} % (more than "
                f"{100 * SAME_ACTIVITY_REL:g} %): one administration is one start date-time and one activity"), None
    joined = s.scalars(select(CycleTimePoint).where(CycleTimePoint.cycle_id == cycle.id,
                                                    CycleTimePoint.state == "joined")).all()
    replaces = (job.replaces or {}).get("job_id")
    for tp in joined:
        if tp.study_instance_uid and tp.study_instance_uid == facts["study_instance_uid"]:
            if replaces == tp.job_id:
                return None, tp  # a recomputation of the same study (corrected header, other options)
            return (f"a duplicate time point: the same study (StudyInstanceUID {tp.study_instance_uid}) is already "
                    f"time point job {tp.job_id} of this cycle"), None
        if tp.hours is not None and abs(tp.hours - facts["hours"]) < DUPLICATE_WITHIN_H and replaces != tp.job_id:
            return (f"a duplicate time point: acquired {facts['hours']:.2f} h after administration, within "
                    f"{DUPLICATE_WITHIN_H} h of time point job {tp.job_id} ({tp.hours:.2f} h)"), None
    return None, None


def _identity_conflict(s, facts: dict) -> list[str]:
    """The fields (PatientName, PatientBirthDate) in which the study differs from the patient its ID and issuer name.

    The patient is the first one recorded under that ID and issuer (or one a resolution accepted
    as the same, ``aliases``); for cycles of an earlier release with no patient record, the
    oldest cycle's name. An empty birth date on either side is not compared (type 2 attribute).
    """
    row = s.get(CyclePatient, facts["patient_key"])
    if row is not None:
        known = [{"name_key": row.name_key, "birth_key": row.birth_key}, *(row.aliases or [])]
    else:
        legacy = s.scalars(select(Cycle).where(Cycle.patient_key == facts["patient_key"])
                           .order_by(Cycle.created_at)).first()
        if legacy is None:
            return []
        known = [{"name_key": legacy.name_key, "birth_key": None}]

    def differs(k: dict) -> list[str]:
        out = [] if k["name_key"] == facts["name_key"] else ["PatientName"]
        if k.get("birth_key") and facts.get("birth_key") and k["birth_key"] != facts["birth_key"]:
            out.append("PatientBirthDate")
        return out

    return min((differs(k) for k in known), key=len)


def _remember_patient(s, facts: dict) -> None:
    """Record the patient of a joining study on first sight (and a birth date first seen now)."""
    row = s.get(CyclePatient, facts["patient_key"])
    if row is None:
        legacy = s.scalars(select(Cycle).where(Cycle.patient_key == facts["patient_key"])
                           .order_by(Cycle.created_at)).first()
        s.add(CyclePatient(key=facts["patient_key"], id_key=facts["id_key"],
                           name_key=legacy.name_key if legacy is not None else facts["name_key"],
                           birth_key=facts.get("birth_key"), aliases=[]))
        s.flush()
    elif row.birth_key is None and facts.get("birth_key") and row.name_key == facts["name_key"]:
        row.birth_key = facts["birth_key"]


def _administration_elsewhere(s, facts: dict, requested: str) -> Cycle | None:
    """Another cycle of the same patient for the same administration than the cycle ``requested`` by name."""
    if "patient_key" not in facts or facts.get("administration") is None:
        return None
    for cycle in s.scalars(select(Cycle).where(Cycle.patient_key == facts["patient_key"], Cycle.id != requested)
                           .order_by(Cycle.created_at)):
        if cycle.administration is not None and abs(
                (cycle.administration - facts["administration"]).total_seconds()) <= SAME_ADMINISTRATION_S:
            return cycle
    return None


def _conflict_reason(fields: list[str], cycle_id: str, job_id: str) -> str:
    return (f"identity conflict: PatientID and IssuerOfPatientID match a patient already held, but "
            f"{' and '.join(fields)} differ{'s' if len(fields) == 1 else ''}; held: not joined to any cycle and not "
            "counted in any cumulative dose until resolved (POST /cycles/" + cycle_id + "/conflicts/" + job_id
            + "/resolve with decision same_patient or other_patient)")


def _offer(store: JobStore, storage: Storage, job: Job) -> tuple[str | None, bool]:
    """Record the job as a time point (joined, rejected or held as an identity conflict); returns (cycle id, joined).

    Order of the checks: the facts a cycle needs (calibrated, dated, a PatientID); the patient's
    identity (ID and issuer against name and birth date: a conflict is held, never counted); the
    administration (one administration is one cycle: a cycle_id naming a second cycle for it is
    refused with the first one's id); then the cycle's own rules (:func:`_why_not`).
    """
    facts = _facts(storage, job)
    for _ in range(3):  # two processes creating the same cycle at once: the loser retries and joins
        try:
            conflict: list[str] = []
            with store.session() as s:
                _lock_patient(s, facts)
                if s.get(CycleTimePoint, job.id) is not None:
                    tp = s.get(CycleTimePoint, job.id)
                    return tp.cycle_id, tp.state == "joined"
                request = s.get(CycleRequest, job.id)
                requested = request.cycle_id if request is not None else None
                cycle = _find_cycle(s, facts, requested)
                reason, replaced = facts.get("reason"), None
                if reason is None and (cycle is None or cycle.patient_key == facts["patient_key"]):
                    conflict = _identity_conflict(s, facts)
                if reason is None and not conflict and requested is not None:
                    other = _administration_elsewhere(s, facts, requested)
                    if other is not None:
                        reason = (f"this administration (Radiopharmaceutical Start DateTime "
                                  f"{facts['administration'].isoformat()}) already belongs to cycle {other.id}: one "
                                  f"administration is one cycle, so the study was not added to cycle {requested} "
                                  f"(send it with cycle_id={other.id}, or without cycle_id; its own result stands)")
                if reason is None and not conflict and cycle is not None:
                    reason, replaced = _why_not(s, cycle, job, facts)
                if reason is None and not conflict and cycle is None:
                    cycle = Cycle(id=requested or _derived_cycle_id(facts), patient_key=facts["patient_key"],
                                  name_key=facts["name_key"], administration=facts["administration"],
                                  activity_mbq=facts.get("activity_mbq"),
                                  explicit=int(requested is not None), options=cycle_options(job.options))
                    s.add(cycle)
                    s.flush()
                cycle_id = cycle.id if cycle is not None else requested
                if conflict and cycle_id is None:
                    cycle_id = _derived_cycle_id(facts)  # the cycle it would have formed (no cycle is made)
                    reason = _conflict_reason(conflict, cycle_id, job.id)
                elif conflict:
                    reason = _conflict_reason(conflict, cycle_id, job.id)
                state = "conflict" if conflict else "rejected" if reason else "joined"
                if state == "joined":
                    _remember_patient(s, facts)
                identity = ({k: facts.get(k) for k in ("patient_key", "id_key", "name_key", "birth_key")}
                            if conflict else None)
                s.add(CycleTimePoint(job_id=job.id, cycle_id=cycle_id, state=state, reason=reason,
                                     identity=identity, study_instance_uid=facts.get("study_instance_uid"),
                                     hours=facts.get("hours"), acquisition=facts.get("acquisition")))
                if replaced is not None:
                    replaced.state = "replaced"
                    replaced.reason = f"replaced by job {job.id} (the same study computed again)"
            if conflict:
                log.warning("job %s held as an identity conflict for cycle %s (%s differ)", job.id, cycle_id,
                            ", ".join(conflict))
                store.audit("cycles", "cycle_identity_conflict", job_id=job.id, cycle_id=cycle_id, fields=conflict)
            elif reason:
                log.info("job %s not joined to a cycle%s: %s", job.id, f" ({cycle_id})" if cycle_id else "",
                         reason.split(":")[0])
            else:
                log.info("job %s joined cycle %s", job.id, cycle_id)
            return cycle_id, reason is None
        except IntegrityError:
            continue
    raise RuntimeError(f"job {job.id}: could not record its time point (concurrent writers)")


class ConflictError(ValueError):
    """A conflict resolution that cannot apply: ``status`` 404 (no such held study) or 409 (not held)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


RESOLUTIONS = ("same_patient", "other_patient")


def resolve_conflict(store: JobStore, storage: Storage, settings: Settings, cycle_id: str, job_id: str, *,
                     decision: str, actor: str, publish: Callable[[str], bool] | None = None) -> dict:
    """Resolve a study held as an identity conflict, explicitly (``POST /cycles/{id}/conflicts/{job}/resolve``).

    ``same_patient``: the study is the recorded patient's (e.g. a corrected name): its name and
    birth date are accepted for that patient from now on and the study is offered to its cycle
    again (joined, or rejected with the usual reasons). ``other_patient``: another person who
    shares the PatientID: rejected for good, never counted in that patient's cumulative dose.
    Returns the time point as ``GET /cycles/{id}`` shows it.
    """
    if decision not in RESOLUTIONS:
        raise ValueError(f"decision must be one of {', '.join(RESOLUTIONS)}, got {decision!r}")
    ensure_tables(store)
    with store.session() as s:
        tp = s.get(CycleTimePoint, job_id)
        if tp is None or tp.cycle_id != cycle_id:
            raise ConflictError(404, f"no study of job {job_id} is held for cycle {cycle_id}")
        if tp.state != "conflict":
            raise ConflictError(409, f"job {job_id} is not held as an identity conflict (its time point is "
                                     f"{tp.state}); nothing to resolve")
        identity = dict(tp.identity or {})
        fields = [f for f in ("PatientName", "PatientBirthDate") if f in (tp.reason or "")]
        if decision == "other_patient":
            tp.state = "rejected"
            tp.reason = (f"another patient sharing the PatientID ({' and '.join(fields)} differ; resolved "
                         f"other_patient by {actor}): never counted in that patient's cumulative dose; send it "
                         "with its own PatientID or IssuerOfPatientID to count it")
        else:
            row = s.get(CyclePatient, identity.get("patient_key"))
            if row is None:
                legacy = s.scalars(select(Cycle).where(Cycle.patient_key == identity.get("patient_key"))
                                   .order_by(Cycle.created_at)).first()
                row = CyclePatient(key=identity["patient_key"], id_key=identity.get("id_key") or "",
                                   name_key=legacy.name_key if legacy is not None else identity["name_key"],
                                   birth_key=None, aliases=[])
                s.add(row)
            alias = {"name_key": identity.get("name_key"), "birth_key": identity.get("birth_key")}
            row.aliases = [*(row.aliases or []), alias]
            s.delete(tp)  # offered again below, now as the recorded patient's
    store.audit(actor, "cycle_conflict_resolved", job_id=job_id, cycle_id=cycle_id, decision=decision,
                fields=fields)
    log.info("job %s: identity conflict for cycle %s resolved as %s", job_id, cycle_id, decision)
    if decision == "same_patient":
        time_point_done(store, storage, settings, job_id, publish=publish)
    with store.session(readonly=True) as s:
        tp = s.get(CycleTimePoint, job_id)
        return {"job_id": job_id, "cycle_id": tp.cycle_id if tp else None, "state": tp.state if tp else None,
                "reason": tp.reason if tp else None, "decision": decision}


def time_point_done(store: JobStore, storage: Storage, settings: Settings, job_id: str, *,
                    publish: Callable[[str], bool] | None = None) -> str | None:
    """A dose job finished: offer it to a cycle and re-integrate the cycle; returns the new result's id.

    Never raises (the job's own result is done and stays so): a problem here is logged and
    the time point can be offered again (``POST /cycles/{id}/integrate``).
    """
    try:
        ensure_tables(store)
        job = store.get(job_id)
        if job is None or job.state != str(JobState.DONE):
            return None
        cycle_id, joined = _offer(store, storage, job)
        if not joined or cycle_id is None:
            return None
        publish = publish or celery_publisher(settings)
        republish_pending(store, publish)
        return request_integration(store, cycle_id, trigger_job_id=job_id, publish=publish)
    except Exception as exc:  # noqa: BLE001 - a cycle problem never undoes the job's own result
        log.warning("job %s: cycle grouping failed (%s: %s)", job_id, type(exc).__name__, exc)
        return None


# ---------------------------------------------------------------------------------- results


_apps: dict[str, object] = {}


def celery_publisher(settings: Settings) -> Callable[[str], bool]:
    """Publish a cycle job on the settings' broker and queue; False (left ``received``) if it fails."""

    def publish(result_id: str) -> bool:
        from .celery_app import make_celery

        app = _apps.get(settings.redis_url)
        if app is None:
            app = _apps.setdefault(settings.redis_url, make_celery(settings))
        try:
            app.send_task(CYCLE_TASK_NAME, args=[result_id], queue=settings.job_queue, routing_key=settings.job_queue)
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many types; all mean "not published"
            log.warning("cycle result %s: could not publish (%s: %s); published again with the next time point "
                        "or POST /cycles/{id}/integrate", result_id, type(exc).__name__, exc)
            return False
        return True

    return publish


def _mark_queued(store: JobStore, result_id: str) -> None:
    mark_result_queued(store, result_id)


def request_integration(store: JobStore, cycle_id: str, *, trigger_job_id: str | None,
                        publish: Callable[[str], bool], again: bool = False) -> str | None:
    """Make (and publish) a cycle result over the cycle's joined time points, if there are 2 or more.

    One result per set of time points (a second request for the same set makes nothing)
    unless ``again`` (a new attempt after a failure). Returns the new result's id or None.
    """
    ensure_tables(store)
    with store.session() as s:
        joined = s.scalars(select(CycleTimePoint).where(CycleTimePoint.cycle_id == cycle_id,
                                                        CycleTimePoint.state == "joined")
                           .order_by(CycleTimePoint.hours)).all()
        job_ids = [tp.job_id for tp in joined]
        if len(job_ids) < 2:
            return None
        if trigger_job_id is None:
            trigger_job_id = max(joined, key=lambda tp: tp.created_at).job_id
        set_key = hashlib.sha256(",".join(sorted(job_ids)).encode()).hexdigest()
        if again:
            set_key = hashlib.sha256(f"{set_key}|{uuid.uuid4().hex}".encode()).hexdigest()
        seq = (s.scalar(select(func.max(CycleResult.seq)).where(CycleResult.cycle_id == cycle_id)) or 0) + 1
        result_id = uuid.uuid4().hex
    try:
        with store.session() as s:
            s.add(CycleResult(id=result_id, cycle_id=cycle_id, seq=seq, set_key=set_key, state="received",
                              time_points=job_ids, excluded=[], trigger_job_id=trigger_job_id, outputs={}))
    except IntegrityError:
        return None  # this set of time points has a result already (or another process made it now)
    store.audit("cycles", "cycle_result_created", job_id=trigger_job_id, cycle_id=cycle_id, result_id=result_id,
                time_points=len(job_ids))
    log.info("cycle %s: result %s over %d time points", cycle_id, result_id, len(job_ids))
    if publish(result_id):
        _mark_queued(store, result_id)
    return result_id


def republish_pending(store: JobStore, publish: Callable[[str], bool], *, older_than_s: float = 5.0) -> int:
    """Publish cycle results left ``received`` (their publication failed); returns how many."""
    before = utcnow() - dt.timedelta(seconds=older_than_s)
    with store.session(readonly=True) as s:
        ids = s.scalars(select(CycleResult.id).where(CycleResult.state == "received",
                                                     CycleResult.created_at < before)).all()
    n = 0
    for result_id in ids:
        if publish(result_id):
            _mark_queued(store, result_id)
            n += 1
    return n


def mark_result_queued(store: JobStore, result_id: str, *, resend: bool = False) -> bool:
    """``received`` -> ``queued`` once its message is published; ``resend`` also refreshes a ``queued`` one's time."""
    states = ("received", "queued") if resend else ("received",)
    with store.session() as s:
        return s.execute(update(CycleResult).where(CycleResult.id == result_id, CycleResult.state.in_(states))
                         .values(state="queued", updated_at=utcnow())).rowcount == 1


def results_to_sweep(store: JobStore, *, received_before: dt.datetime, heartbeat_before: dt.datetime,
                     queued_before: dt.datetime) -> tuple[list[str], list[str], list[str]]:
    """Cycle results the sweeper repairs, as for dose jobs (:meth:`JobStore.jobs_to_sweep`): left ``received``
    (publication failed), ``running`` with a heartbeat older than the lease (worker lost), ``queued`` too long."""
    ensure_tables(store)
    with store.session(readonly=True) as s:
        def ids(*where) -> list[str]:
            return list(s.scalars(select(CycleResult.id).where(*where).order_by(CycleResult.created_at)))

        return (ids(CycleResult.state == "received", CycleResult.created_at < received_before),
                ids(CycleResult.state == "running", or_(CycleResult.heartbeat_at.is_(None),
                                                        CycleResult.heartbeat_at < heartbeat_before)),
                ids(CycleResult.state == "queued", CycleResult.updated_at < queued_before))


def requeue_result_if_stale(store: JobStore, result_id: str, *, lease_s: float, reason: str) -> bool:
    """``running`` whose heartbeat is older than ``lease_s`` -> ``queued`` with the reason (its worker is gone).

    The attempt number stays: the next claim takes a new one, so a worker that was only slow
    is fenced off from finishing or exporting (:func:`_fenced`).
    """
    before = utcnow() - dt.timedelta(seconds=lease_s)
    with store.session() as s:
        return s.execute(update(CycleResult).where(
            CycleResult.id == result_id, CycleResult.state == "running",
            or_(CycleResult.heartbeat_at.is_(None), CycleResult.heartbeat_at < before))
            .values(state="queued", stage=None, reason=reason[:4000], updated_at=utcnow())).rowcount == 1


def requeue_results_of_worker(store: JobStore, worker: str) -> list[str]:
    """Cycle results ``running`` on ``worker`` (a worker restarting under its name): back to ``queued`` at once."""
    ensure_tables(store)
    with store.session() as s:
        ids = list(s.scalars(select(CycleResult.id).where(CycleResult.state == "running",
                                                          CycleResult.worker == worker)))
        if ids:
            s.execute(update(CycleResult).where(CycleResult.id.in_(ids), CycleResult.state == "running")
                      .values(state="queued", stage=None, updated_at=utcnow(),
                              reason=f"worker {worker} restarted while running it; requeued"))
    return ids


def claim_result(store: JobStore, result_id: str, worker: str, *, lease_s: float,
                 max_attempts: int | None = None) -> CycleResult | None:
    """``received``/``queued`` (or ``running`` with a stale heartbeat) -> ``running``; the claimed row or None.

    A result claimed more than ``max_attempts`` times fails instead (its workers keep dying).
    """
    now = utcnow()
    with store.session() as s:
        n = s.execute(
            update(CycleResult)
            .where(CycleResult.id == result_id,
                   or_(CycleResult.state.in_(("received", "queued")),
                       (CycleResult.state == "running") & (CycleResult.heartbeat_at < now - dt.timedelta(seconds=lease_s))))
            .values(state="running", attempt=CycleResult.attempt + 1, worker=worker, heartbeat_at=now,
                    stage="starting", updated_at=now)
        ).rowcount
        if n != 1:
            return None
        row = s.get(CycleResult, result_id)
        if max_attempts is not None and row.attempt > max_attempts:
            row.state, row.stage, row.finished_at = "failed", None, now
            row.reason = (f"given up: the cycle job was started {row.attempt - 1} times without finishing "
                          "(workers lost or killed while running it)")
            return None
        return row


def _fenced(store: JobStore, result_id: str, attempt: int, **values) -> bool:
    values.setdefault("updated_at", utcnow())
    with store.session() as s:
        return s.execute(update(CycleResult).where(CycleResult.id == result_id, CycleResult.attempt == attempt,
                                                   CycleResult.state == "running").values(**values)).rowcount == 1


def result_heartbeat(store: JobStore, result_id: str, attempt: int, stage: str | None = None) -> bool:
    values = {"heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage[:64]
    return _fenced(store, result_id, attempt, **values)


def reject_time_point(store: JobStore, job_id: str, reason: str) -> None:
    """A joined time point that failed while integrating (e.g. its registration): out of the cycle, with the reason."""
    with store.session() as s:
        s.execute(update(CycleTimePoint).where(CycleTimePoint.job_id == job_id)
                  .values(state="rejected", reason=reason[:4000], updated_at=utcnow()))


def set_excluded(store: JobStore, result_id: str, attempt: int, excluded: list[dict]) -> bool:
    return _fenced(store, result_id, attempt, excluded=excluded)


def finish_result(store: JobStore, result_id: str, attempt: int, *, outputs: dict, result: dict,
                  used: list[str], note: str | None = None) -> bool:
    """``running`` -> ``done``; every older done result of the cycle is marked superseded by it."""
    now = utcnow()
    with store.session() as s:
        row = s.get(CycleResult, result_id)
        n = s.execute(update(CycleResult).where(CycleResult.id == result_id, CycleResult.attempt == attempt,
                                                CycleResult.state == "running")
                      .values(state="done", stage="done", reason=note, outputs=outputs, result=result, used=used,
                              finished_at=now, updated_at=now)).rowcount
        if n != 1:
            return False
        newer = s.scalar(select(CycleResult.id).where(CycleResult.cycle_id == row.cycle_id, CycleResult.state == "done",
                                                      CycleResult.seq > row.seq).order_by(CycleResult.seq.desc()))
        if newer is not None:  # finished after a newer one (a retry): stored, but superseded at once
            s.execute(update(CycleResult).where(CycleResult.id == result_id).values(superseded_by=newer))
        else:
            s.execute(update(CycleResult).where(CycleResult.cycle_id == row.cycle_id, CycleResult.state == "done",
                                                CycleResult.seq < row.seq)
                      .values(superseded_by=result_id, updated_at=now))
    store.audit("worker", "cycle_result_done", job_id=row.trigger_job_id, cycle_id=row.cycle_id,
                result_id=result_id, time_points=len(used))
    return True


def is_newest(store: JobStore, result_id: str) -> bool:
    """No newer result of the same cycle is done (the one to send to the PACS)."""
    with store.session(readonly=True) as s:
        row = s.get(CycleResult, result_id)
        newer = s.scalar(select(func.count()).select_from(CycleResult).where(
            CycleResult.cycle_id == row.cycle_id, CycleResult.state == "done", CycleResult.seq > row.seq))
        return row.superseded_by is None and not newer


def fail_result(store: JobStore, result_id: str, reason: str, *, attempt: int | None = None) -> bool:
    now = utcnow()
    with store.session() as s:
        q = update(CycleResult).where(CycleResult.id == result_id,
                                      CycleResult.state.in_(("received", "queued", "running")))
        if attempt is not None:
            q = q.where(CycleResult.attempt == attempt)
        ok = s.execute(q.values(state="failed", stage=None, reason=reason[:4000], finished_at=now,
                                updated_at=now)).rowcount == 1
    return ok


def retry_result_later(store: JobStore, result_id: str, attempt: int, reason: str) -> int | None:
    """``running`` -> ``queued`` after a transient failure; the failure count, or None if taken over."""
    with store.session() as s:
        n = s.execute(update(CycleResult).where(CycleResult.id == result_id, CycleResult.attempt == attempt,
                                                CycleResult.state == "running")
                      .values(state="queued", stage=None, reason=reason[:4000],
                              transient_failures=CycleResult.transient_failures + 1, updated_at=utcnow())).rowcount
        if n != 1:
            return None
        return int(s.scalar(select(CycleResult.transient_failures).where(CycleResult.id == result_id)))


def get_result(store: JobStore, result_id: str) -> CycleResult | None:
    ensure_tables(store)
    with store.session(readonly=True) as s:
        return s.get(CycleResult, result_id)


def get_cycle(store: JobStore, cycle_id: str) -> Cycle | None:
    ensure_tables(store)
    with store.session(readonly=True) as s:
        return s.get(Cycle, cycle_id)


def joined_time_points(store: JobStore, job_ids: list[str]) -> list[CycleTimePoint]:
    with store.session(readonly=True) as s:
        rows = s.scalars(select(CycleTimePoint).where(CycleTimePoint.job_id.in_(job_ids),
                                                      CycleTimePoint.state == "joined")).all()
    return sorted(rows, key=lambda tp: (tp.hours if tp.hours is not None else 0.0))


# ---------------------------------------------------------------------------------- views


def _result_out(r: CycleResult) -> dict:
    return {
        "result_id": r.id,
        "seq": r.seq,
        "state": r.state,
        "stage": r.stage,
        "reason": r.reason,
        "attempt": r.attempt,  # claims so far: 2 after one worker was lost mid-integration
        "time_points": list(r.time_points or []),
        "used": r.used,
        "excluded": list(r.excluded or []),
        "superseded_by": r.superseded_by,
        "superseded": r.superseded_by is not None,
        "trigger_job_id": r.trigger_job_id,
        "outputs": sorted((r.outputs or {}).keys()),
        "rtdose": (r.result or {}).get("uids", {}).get("rtdose"),
        "regions": (r.result or {}).get("regions", []),
        "warnings": (r.result or {}).get("warnings", []),
        "created_at": r.created_at.isoformat() if r.created_at else None,
        "finished_at": r.finished_at.isoformat() if r.finished_at else None,
    }


def newest_result(store: JobStore, cycle_id: str, *, done: bool = True) -> CycleResult | None:
    ensure_tables(store)
    with store.session(readonly=True) as s:
        q = select(CycleResult).where(CycleResult.cycle_id == cycle_id)
        if done:
            q = q.where(CycleResult.state == "done", CycleResult.superseded_by.is_(None))
        return s.scalars(q.order_by(CycleResult.seq.desc())).first()


def _state(results: list[CycleResult], joined: int) -> str:
    if not results:
        return "collecting" if joined < 2 else "pending"
    newest = results[0]
    if newest.state in ("received", "queued", "running"):
        return "integrating"
    if newest.state == "failed":
        return "failed"
    return "integrated"


def cycle_view(store: JobStore, cycle_id: str) -> dict | None:
    """``GET /cycles/{id}``: the cycle's time points (joined or not, with reasons), state and results."""
    ensure_tables(store)
    with store.session(readonly=True) as s:
        cycle = s.get(Cycle, cycle_id)
        tps = s.scalars(select(CycleTimePoint).where(CycleTimePoint.cycle_id == cycle_id)).all()
        requests = s.scalars(select(CycleRequest).where(CycleRequest.cycle_id == cycle_id)).all()
        results = s.scalars(select(CycleResult).where(CycleResult.cycle_id == cycle_id)
                            .order_by(CycleResult.seq.desc())).all()
        offered = {tp.job_id for tp in tps}
        waiting = [s.get(Job, r.job_id) for r in requests if r.job_id not in offered]
    if cycle is None and not tps and not requests:
        return None
    points = [{
        "job_id": tp.job_id,
        "state": tp.state,
        "reason": tp.reason,
        "study_instance_uid": tp.study_instance_uid,
        "hours_after_administration": None if tp.hours is None else round(tp.hours, 4),
        "acquisition": tp.acquisition.isoformat() if tp.acquisition else None,
    } for tp in sorted(tps, key=lambda t: (t.hours is None, t.hours or 0.0, t.created_at))]
    for job in waiting:  # named for this cycle, not offered yet: still computing, or failed on its own
        if job is None:
            continue
        pending = job.state != str(JobState.FAILED)
        points.append({"job_id": job.id, "state": "pending" if pending else "rejected",
                       "reason": None if pending else f"its dose job failed: {job.reason}",
                       "study_instance_uid": job.study_instance_uid, "hours_after_administration": None,
                       "acquisition": None})
    joined = sum(1 for tp in tps if tp.state == "joined")
    return {
        "cycle_id": cycle_id,
        "state": _state(list(results), joined),
        "explicit": bool(cycle.explicit) if cycle else bool(requests),
        # Studies held as identity conflicts: not joined, not counted, until POST .../conflicts/{job}/resolve.
        "conflicts": [{"job_id": tp.job_id, "reason": tp.reason} for tp in tps if tp.state == "conflict"],
        "administration": cycle.administration.isoformat() if cycle and cycle.administration else None,
        "options": dict(cycle.options or {}) if cycle else {},
        "time_points": points,
        "joined": joined,
        "results": [_result_out(r) for r in results],
        "newest_result_id": next((r.id for r in results if r.state == "done" and r.superseded_by is None), None),
        "created_at": cycle.created_at.isoformat() if cycle else None,
    }


def cycles_of_job(store: JobStore, job_id: str | None = None, limit: int = 100) -> list[dict]:
    """``GET /cycles``: cycles newest first, or the cycle a job was offered to or named for."""
    ensure_tables(store)
    with store.session(readonly=True) as s:
        if job_id:
            ids = {tp.cycle_id for tp in s.scalars(select(CycleTimePoint).where(CycleTimePoint.job_id == job_id))}
            ids |= {r.cycle_id for r in s.scalars(select(CycleRequest).where(CycleRequest.job_id == job_id))}
            ids.discard(None)
        else:
            ids = list(s.scalars(select(Cycle.id).order_by(Cycle.created_at.desc()).limit(limit)))
    return [v for v in (cycle_view(store, c) for c in ids) if v is not None]


def held_conflicts(store: JobStore, patient_key_: str | None = None) -> list[dict]:
    """Studies held as identity conflicts (all, or those carrying one patient's ID and issuer), oldest first."""
    ensure_tables(store)
    with store.session(readonly=True) as s:
        rows = s.scalars(select(CycleTimePoint).where(CycleTimePoint.state == "conflict")
                         .order_by(CycleTimePoint.created_at)).all()
    return [{"job_id": tp.job_id, "cycle_id": tp.cycle_id, "reason": tp.reason} for tp in rows
            if patient_key_ is None or (tp.identity or {}).get("patient_key") == patient_key_]


def _region_kind(name: str) -> str | None:
    from spectdose.integration import radiobiology_for

    bio = radiobiology_for(name)
    if bio is not None:
        return bio[0]
    low = name.lower()
    if "lesion" in low or "tumo" in low:
        return "lesion"
    return None


def cumulative(store: JobStore, patient_id: str, issuer: str | None = None) -> dict | None:
    """``GET /patients/{id}/cumulative``: kidney, red-marrow and lesion doses and BED summed over cycles.

    The patient is PatientID with IssuerOfPatientID (``issuer``; none: the ID without an issuer).
    Each cycle counts with its newest finished result, over the time points joined to it:
    studies held as identity conflicts never are (listed in ``held_conflicts``). Regions are
    matched across cycles by name (the SEG segment or ROI label), lesions too. None when
    nothing of the patient is known.
    """
    ensure_tables(store)
    key = patient_key(patient_id, issuer)
    with store.session(readonly=True) as s:
        cycles = s.scalars(select(Cycle).where(Cycle.patient_key == key).order_by(Cycle.administration)).all()
        other_issuers = s.scalar(select(func.count()).select_from(CyclePatient).where(
            CyclePatient.id_key == _id_key(patient_id), CyclePatient.key != key))
    held = held_conflicts(store, key)
    if not cycles and not held:
        return None
    by_region: dict[str, dict] = {}
    cycles_out, uncounted = [], []
    for cycle in cycles:
        newest = newest_result(store, cycle.id)
        entry = {"cycle_id": cycle.id,
                 "administration": cycle.administration.isoformat() if cycle.administration else None,
                 "result_id": newest.id if newest else None, "included": newest is not None,
                 "time_points": len(newest.used or []) if newest else 0}
        if newest is None:
            entry["reason"] = "no finished cycle result yet (needs 2 time points with finished dose jobs)"
        else:
            regions = (newest.result or {}).get("regions") or []
            if not regions:
                entry["reason"] = ("the result has no regions: send a SEG or RT Structure Set on the first time "
                                   "point's CT with that study")
            for r in regions:
                kind = _region_kind(r["region"])
                if kind is None:
                    continue
                agg = by_region.setdefault(r["region"], {"region": r["region"], "kind": kind, "per_cycle": []})
                agg["per_cycle"].append({"cycle_id": cycle.id, "result_id": newest.id,
                                         "absorbed_dose_gy": r["absorbed_dose_gy"], "bed_gy": r.get("bed_gy")})
            for r in (newest.result or {}).get("regions_not_reported") or []:
                if _region_kind(r["region"]) is not None:
                    uncounted.append(f"{r['region']} is not counted for cycle {cycle.id}: {r['reason']} (its "
                                     "cumulative covers the other cycles only)")
        cycles_out.append(entry)
    regions_out, flags = [], []
    for agg in sorted(by_region.values(), key=lambda a: ({"kidney": 0, "red_marrow": 1, "lesion": 2}[a["kind"]],
                                                          a["region"])):
        dose = sum(c["absorbed_dose_gy"] for c in agg["per_cycle"])
        beds = [c["bed_gy"] for c in agg["per_cycle"]]
        bed = sum(beds) if beds and all(b is not None for b in beds) else None
        out = {**agg, "cycles": len(agg["per_cycle"]), "absorbed_dose_gy": round(dose, 4),
               "bed_gy": None if bed is None else round(bed, 4)}
        if agg["kind"] == "kidney":
            out["limits"] = {"absorbed_dose_gy": KIDNEY_ABSORBED_LIMIT_GY, "bed_gy": KIDNEY_BED_LIMIT_GY}
            out["exceeds"] = {"absorbed_dose_gy": dose >= KIDNEY_ABSORBED_LIMIT_GY,
                              "bed_gy": bed is not None and bed >= KIDNEY_BED_LIMIT_GY}
            out["fraction_of_limit"] = {"absorbed_dose_gy": round(dose / KIDNEY_ABSORBED_LIMIT_GY, 4),
                                        "bed_gy": None if bed is None else round(bed / KIDNEY_BED_LIMIT_GY, 4)}
            if out["exceeds"]["absorbed_dose_gy"]:
                flags.append(f"{agg['region']}: cumulative absorbed dose {dose:.1f} Gy reaches the "
                             f"{KIDNEY_ABSORBED_LIMIT_GY:g} Gy kidney limit")
            if out["exceeds"]["bed_gy"]:
                flags.append(f"{agg['region']}: cumulative BED {bed:.1f} Gy reaches the {KIDNEY_BED_LIMIT_GY:g} Gy "
                             "kidney limit")
        regions_out.append(out)
    notes = []
    if held:
        notes.append(f"{len(held)} stud{'y' if len(held) == 1 else 'ies'} carrying this PatientID (and issuer) "
                     "conflict with the patient's name or birth date: held, not counted (held_conflicts; resolve "
                     "with POST /cycles/{cycle}/conflicts/{job}/resolve)")
    if other_issuers:
        notes.append(f"{other_issuers} other patient(s) carry the same PatientID under another IssuerOfPatientID: "
                     "not counted here (ask with ?issuer=)")
    return {
        "issuer": issuer or None,
        "held_conflicts": held,
        "cycles": cycles_out,
        "cycles_included": sum(1 for c in cycles_out if c["included"]),
        "regions": regions_out,
        "kidney_limits": {"absorbed_dose_gy": KIDNEY_ABSORBED_LIMIT_GY, "bed_gy": KIDNEY_BED_LIMIT_GY,
                          "sources": KIDNEY_LIMIT_SOURCES},
        "flags": flags,
        "notes": [*uncounted, *notes, "BED: linear-quadratic with mono-exponential repair per cycle (spectdose.integration: kidneys "
                  "alpha/beta 2.6 Gy, T_rep 2.8 h; red marrow 15 Gy, 0.5 h), summed over cycles (full repair "
                  "between cycles)", "regions are matched across cycles by their names"],
    }

